"""``GET /v1/metrics/prometheus``: the metrics document as Prometheus text exposition.

Each app gets its own :class:`prometheus_client.CollectorRegistry` (never the global one,
so several agents — or tests — in one process do not collide). A custom collector turns
the current ``GET /v1/metrics`` snapshot into metric families at scrape time. Units follow
Prometheus conventions: seconds and bytes, ratios 0..1. Null values are omitted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MB = 1_000_000


def _gauge(name: str, doc: str, value: Any, unit: str = "") -> Iterator[Metric]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield GaugeMetricFamily(name, doc, value=float(value), unit=unit)
    elif isinstance(value, bool):
        yield GaugeMetricFamily(name, doc, value=1.0 if value else 0.0, unit=unit)


def _ms(v: Any) -> float | None:
    return v / 1000.0 if isinstance(v, (int, float)) else None


class MetricsCollector(Collector):
    """Yields metric families from ``snapshot()`` (a ``GET /v1/metrics`` document)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        tp, lat, ftl = m["throughput"], m["latency"], m["first_token_latency"]
        yield from _gauge("inferos_tokens_per_second", "Generated tokens per second over the window", tp["tokens_per_second"])
        yield from _gauge("inferos_requests_per_second", "Requests per second over the window", tp["requests_per_second"])
        yield from _gauge("inferos_window_reports", "Reports in the metrics window", m["measurement_window"]["sample_count"])
        yield from _gauge("inferos_window_seconds", "Length of the metrics window", m["measurement_window"]["duration_seconds"])

        for fam_name, doc, section, keys in (
            ("inferos_request_latency_seconds", "End-to-end request latency over the window", lat,
             (("mean", "mean_ms"), ("0.5", "median_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"), ("std", "std_ms"))),
            ("inferos_time_to_first_token_seconds", "Measured time to first token over the window", ftl,
             (("mean", "mean_ms"), ("0.5", "median_ms"), ("0.95", "p95_ms"))),
        ):
            fam = GaugeMetricFamily(fam_name, doc, labels=["stat"])
            for label, key in keys:
                v = _ms(section.get(key))
                if v is not None:
                    fam.add_metric([label], v)
            yield fam

        dppl = m["quality"]["delta_ppl"]
        yield from _gauge("inferos_delta_ppl_estimate", "Perplexity difference vs baseline-mode reports (estimate)", dppl["delta"])
        yield from _gauge("inferos_ppl_estimate", "Perplexity from prompt NLL, non-baseline reports", dppl["current"])

        mem = m["memory"]
        for name, key, doc in (
            ("inferos_kv_cache", "kv_cache_usage_mb", "KV cache storage of the newest report"),
            ("inferos_kv_cache_peak", "kv_cache_peak_mb", "Largest KV cache storage in the window"),
            ("inferos_process_total_allocated", "total_allocated_mb", "Sum of the instances' peak RSS"),
            ("inferos_process_peak_rss", "peak_usage_mb", "Largest single peak RSS in the window"),
        ):
            v = mem.get(key)
            if isinstance(v, (int, float)):
                yield GaugeMetricFamily(name, doc, value=v * MB, unit="bytes")

        kv = m["kv_stats"]
        levels = GaugeMetricFamily("inferos_kv_level_tokens", "Tokens per KV level over the window", labels=["level"])
        for level, n in kv["level_distribution"].items():
            levels.add_metric([level], n)
        yield levels
        yield from _gauge("inferos_kv_compression_ratio", "Stored KV bytes / float16 bytes", kv["compression_ratio"])
        yield from _gauge("inferos_kv_cache_hit_ratio", "Share of requests that reused a cached prefix (prefix cache)",
                          kv["hit_rate"])
        yield from _gauge("inferos_prefix_cache_token_hit_ratio", "Prompt tokens reused from the prefix cache / prompt tokens",
                          kv["token_hit_rate"])
        for name, key, doc in (("inferos_prefix_cache", "prefix_cache_mb", "KV states held by the prefix caches"),
                               ("inferos_prefix_cache_saved", "prefix_cache_saved_mb",
                                "Bytes the prefix caches save by sharing blocks between states")):
            v = mem.get(key)
            if isinstance(v, (int, float)):
                yield GaugeMetricFamily(name, doc, value=v * MB, unit="bytes")
        yield CounterMetricFamily("inferos_prefix_cache_evictions", "Prefix-cache entries evicted (LRU), as reported",
                                  value=kv["prefix_cache_evictions"])
        yield CounterMetricFamily("inferos_prefix_cache_retokenize_mismatches",
                                  "Prefix reuses cut short inside generated tokens (chat template re-rendered them)",
                                  value=kv["retokenize_mismatches"])

        dev = m["device_utilization"]
        util = GaugeMetricFamily("inferos_device_utilization_ratio", "Device utilisation 0..1", labels=["device"])
        for device in ("cpu", "npu", "dml"):
            v = dev.get(f"{device}_utilization")
            if isinstance(v, (int, float)):
                util.add_metric([device], v)
        yield util

        yield from resource_families(m.get("resources") or {})

        st = m["optimization_status"]
        yield from _gauge("inferos_policy_version", "Version of the effective policy", st["policy_version"])
        yield from _gauge("inferos_baseline_mode", "1 when baseline mode is on", st["baseline_mode"])
        yield from _gauge("inferos_kv_quantization_active", "1 when a quantized KV store ran in the window",
                          st["kv_quantization_active"])
        c = m["counters"]
        yield CounterMetricFamily("inferos_reports", "Reports accepted since the history began", value=c["reports_total"])
        yield CounterMetricFamily("inferos_dropped_reports", "Reports dropped by client queues (overflow), as reported",
                                  value=c["dropped_reports_total"])


