"""The sliding metrics window: pure functions from PostRun reports to ``GET /v1/metrics``.

No I/O, no clock: every function takes ``now`` (UNIX seconds) so results are reproducible.

Definitions (all over the reports whose end time lies in ``[now - window, now]``; a report's
end time is clamped to when the agent received it, so a skewed clock cannot place a report
in the future):

* ``throughput.tokens_per_second`` = generated tokens of those reports / wall time of the
  window, where the wall time is ``now - max(now - window, earliest start_time)`` (the
  window, or less when the first request in it started later — e.g. right after start-up).
  ``requests_per_second`` = report count / the same wall time. A request that started
  before the window opened counts with all its tokens.
* ``latency`` = per-request end-to-end time in ms (``total_ms``, else
  ``(end_time - start_time) * 1000``): mean, median, p95, p99 (linear interpolation between
  closest ranks, numpy's default), std (population standard deviation).
* ``first_token_latency`` = the reports' ``ttft_ms`` as measured by the engine (never
  estimated); reports without it are left out; null when none has it.
* ``quality.delta_ppl_est`` (a number, the guide's compact field; ``quality.delta_ppl`` holds
  it with its parts and how it was measured) compares like with like: only prompts (``prompt_hash``) that
  both a non-baseline report in the window and a baseline-mode report (baseline =
  ``baseline: true`` or ``policy_name == "baseline"``; in the window, else the most recent
  ones seen, ``baseline_reference_size``) have. Over those prompts it is
  ``exp(mean NLL of the non-baseline reports) - exp(mean NLL of the baseline reports)``,
  NLL being each report's ``prompt_nll`` (nats/token over its prompt), each side averaged
  weighted by prompt tokens. Null (with the reason) when no prompt ran both ways: different
  prompts differ in difficulty, which is not a quality loss.
* ``memory`` (MB = 10^6 bytes): ``kv_cache_usage_mb`` = the newest report's
  ``kv.total_bytes`` (resident KV storage at the end of that request, quantization metadata
  included); ``total_allocated_mb`` = sum over instances of each instance's newest
  ``peak_rss_bytes`` (peak resident set size of every reporting inference process);
  ``peak_usage_mb`` = the largest single ``peak_rss_bytes`` in the window.
* prefix cache (the engines' reuse of earlier requests' KV states): ``kv_stats.hit_rate`` =
  ``memory.kv_cache_hit_rate`` = the share of the window's reports with the prefix cache on
  that reused a cached prefix (``cache_n > 0``); ``kv_stats.token_hit_rate`` = their reused
  prompt tokens / their prompt tokens; ``memory.prefix_cache_mb`` / ``prefix_cache_saved_mb``
  = sum over instances of the newest report's ``prefix_cache.bytes_held`` / ``bytes_saved``
  (bytes shared between cached states counted once / what sharing saves);
  ``kv_stats.prefix_cache_evictions`` and ``retokenize_mismatches`` = sum over instances of
  the newest report's cumulative counters.
* ``kv_stats.level_distribution`` = tokens per level (L0 fp16 .. L3 evicted, summed over
  layers) summed over the window's non-baseline reports; ``compression_ratio`` = stored KV
  bytes / the same cache in float16 (lower is smaller; 0.28 ≈ 3.6x), non-baseline reports.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

MB = 1_000_000
BASELINE_POLICY_NAME = "baseline"


def is_baseline(payload: dict[str, Any]) -> bool:
    """A report ran as baseline when it says so (``baseline``: engine-level pass-through) or
    when it ran under the baseline policy (``policy_name == "baseline"``: agent baseline mode)."""
    return bool(payload.get("baseline")) or payload.get("policy_name") == BASELINE_POLICY_NAME


@dataclass(frozen=True)
class Report:
    """One accepted PostRun report, reduced to what the metrics use.

    Times are UNIX seconds (``received_at`` on the agent's clock), durations ms, sizes bytes.
    """

    id: int
    received_at: float
    instance: str
    start_time: float
    end_time: float
    generated_tokens: int
    prompt_tokens: int
    ttft_ms: float | None
    latency_ms: float
    decode_tps: float
    prompt_nll: float | None
    kv_total_bytes: int
    kv_fp16_bytes: int
    kv_level_distribution: dict[str, int] = field(default_factory=dict)
    kv_store: str = ""
    kv_active: bool = False
    cache_n: int = 0
    prefix_cache: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    baseline: bool = False
    policy_name: str = ""
    provider: str = ""
    dropped: int = 0
    blocks: int = 0
    resources: dict[str, Any] | None = None
    prompt_hash: str = ""

    @property
    def t(self) -> float:
        """The report's place on the time axis: its end time, never after receipt."""
        return min(self.end_time, self.received_at)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, id: int, received_at: float) -> "Report":
        """Build from a validated ``POST /v1/stats`` body (``RunStats.to_dict()`` + instance)."""
        kv = payload.get("kv") or {}
        total_ms = float(payload.get("total_ms") or 0.0)
        start, end = float(payload["start_time"]), float(payload["end_time"])
        return cls(
            id=id,
            received_at=received_at,
            instance=str(payload.get("instance", "")),
            start_time=start,
            end_time=end,
            generated_tokens=int(payload.get("generated_tokens", 0)),
            prompt_tokens=int(payload.get("prompt_tokens", 0)),
            ttft_ms=None if payload.get("ttft_ms") is None else float(payload["ttft_ms"]),
            latency_ms=total_ms if total_ms > 0 else max(0.0, (end - start) * 1000.0),
            decode_tps=float(payload.get("decode_tps", 0.0)),
            prompt_nll=None if payload.get("prompt_nll") is None else float(payload["prompt_nll"]),
            prompt_hash=str(payload.get("prompt_hash") or ""),
            kv_total_bytes=int(kv.get("total_bytes", 0)),
            kv_fp16_bytes=int(kv.get("fp16_bytes", 0)),
            kv_level_distribution={str(k): int(v) for k, v in (kv.get("level_distribution") or {}).items()},
            kv_store=str(kv.get("store", "")),
            kv_active=bool(kv.get("active", False)),
            cache_n=int(payload.get("cache_n", 0)),
            prefix_cache=dict(payload.get("prefix_cache") or {}),
            peak_rss_bytes=int(payload.get("peak_rss_bytes", 0)),
            baseline=is_baseline(payload),
            policy_name=str(payload.get("policy_name", "")),
            provider=str(payload.get("provider", "")),
            dropped=int(payload.get("dropped", 0)),
            blocks=int(kv.get("blocks", 0) or 0),
            resources=payload.get("resources") if isinstance(payload.get("resources"), dict) else None,
        )


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ascending values, linear interpolation; None if empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pstdev(xs: list[float]) -> float | None:
    if not xs:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def weighted_nll(reports: Iterable[Report]) -> tuple[float | None, int]:
    """Prompt-token-weighted mean of ``prompt_nll`` (nats/token) and the report count used."""
    num = 0.0
    den = 0
    n = 0
    for r in reports:
        if r.prompt_nll is None or r.prompt_tokens <= 0:
            continue
        num += r.prompt_nll * r.prompt_tokens
        den += r.prompt_tokens
        n += 1
    return (num / den if den else None), n


