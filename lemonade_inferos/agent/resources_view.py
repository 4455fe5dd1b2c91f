"""The resource part of ``GET /v1/metrics`` and the guide's compact fields -- pure
functions over the window's reports and the agent's resource provider (no I/O, no clock).

``resources`` (from each reporting process's newest report, ``RunStats.resources``):

* ``kv_budget`` per instance and summed: total / reserved / used bytes, queue, refusals;
* ``memory_pool``: the /dev/inferos driver's pool when the agent sees the driver, else the
  newest report's host pool (total, used, free, block count, fragmentation);
* ``scheduler``: processes (instances reporting in the window, or the driver's count),
  requests running and queued (summed over instances), average latency ms (window mean);
* ``fallback``: per instance, the runtime's active rows and critical flag, plus the
  newest ``events`` across instances (fallbacks, notifications, recoveries) -- from the
  reports and from ``POST /v1/events`` (sent as they happen, requests or not);
* ``devices`` / ``backends`` / ``host_memory``: the agent machine's telemetry.

Compact fields (the guide's monitoring, A/B and auto-tuner scripts read these):
``tps`` = ``throughput.tokens_per_second``; ``ftl_ms`` = mean measured TTFT (0.0 before the
first report); ``mem.vram_gb`` (GPU memory used, GB = 10^9 bytes), ``mem.system_gb`` (host
memory in use, cgroup-aware), ``mem.kv_cache_gb``; ``util.npu`` / ``util.igpu`` /
``util.cpu`` fractions 0..1. The compact fields are always numbers so those scripts can
format them: a device without telemetry reads 0.0 there and ``compact_notes`` names it;
the detailed sections keep null for "unknown".
"""

from __future__ import annotations

from typing import Any

GB = 1e9


def _sum(rows: list[dict[str, Any]], key: str) -> int:
    return int(sum(r.get(key) or 0 for r in rows))


def resources_section(reports: list[Any], provided: dict[str, Any], latency_mean_ms: float | None,
                      max_events: int = 20, posted: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """See the module docstring. ``reports``: window reports (oldest first), each with a
    ``resources`` attribute (dict or None); ``provided``: the agent's resource provider;
    ``posted``: events instances sent to ``POST /v1/events`` (merged with the reports'
    events, duplicates dropped)."""
    newest: dict[str, dict[str, Any]] = {}
    for r in reports:
        if isinstance(r.resources, dict):
            newest[r.instance] = r.resources
    budgets = {i: v.get("kv_budget") for i, v in newest.items() if isinstance(v.get("kv_budget"), dict)}
    sched = [v.get("scheduler") or {} for v in newest.values()]
    drv_sched = provided.get("scheduler") if isinstance(provided.get("scheduler"), dict) else None
    pool = provided.get("memory_pool")
    pool_source = "inferos_driver" if isinstance(pool, dict) else None
    if not isinstance(pool, dict):
        pools = [v.get("memory_pool") for v in newest.values() if isinstance(v.get("memory_pool"), dict)]
        pool = pools[-1] if pools else None
        pool_source = "host pool of the newest reporting process" if pool else None
    events: list[dict[str, Any]] = []
    fallback: dict[str, Any] = {}
    for inst, v in newest.items():
        rt = (v.get("runtime") or {}).get("fallback") or {}
        if rt:
            fallback[inst] = {"critical": bool(rt.get("critical")), "active": rt.get("active", []),
                              "counters": rt.get("counters", {})}
            events += [{**e, "instance": inst} for e in rt.get("events", []) if isinstance(e, dict)]
    seen = {(e.get("instance"), e.get("timestamp"), e.get("kind"), e.get("reason")) for e in events}
    for e in posted or []:
        if (e.get("instance"), e.get("timestamp"), e.get("kind"), e.get("reason")) not in seen:
            events.append(e)
    events.sort(key=lambda e: e.get("timestamp") or 0)
    return {
        "kv_budget": {
            "total_bytes": _sum(list(budgets.values()), "total_bytes") if budgets else None,
            "reserved_bytes": _sum(list(budgets.values()), "reserved_bytes") if budgets else None,
            "used_bytes": _sum(list(budgets.values()), "used_bytes") if budgets else None,
            "refused_total": _sum(list(budgets.values()), "refused_total") if budgets else None,
            "per_instance": budgets,
        },
        "memory_pool": pool,
        "memory_pool_source": pool_source,
        "scheduler": {
            "processes": int(drv_sched.get("processes", 0)) if drv_sched else len({r.instance for r in reports}),
            "requests_running": _sum(sched, "requests_in_flight"),
            "requests_queued": _sum(sched, "requests_queued"),
            "avg_latency_ms": latency_mean_ms,
            "source": "inferos_driver" if drv_sched else "reports in the window",
        },
        "fallback": {"critical": any(f["critical"] for f in fallback.values()), "per_instance": fallback},
        "events": events[-max_events:],
        "devices": provided.get("devices", []),
        "backends": provided.get("backends", []),
        "driver": provided.get("driver"),
        "host_memory": provided.get("host_memory"),
    }


def compact_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The guide's compact fields computed from the detailed document (see the module docstring)."""
    notes: dict[str, str] = {}
    dev = doc["device_utilization"]
    res = doc.get("resources") or {}

    def num(v: Any, name: str, why: str) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        notes[name] = why
        return 0.0

    gpus = [d for d in res.get("devices", []) if d.get("kind") == "gpu" and d.get("memory_used_bytes") is not None]
    host = res.get("host_memory") or {}
    kv_mb = doc["memory"].get("kv_cache_usage_mb")
    return {
        "tps": float(doc["throughput"]["tokens_per_second"] or 0.0),
        "ftl_ms": num(doc["first_token_latency"]["mean_ms"], "ftl_ms", "no report with a measured TTFT in the window"),
        "mem": {
            "vram_gb": round(sum(d["memory_used_bytes"] for d in gpus) / GB, 4) if gpus else
            num(None, "mem.vram_gb", "no GPU memory telemetry on the agent's machine"),
            "system_gb": round(host["memory_used_bytes"] / GB, 4) if host.get("memory_used_bytes") is not None else
            num(None, "mem.system_gb", "no host memory telemetry"),
            "kv_cache_gb": round(kv_mb / 1000.0, 6) if isinstance(kv_mb, (int, float)) else
            num(None, "mem.kv_cache_gb", "no report in the window"),
        },
        "util": {
            "npu": num(dev.get("npu_utilization"), "util.npu", "no NPU utilisation telemetry"),
            "igpu": num(dev.get("dml_utilization"), "util.igpu", "no GPU utilisation telemetry"),
            "cpu": num(dev.get("cpu_utilization"), "util.cpu", "no CPU telemetry"),
        },
        "compact_notes": notes,
    }
