"""The service core: policy in force, baseline mode, config, metrics window, store.

No HTTP here: :mod:`lemonade_inferos.agent.app` maps routes onto :class:`AgentState`.
Policy, baseline flag, version and config are persisted in the store's ``state`` table, so
a restarted agent keeps them (and keeps counting versions upward).

``version`` increases by one whenever the *effective* policy changes (a policy update, or
baseline mode switched on/off); clients use it to notice changes cheaply.

Resource provider seam
----------------------
``resource_provider`` is an optional callable (e.g. from ``lemonade_inferos.resources``)
returning a dict; any key may be missing::

    {"device_utilization": {"npu": 0.67, "dml": 0.45},   # fractions 0..1, or None
     "memory_pool": {"total_bytes": ..., "used_bytes": ..., "free_bytes": ..., "block_count": ...},
     "source": "ai_driver"}

Without it (or when it raises), NPU/DML utilisation are null with the note "not available
on this platform" and the memory pool is null.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

import psutil

from ..policy import Policy, baseline_policy, load_policy, validate_policy
from .history import HistoryStore
from .metrics import MetricsWindow, Report, finite, window_sections
from .resources_view import compact_fields, resources_section
from .settings import AgentConfig

log = logging.getLogger("lemonade_inferos.agent")

ResourceProvider = Callable[[], dict[str, Any]]
NOT_AVAILABLE = "not available on this platform"
FULL_PRECISION_STORES = {"", "fp32", "fp16", "full", "none", "full_precision"}
ACCELERATED_PROVIDERS = {"DmlExecutionProvider", "VitisAIExecutionProvider"}


class CpuSampler:
    """System-wide CPU utilisation (fraction 0..1) from psutil, re-measured at most every
    ``min_interval`` seconds (psutil compares with the previous call's CPU times)."""

    def __init__(self, min_interval: float = 1.0):
        self.min_interval = min_interval
        psutil.cpu_percent(interval=None)  # prime: the first call has no reference
        self._last = time.monotonic()
        self._value: float | None = None
        self._lock = threading.Lock()

    def sample(self) -> float:
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._last >= self.min_interval:
                if now - self._last < 0.1:  # too short for a meaningful reading
                    time.sleep(0.1 - (now - self._last))
                self._value = psutil.cpu_percent(interval=None) / 100.0
                self._last = time.monotonic()
            return self._value


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-01-15T10:30:45.123Z``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AgentState:
    """Everything the agent knows, behind one lock.

    Args:
        store: the durable store (reports + state).
        config: agent config; None = the persisted one, else defaults.
        initial_policy: the policy to put in force at start; None = the persisted one, else
            the ``default`` preset.
        clock: UNIX-seconds clock (injectable for deterministic tests).
        resource_provider: see the module docstring.
    """

    def __init__(
        self,
        store: HistoryStore,
        config: AgentConfig | None = None,
        *,
        initial_policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
        resource_provider: ResourceProvider | None = None,
    ):
        self.store = store
        self.clock = clock
        self.resource_provider = resource_provider
        self.cpu = CpuSampler()
        self._lock = threading.RLock()
        self.started_at = clock()

        stored_cfg = store.get_state("config")
        if config is None:
            config = AgentConfig.model_validate(stored_cfg) if stored_cfg else AgentConfig()
        self.config = config
        store.max_rows = config.history_max_rows

        self.version = int(store.get_state("version", 0))
        self.baseline = bool(store.get_state("baseline", False))
        stored_pol = store.get_state("policy")
        policy = initial_policy
        if policy is None and stored_pol is not None:
            try:
                policy = validate_policy(stored_pol, source="stored policy")
            except ValueError as e:  # schema changed between versions: start from default
                log.warning("ignoring stored policy: %s", e)
        if policy is None:
            policy = load_policy("default")
        self.policy = policy
        if stored_pol != policy.to_dict() or self.version == 0:
            self.version += 1
        self._persist()

        self.window = MetricsWindow(config.window_seconds, config.baseline_reference_size)
        self._reload_window()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)

    # -- persistence -------------------------------------------------------------------
    def _persist(self) -> None:
        self.store.set_state(
            {
                "policy": self.policy.to_dict(),
                "version": self.version,
                "baseline": self.baseline,
                "config": self.config.model_dump(),
            }
        )

    def _reload_window(self) -> None:
        """Rebuild the in-memory window and ΔPPL reference from the store."""
        cfg = self.config
        window = MetricsWindow(cfg.window_seconds, cfg.baseline_reference_size)
        window.load(
            (Report.from_payload(p, id=i, received_at=t)
             for i, t, p in self.store.since(self.clock() - cfg.window_seconds)),
            (Report.from_payload(p, id=i, received_at=t)
             for i, t, p in self.store.recent_baseline(cfg.baseline_reference_size)),
        )
        self.window = window

    # -- policy -------------------------------------------------------------------------
    def effective_policy(self) -> Policy:
        return baseline_policy() if self.baseline else self.policy

    def policy_view(self) -> dict[str, Any]:
        """``GET /v1/policy``: the policy in force, baseline flag, the effective policy, version."""
        with self._lock:
            return {
                "version": self.version,
                "baseline": self.baseline,
                "policy": self.policy.to_dict(),
                "effective": self.effective_policy().to_dict(),
            }

    def update_policy(self, partial: dict[str, Any]) -> dict[str, Any]:
        """Merge ``partial`` over the policy in force; validate; bump the version.

        Raises:
            PolicyError: nothing changed (the policy in force stays as it was).
        """
        with self._lock:
            new = self.policy.merged(partial)
            if new.to_dict() != self.policy.to_dict():
                self.policy = new
                self.version += 1
                self._persist()
                log.info("policy %r in force (version %d)", new.name, self.version)
            return self.policy_view()

    def set_baseline(self, enable: bool) -> dict[str, Any]:
        """Switch baseline mode (plugins pass requests through untouched)."""
        with self._lock:
            if bool(enable) != self.baseline:
                self.baseline = bool(enable)
                self.version += 1
                self._persist()
                log.info("baseline mode %s (version %d)", "on" if enable else "off", self.version)
            return self.policy_view()

    # -- config ---------------------------------------------------------------------------
    def config_view(self) -> dict[str, Any]:
        with self._lock:
            return {"config": self.config.model_dump(), "state_dir": str(self.store.dir)}

    def update_config(self, partial: dict[str, Any]) -> dict[str, Any]:
        """Merge ``partial`` over the config; applies window/retention changes at once.

        Raises:
            ConfigError: nothing changed.
        """
        with self._lock:
            new = self.config.merged(partial)
            old = self.config
            self.config = new
            self.store.max_rows = new.history_max_rows
            if (new.window_seconds, new.baseline_reference_size) != (old.window_seconds, old.baseline_reference_size):
                self._reload_window()
            self._persist()
            return self.config_view()

    # -- reports ---------------------------------------------------------------------------
    def add_report(self, payload: dict[str, Any]) -> tuple[int, bool]:
        """Store (committed) and count one validated report; returns ``(id, duplicate)``."""
        received = self.clock()
        row_id, duplicate = self.store.add_report(payload, received)
        if duplicate:
            return row_id, True
        report = Report.from_payload(payload, id=row_id, received_at=received)
        with self._lock:
            self.window.add(report)
            self.window.prune(received)
        return row_id, False

    def add_event(self, event: dict[str, Any]) -> None:
        """Keep one posted runtime event (in memory, newest 200)."""
        with self._lock:
            self.events.append(event)

    def history(self, limit: int) -> dict[str, Any]:
        items = self.store.recent(limit)
        points = [{"timestamp": iso_utc(float(it["stats"].get("end_time") or it["received_at"])),
                   "tps": float(it["stats"].get("decode_tps") or 0.0), "ftl_ms": it["stats"].get("ttft_ms"),
                   "kv_bytes": int((it["stats"].get("kv") or {}).get("total_bytes") or 0),
                   "policy": str(it["stats"].get("policy_name", ""))} for it in items]
        return {"count": len(items), "total_stored": self.store.count(), "items": items, "history": points}

    # -- metrics ---------------------------------------------------------------------------
    def _resources(self) -> dict[str, Any]:
        if self.resource_provider is None:
            return {}
        try:
            res = self.resource_provider()
            return res if isinstance(res, dict) else {}
        except Exception as e:  # a broken provider must not break /metrics
            log.warning("resource provider failed: %s", e)
            return {}

    def device_utilization(self, res: dict[str, Any] | None = None) -> dict[str, Any]:
        res = self._resources() if res is None else res
        dev = res.get("device_utilization") or {}
        out: dict[str, Any] = {
            "cpu_utilization": round(self.cpu.sample(), 4),
            "cpu_count": psutil.cpu_count() or 0,
            "npu_utilization": None,
            "dml_utilization": None,
            "notes": {},
            "source": {"cpu": "psutil (system-wide)", "npu": res.get("source"), "dml": res.get("source")},
        }
        for dev_name in ("npu", "dml"):
            v = dev.get(dev_name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{dev_name}_utilization"] = round(float(v), 4)
            else:
                out["notes"][f"{dev_name}_utilization"] = NOT_AVAILABLE
                out["source"][dev_name] = None
        out["_memory_pool"] = res.get("memory_pool")
        return out

    def metrics(self) -> dict[str, Any]:
        """The ``GET /v1/metrics`` document (see :mod:`lemonade_inferos.agent.metrics`)."""
        now = self.clock()
        with self._lock:
            self.window.prune(now)
            reports = self.window.in_window(now)
            sections = window_sections(reports, now, self.window.window_seconds, self.window.baseline_reference())
            effective = self.effective_policy()
            version, baseline, name = self.version, self.baseline, self.policy.name
        provided = self._resources()
        device = self.device_utilization(provided)
        pool = device.pop("_memory_pool")
        sections["memory"]["memory_pool"] = pool if isinstance(pool, dict) else None
        if not isinstance(pool, dict):
            sections["memory"]["definitions"]["memory_pool"] = NOT_AVAILABLE
        active = [r for r in reports if not r.baseline]
        providers: dict[str, int] = {}
        for r in reports:
            providers[r.provider] = providers.get(r.provider, 0) + 1
        counters = self.store.counters()
        doc = {
            "timestamp": iso_utc(now),
            "unix_time": now,
            **sections,
            "device_utilization": device,
            "optimization_status": {
                "current_policy": "baseline" if baseline else name,
                "policy_version": version,
                "baseline_mode": baseline,
                "kv_quantization_active": any(r.kv_active and r.kv_store not in FULL_PRECISION_STORES for r in active),
                "io_binding_enabled": bool(effective.io.enable_iobinding),
                "hybrid_scheduling_active": effective.scheduler.mode == "hybrid"
                and any(r.provider in ACCELERATED_PROVIDERS for r in active),
                "providers": providers,
                "notes": {
                    "kv_quantization_active": "a non-baseline report in the window used a quantized KV store",
                    "io_binding_enabled": "what the effective policy asks for",
                    "hybrid_scheduling_active": "policy is hybrid and a report ran on DirectML/VitisAI",
                },
            },
            "counters": {
                "reports_total": counters["reports_total"],
                "dropped_reports_total": counters["dropped_total"],
                "uptime_seconds": round(now - self.started_at, 3),
            },
        }
        with self._lock:
            posted = list(self.events)
        doc["resources"] = resources_section(reports, provided, sections["latency"]["mean_ms"], posted=posted)
        if doc["memory"]["memory_pool"] is None and doc["resources"]["memory_pool"] is not None:
            doc["memory"]["memory_pool"] = doc["resources"]["memory_pool"]
            doc["memory"]["definitions"].pop("memory_pool", None)
        doc.update(compact_fields(doc))
        return finite(doc)
