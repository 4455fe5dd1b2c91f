"""Telemetry from the project's kernel driver (``/dev/inferos``) through its client,
:mod:`lemonade_inferos.resources.driver` (written alongside the driver; imported lazily so
this package works without it).

Contract used: ``InferosDriver.open(path)`` (raises ``DriverUnavailable`` with ``.reason``),
``gpu_status()`` -> fields ``utilization`` (%), ``memory_used``, ``memory_total`` (bytes),
``temperature`` (°C), None when the driver has no value; ``memory_pool()`` ->
``MemoryPoolStatus(total_bytes, used_bytes, free_bytes, block_count, fragmentation,
largest_free_bytes)``; ``scheduler_stats()`` -> ``SchedulerStats(processes,
requests_in_flight, requests_completed, avg_latency_ms)``; ``close()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .snapshot import BackendStatus, Snapshot

SOURCE = "inferos_driver"
NOT_INSTALLED = "driver client not installed"


def _client() -> Any:
    """The driver client module, or None when it is not part of this install."""
    try:
        from . import driver  # noqa: PLC0415
    except ImportError:
        return None
    return driver if hasattr(driver, "InferosDriver") else None


def _first(obj: Any, *names: str) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return dict(obj)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


class KernelDriverBackend:
    """Opens the driver per sample (cheap: one open + three ioctls) so a driver loaded or
    unloaded while inferos runs is noticed.

    Args:
        path: device node; None = the client's ``DEFAULT_PATH``.
    """

    source = SOURCE

    def __init__(self, path: str | None = None):
        self.path = path
        self.last_reason = ""

    def _open(self) -> Any:
        mod = _client()
        if mod is None:
            self.last_reason = NOT_INSTALLED
            return None
        try:
            return mod.InferosDriver.open(self.path)
        except mod.DriverUnavailable as e:
            self.last_reason = getattr(e, "reason", "") or str(e)
            return None
        except OSError as e:
            self.last_reason = str(e)
            return None

    def status(self) -> BackendStatus:
        drv = self._open()
        if drv is None:
            return BackendStatus(SOURCE, False, self.last_reason)
        drv.close()
        return BackendStatus(SOURCE, True, devices=1)

    def read(self) -> dict[str, Any]:
        """``{"present": bool, "reason"?, "gpu": Snapshot?, "memory_pool": dict?,
        "scheduler": dict?}`` in one open of the device."""
        drv = self._open()
        if drv is None:
            return {"present": False, "reason": self.last_reason}
        try:
            out: dict[str, Any] = {"present": True}
            g = drv.gpu_status()
            s = Snapshot(device="inferos0", kind="gpu", source=SOURCE, driver="inferos",
                         driver_version=_first(g, "driver_version", "version"))
            util = _first(g, "utilization", "utilization_percent")
            s.utilization_percent = None if util is None else float(util)
            s.memory_used_bytes = _first(g, "memory_used", "memory_used_bytes")
            s.memory_total_bytes = _first(g, "memory_total", "memory_total_bytes")
            t = _first(g, "temperature", "temperature_c")
            s.temperature_c = None if t is None else float(t)
            s.explain_missing("the inferos driver reported no value (no backing device)")
            out["gpu"] = s
            out["memory_pool"] = _as_dict(drv.memory_pool())
            out["scheduler"] = _as_dict(drv.scheduler_stats())
            return out
        except OSError as e:
            return {"present": False, "reason": f"driver query failed: {e}"}
        finally:
            drv.close()

    def sample(self) -> list[Snapshot]:
        r = self.read()
        return [r["gpu"]] if r.get("present") else []