def resource_families(res: dict[str, Any]) -> Iterator[Metric]:
    """KV budget, memory pool, scheduler, fallback counters and device telemetry."""
    b = res.get("kv_budget") or {}
    for key, doc in (("total_bytes", "Process KV budget (summed over instances)"),
                     ("reserved_bytes", "KV bytes reserved by admitted requests"),
                     ("used_bytes", "KV bytes resident in admitted requests' caches")):
        yield from _gauge(f"inferos_kv_budget_{key[:-6]}", doc, b.get(key), unit="bytes")
    yield from _gauge("inferos_kv_budget_refused", "Requests refused by KV admission (newest reports)", b.get("refused_total"))
    pool = res.get("memory_pool") or {}
    for key in ("total_bytes", "used_bytes", "free_bytes"):
        yield from _gauge(f"inferos_memory_pool_{key[:-6]}", f"Memory pool {key[:-6]}", pool.get(key), unit="bytes")
    yield from _gauge("inferos_memory_pool_blocks", "Allocated blocks in the memory pool", pool.get("block_count"))
    yield from _gauge("inferos_memory_pool_fragmentation_ratio", "1 - largest free extent / free bytes",
                      pool.get("fragmentation"))
    sch = res.get("scheduler") or {}
    yield from _gauge("inferos_scheduler_processes", "Inference processes reporting", sch.get("processes"))
    yield from _gauge("inferos_scheduler_requests_running", "Requests holding KV budget", sch.get("requests_running"))
    yield from _gauge("inferos_scheduler_requests_queued", "Requests waiting for KV budget", sch.get("requests_queued"))
    yield from _gauge("inferos_scheduler_latency_seconds", "Mean request latency", _ms(sch.get("avg_latency_ms")))
    fb = res.get("fallback") or {}
    counts: dict[str, int] = {}
    for inst in (fb.get("per_instance") or {}).values():
        for reason, n in (inst.get("counters") or {}).items():
            counts[reason] = counts.get(reason, 0) + int(n)
    fam = CounterMetricFamily("inferos_fallbacks", "Fallbacks triggered per reason (guide §4.1 rows)", labels=["reason"])
    for reason, n in sorted(counts.items()):
        fam.add_metric([reason], n)
    yield fam
    yield from _gauge("inferos_runtime_critical", "1 when an instance's runtime is in the critical state",
                      bool(fb.get("critical")))
    temp = GaugeMetricFamily("inferos_device_temperature_celsius", "Hottest sensor per device", labels=["device", "kind"])
    busy = GaugeMetricFamily("inferos_device_busy_ratio", "Device utilisation 0..1 per device", labels=["device", "kind"])
    for d in res.get("devices") or []:
        if isinstance(d.get("temperature_c"), (int, float)):
            temp.add_metric([d["device"], d["kind"]], d["temperature_c"])
        if isinstance(d.get("utilization_percent"), (int, float)):
            busy.add_metric([d["device"], d["kind"]], d["utilization_percent"] / 100.0)
    yield temp
    yield busy


class PrometheusExporter:
    """A private registry holding one :class:`MetricsCollector`."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
