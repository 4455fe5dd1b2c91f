"""Resources: device telemetry, the process KV budget, the host memory pool, quotas.

Telemetry backends, one per source, all returning :class:`Snapshot`:

==========================  =====================================================
:mod:`.linux_drm`           amdgpu / i915 / xe cards, accel NPUs (AMD XDNA) in sysfs
:mod:`.host_memory`         ``/proc/meminfo`` capped by the cgroup limit
:mod:`.nvml`                NVIDIA through nvidia-ml-py, when it loads
:mod:`.windows`             DXGI budgets + GPU Engine / Adapter Memory counters
:mod:`.kernel_driver`       the project's ``/dev/inferos`` driver (client: ``.driver``)
==========================  =====================================================

:func:`collect` samples them all; :func:`resource_provider` adapts that for the agent's
``resource_provider`` seam. Budget and admission live in :mod:`.budget`, the pinned host
pool in :mod:`.pool`, per-client quotas in :mod:`.quotas`, the bounded LRU of idle cached
objects in :mod:`.lru`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .host_memory import host_memory
from .kernel_driver import KernelDriverBackend
from .linux_drm import LinuxDrmBackend
from .nvml import NvmlBackend
from .snapshot import BackendStatus, Snapshot
from .windows import WindowsBackend

__all__ = ["Snapshot", "BackendStatus", "Telemetry", "collect", "resource_provider", "default_backends"]


def default_backends(root: str | Path = "/", driver_path: str | None = None) -> list[Any]:
    """Every telemetry backend, sysfs ones reading under ``root``."""
    return [LinuxDrmBackend(root), NvmlBackend(), WindowsBackend(), KernelDriverBackend(driver_path)]


class Telemetry:
    """Samples the backends and host memory; keeps the last result for cheap reads.

    Args:
        backends: None = :func:`default_backends`.
        root: filesystem root for sysfs/procfs (tests: a recorded tree).
        clock: UNIX-seconds clock.
    """

    def __init__(self, backends: list[Any] | None = None, root: str | Path = "/", clock=time.time):
        self.root = Path(root)
        self.backends = backends if backends is not None else default_backends(root)
        self.clock = clock
        self.last: dict[str, Any] | None = None

    def sample(self) -> dict[str, Any]:
        """``{"timestamp", "devices": [Snapshot...], "host": Snapshot, "backends": [status...],
        "driver": {...}}``; a backend that raises is listed with its error, never fatal."""
        devices: list[Snapshot] = []
        statuses: list[dict[str, Any]] = []
        driver: dict[str, Any] = {"present": False, "reason": "not sampled"}
        for b in self.backends:
            try:
                if isinstance(b, KernelDriverBackend):
                    driver = b.read()
                    snaps = [driver["gpu"]] if driver.get("present") else []
                    st = BackendStatus(b.source, bool(driver.get("present")), driver.get("reason", ""), len(snaps))
                else:
                    snaps = b.sample()
                    st = BackendStatus(b.source, bool(snaps), "" if snaps else b.status().reason, len(snaps))
            except Exception as e:  # one broken source must not hide the others
                snaps, st = [], BackendStatus(getattr(b, "source", type(b).__name__), False, f"error: {e}")
            devices += snaps
            statuses.append(st.to_dict())
        self.last = {"timestamp": self.clock(), "devices": devices, "host": host_memory(self.root),
                     "backends": statuses, "driver": {k: v for k, v in driver.items() if k != "gpu"}}
        return self.last


def collect(root: str | Path = "/") -> dict[str, Any]:
    """One sample of every default backend (see :meth:`Telemetry.sample`)."""
    return Telemetry(root=root).sample()


def device_utilization(devices: list[Snapshot]) -> dict[str, float | None]:
    """Fractions 0..1 per device class: ``npu`` (kind npu), ``dml``/``igpu``/``gpu`` (kind
    gpu; the busiest one). None where no device of that class reports utilisation."""
    def busiest(kind: str) -> float | None:
        vals = [d.utilization_percent for d in devices if d.kind == kind and d.utilization_percent is not None]
        return round(max(vals) / 100.0, 4) if vals else None

    gpu = busiest("gpu")
    return {"npu": busiest("npu"), "dml": gpu, "igpu": gpu, "gpu": gpu}


def resource_provider(telemetry: Telemetry | None = None, extra: Any = None):
    """A callable for the agent's ``resource_provider`` seam (see
    :mod:`lemonade_inferos.agent.state`): device utilisation, memory pool, scheduler stats,
    devices and backends. ``extra`` (optional callable -> dict) is merged in, e.g. the
    resource manager's budget/pool when the agent runs in the inference process."""
    tel = telemetry or Telemetry()

    def provide() -> dict[str, Any]:
        s = tel.sample()
        devs: list[Snapshot] = s["devices"]
        drv = s["driver"]
        out: dict[str, Any] = {
            "device_utilization": device_utilization(devs),
            "devices": [d.to_dict() for d in devs],
            "host_memory": s["host"].to_dict(),
            "backends": s["backends"],
            "driver": {k: v for k, v in drv.items() if k in ("present", "reason")},
            "source": ",".join(sorted({d.source for d in devs})) or None,
        }
        if drv.get("present"):
            out["memory_pool"] = drv.get("memory_pool")
            out["scheduler"] = drv.get("scheduler")
        if extra is not None:
            for k, v in (extra() or {}).items():
                out.setdefault(k, v)
        return out

    return provide
