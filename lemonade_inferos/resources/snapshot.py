"""The one telemetry type every backend returns: :class:`Snapshot` (one device at one moment).

Units: utilisation in percent (0..100), memory in bytes, temperature in degrees Celsius.
A field a backend cannot fill is None and ``unavailable[field]`` says why (e.g. "amdxdna
exposes no utilisation in sysfs"), so a reader can tell "0 %" from "unknown".
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c",
          "driver", "driver_version")


@dataclass
class Snapshot:
    """One device's telemetry.

    Attributes:
        device: stable id within the source, e.g. ``"card0"``, ``"accel0"``, ``"nvml0"``.
        kind: ``"gpu"`` | ``"npu"`` | ``"host"`` (system memory) | ``"pool"`` (a driver pool).
        source: the backend: ``"linux_drm"``, ``"nvml"``, ``"windows"``, ``"inferos_driver"``.
        name: human-readable device name or PCI id, None when unknown.
        utilization_percent: busy percentage 0..100 over the driver's own interval.
        memory_used_bytes / memory_total_bytes: device memory (VRAM, or the memory the OS
            lets the device use); for ``kind="host"`` the usable system memory, capped by
            the cgroup limit.
        temperature_c: hottest reported sensor, °C.
        driver / driver_version: kernel or user-mode driver name and version.
        unavailable: field name -> why it is None.
        extra: backend-specific values (e.g. ``gtt_used_bytes``), all in the units of their names.
        timestamp: UNIX seconds when sampled.
    """

    device: str
    kind: str
    source: str
    name: str | None = None
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    driver: str | None = None
    driver_version: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def explain_missing(self, reason: str) -> "Snapshot":
        """Fill ``unavailable`` with ``reason`` for every None field not explained yet."""
        for f in FIELDS:
            if getattr(self, f) is None:
                self.unavailable.setdefault(f, reason)
        return self

    @property
    def memory_fraction(self) -> float | None:
        """used / total (0..1), None when either is unknown or total is 0."""
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BackendStatus:
    """Whether a backend found anything: ``present`` and, when not, ``reason``."""

    source: str
    present: bool
    reason: str = ""
    devices: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