def _ppl(nll: float | None) -> float | None:
    if nll is None:
        return None
    try:
        return math.exp(nll)
    except OverflowError:
        return None


class MetricsWindow:
    """Reports of the last ``window_seconds`` plus the baseline-mode ΔPPL reference.

    Not thread-safe on its own: :class:`lemonade_inferos.agent.state.AgentState` holds the lock.
    """

    MAX_REPORTS = 500_000

    def __init__(self, window_seconds: float = 60.0, baseline_reference_size: int = 200):
        self.window_seconds = float(window_seconds)
        self._reports: collections.deque[Report] = collections.deque(maxlen=self.MAX_REPORTS)
        self._baseline_ref: collections.deque[Report] = collections.deque(maxlen=baseline_reference_size)

    @staticmethod
    def _is_reference(report: Report) -> bool:
        return report.baseline and report.prompt_nll is not None and report.prompt_tokens > 0

    def add(self, report: Report) -> None:
        """Add one report (any order of end times is fine)."""
        self._reports.append(report)
        if self._is_reference(report):
            self._baseline_ref.append(report)

    def load(self, reports: Iterable[Report], reference: Iterable[Report]) -> None:
        """Bulk-load (e.g. from the store at start-up): ``reports`` into the window,
        ``reference`` (baseline-mode reports, oldest first) into the ΔPPL reference."""
        self._reports.extend(reports)
        self._baseline_ref.extend(r for r in reference if self._is_reference(r))

    def prune(self, now: float) -> None:
        """Forget reports that ended before the window (from the oldest arrivals)."""
        cutoff = now - self.window_seconds
        while self._reports and self._reports[0].t < cutoff:
            self._reports.popleft()

    def in_window(self, now: float) -> list[Report]:
        """The reports with end time in ``[now - window, now]``, oldest end time first."""
        cutoff = now - self.window_seconds
        return sorted((r for r in self._reports if cutoff <= r.t <= now), key=lambda r: (r.t, r.id))

    def baseline_reference(self) -> list[Report]:
        return list(self._baseline_ref)


def throughput(reports: list[Report], now: float, window_seconds: float) -> dict[str, Any]:
    """``throughput`` section (tokens/s and requests/s over the window's wall time)."""
    if not reports:
        return {"tokens_per_second": 0.0, "requests_per_second": 0.0, "generated_tokens": 0, "wall_seconds": 0.0}
    cutoff = now - window_seconds
    span = now - max(cutoff, min(r.start_time for r in reports))
    span = max(span, 1e-3)
    tokens = sum(r.generated_tokens for r in reports)
    return {
        "tokens_per_second": _r(tokens / span),
        "requests_per_second": _r(len(reports) / span, 4),
        "generated_tokens": tokens,
        "wall_seconds": _r(span),
        "decode_tokens_per_second_mean": _r(_mean([r.decode_tps for r in reports if r.decode_tps > 0])),
        "calculation": "generated tokens / wall time of the window (now - max(window start, first request start))",
    }


def latency(reports: list[Report]) -> dict[str, Any]:
    """``latency`` section: end-to-end request time in ms."""
    xs = sorted(r.latency_ms for r in reports)
    return {
        "mean_ms": _r(_mean(xs)),
        "median_ms": _r(percentile(xs, 50)),
        "p95_ms": _r(percentile(xs, 95)),
        "p99_ms": _r(percentile(xs, 99)),
        "std_ms": _r(_pstdev(xs)),
        "samples": len(xs),
        "calculation": "total_ms (end_time - start_time) per request; std is the population std",
    }


def first_token_latency(reports: list[Report]) -> dict[str, Any]:
    """``first_token_latency`` section: the engine's measured TTFT in ms."""
    xs = sorted(r.ttft_ms for r in reports if r.ttft_ms is not None)
    return {
        "mean_ms": _r(_mean(xs)),
        "median_ms": _r(percentile(xs, 50)),
        "p95_ms": _r(percentile(xs, 95)),
        "samples": len(xs),
        "measurement_method": "measured: first token emitted - request start, as reported by the engine (never estimated)",
    }


def quality(reports: list[Report], baseline_reference: list[Report]) -> dict[str, Any]:
    """``quality`` section: ΔPPL estimate from prompt NLL (see the module docstring)."""
    cur = [r for r in reports if not r.baseline and r.prompt_hash]
    base_pool = [r for r in reports if r.baseline and r.prompt_hash]
    base_source = "window"
    if not {r.prompt_hash for r in base_pool} & {r.prompt_hash for r in cur}:
        base_pool = [r for r in baseline_reference if r.prompt_hash]
        base_source = "recent baseline-mode reports"
    paired = {r.prompt_hash for r in cur} & {r.prompt_hash for r in base_pool}
    if not paired:
        base_source = "none: no prompt ran both with the policy and in baseline mode"
    cur_nll, n_cur = weighted_nll(r for r in cur if r.prompt_hash in paired)
    base_nll, n_base = weighted_nll(r for r in base_pool if r.prompt_hash in paired)
    cur_ppl, base_ppl = _ppl(cur_nll), _ppl(base_nll)
    delta = cur_ppl - base_ppl if cur_ppl is not None and base_ppl is not None else None
    return {
        "delta_ppl_est": _r(delta, 4),
        "delta_ppl": {
            "current": _r(cur_ppl, 4),
            "baseline": _r(base_ppl, 4),
            "delta": _r(delta, 4),
            "measurement": {
                "method": "over the prompts that ran both with the policy and in baseline mode: "
                "exp(prompt-token-weighted mean prompt NLL) of the non-baseline reports minus the same over "
                "the baseline-mode reports",
                "paired_prompts": len(paired),
                "samples": n_cur,
                "baseline_samples": n_base,
                "baseline_source": base_source,
            },
        },
        "accept_rate": {
            "current": None,
            "note": "no speculative decoding in this engine; nothing to accept or reject",
        },
    }


def _newest_per_instance(reports: list[Report]) -> dict[str, Report]:
    per_instance: dict[str, Report] = {}
    for r in reports:
        per_instance[r.instance] = r  # reports are sorted by end time: last wins
    return per_instance


def prefix_cache(reports: list[Report]) -> dict[str, Any]:
    """Prefix-cache figures over the window (definitions in the module docstring); rates
    None when no report had the prefix cache on."""
    on = [r for r in reports if r.prefix_cache.get("enabled")]
    newest = [r.prefix_cache for r in _newest_per_instance(on).values()]
    prompt = sum(r.prompt_tokens for r in on)

    def total(key: str) -> int:
        return int(sum(int(p.get(key, 0)) for p in newest))

    return {
        "hit_rate": _r(sum(1 for r in on if r.cache_n > 0) / len(on), 4) if on else None,
        "token_hit_rate": _r(sum(r.cache_n for r in on) / prompt, 4) if prompt else None,
        "bytes_held": total("bytes_held"),
        "bytes_saved": total("bytes_saved"),
        "evictions": total("evictions"),
        "retokenize_mismatches": total("retokenize_mismatches"),
        "samples": len(on),
    }


def memory(reports: list[Report]) -> dict[str, Any]:
    """``memory`` section in MB (10^6 bytes)."""
    if not reports:
        return {
            "kv_cache_usage_mb": None,
            "kv_cache_mean_mb": None,
            "kv_cache_peak_mb": None,
            "kv_cache_hit_rate": None,
            "prefix_cache_mb": None,
            "prefix_cache_saved_mb": None,
            "total_allocated_mb": None,
            "peak_usage_mb": None,
            "definitions": _MEMORY_DEFS,
        }
    newest = reports[-1]
    per_instance = _newest_per_instance(reports)
    kv = [r.kv_total_bytes for r in reports]
    pc = prefix_cache(reports)
    return {
        "kv_cache_usage_mb": _r(newest.kv_total_bytes / MB, 6),
        "kv_cache_mean_mb": _r(sum(kv) / len(kv) / MB, 6),
        "kv_cache_peak_mb": _r(max(kv) / MB, 6),
        "kv_cache_hit_rate": pc["hit_rate"],
        "prefix_cache_mb": _r(pc["bytes_held"] / MB, 6) if pc["samples"] else None,
        "prefix_cache_saved_mb": _r(pc["bytes_saved"] / MB, 6) if pc["samples"] else None,
        "total_allocated_mb": _r(sum(r.peak_rss_bytes for r in per_instance.values()) / MB),
        "peak_usage_mb": _r(max(r.peak_rss_bytes for r in reports) / MB),
        "definitions": _MEMORY_DEFS,
    }


_MEMORY_DEFS = {
    "unit": "MB = 10^6 bytes",
    "kv_cache_usage_mb": "kv.total_bytes of the newest report: resident KV storage at the end of that request, "
    "quantization metadata included",
    "kv_cache_mean_mb": "mean kv.total_bytes over the window",
    "kv_cache_peak_mb": "largest kv.total_bytes in the window",
    "kv_cache_hit_rate": "share of the window's reports (prefix cache on) that reused a cached prefix",
    "prefix_cache_mb": "sum over instances of the newest prefix_cache.bytes_held (shared blocks counted once)",
    "prefix_cache_saved_mb": "sum over instances of the newest prefix_cache.bytes_saved (bytes sharing avoids)",
    "total_allocated_mb": "sum over reporting instances of their newest peak_rss_bytes (process peak RSS)",
    "peak_usage_mb": "largest single peak_rss_bytes in the window (one process's peak RSS)",
}


def kv_stats(reports: list[Report]) -> dict[str, Any]:
    """``kv_stats`` section over the window's non-baseline reports."""
    rs = [r for r in reports if not r.baseline]
    dist: dict[str, int] = {}
    for r in rs:
        for k, v in r.kv_level_distribution.items():
            dist[k] = dist.get(k, 0) + v
    dist = dict(sorted(dist.items()))
    total = sum(dist.values())
    fp16 = sum(r.kv_fp16_bytes for r in rs if r.kv_fp16_bytes > 0)
    stored = sum(r.kv_total_bytes for r in rs if r.kv_fp16_bytes > 0)
    stores: dict[str, int] = {}
    for r in rs:
        stores[r.kv_store] = stores.get(r.kv_store, 0) + 1
    pc = prefix_cache(reports)
    return {
        "total_chunks": sum(r.blocks for r in rs),
        "level_distribution": dist,
        "level_fraction": {k: _r(v / total, 4) for k, v in dist.items()} if total else {},
        "hit_rate": pc["hit_rate"],
        "token_hit_rate": pc["token_hit_rate"],
        "prefix_cache_evictions": pc["evictions"],
        "retokenize_mismatches": pc["retokenize_mismatches"],
        "compression_ratio": _r(stored / fp16, 4) if fp16 else None,
        "compression_vs_fp16": _r(fp16 / stored, 4) if stored else None,
        "stores": stores,
        "samples": len(rs),
        "definitions": {
            "level_distribution": "tokens per level summed over layers and over the window's non-baseline reports "
            "(L0 float16, L1 INT8, L2 INT4, L3 evicted)",
            "compression_ratio": "stored KV bytes / the same cache in float16 (lower = smaller)",
            "total_chunks": "KV blocks formed (quantization units of block_len tokens) summed over the window's "
            "non-baseline reports",
            "hit_rate": "share of the window's reports (prefix cache on) that reused a cached prefix (cache_n > 0)",
            "token_hit_rate": "prompt tokens reused from the prefix cache / prompt tokens, same reports",
            "prefix_cache_evictions": "entries evicted from the prefix caches (sum of the instances' newest counters)",
        },
    }


def window_sections(reports: list[Report], now: float, window_seconds: float,
                    baseline_reference: list[Report]) -> dict[str, Any]:
    """Every report-derived section of ``GET /v1/metrics`` at time ``now``.

    Args:
        reports: ``MetricsWindow.in_window(now)`` (sorted by end time).
        baseline_reference: ``MetricsWindow.baseline_reference()``.
    """
    return {
        "measurement_window": {
            "duration_seconds": window_seconds,
            "sample_count": len(reports),
            "instances": len({r.instance for r in reports}),
            "dropped_reports": sum(r.dropped for r in reports),
            "description": f"reports that ended in the last {window_seconds:g} s",
        },
        "throughput": throughput(reports, now, window_seconds),
        "latency": latency(reports),
        "first_token_latency": first_token_latency(reports),
        "quality": quality(reports, baseline_reference),
        "memory": memory(reports),
        "kv_stats": kv_stats(reports),
    }


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
