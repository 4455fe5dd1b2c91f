"""NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as ``pynvml``) when the library loads.

Calls (NVML API reference): ``nvmlInit``, ``nvmlDeviceGetCount``,
``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``, ``nvmlDeviceGetUtilizationRates``
(``.gpu`` %, over the driver's last sample period), ``nvmlDeviceGetMemoryInfo``
(``.used`` / ``.total`` bytes), ``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)`` (°C),
``nvmlSystemGetDriverVersion``. Each call that fails (``NVMLError``, e.g. not supported on
that board) leaves its field None with the error as the reason.

No NVIDIA GPU exists on the machines this was written on: the mapping is tested with a
recorded-values stand-in of the module; on hardware it is untested.
"""

from __future__ import annotations

from typing import Any, Callable

from .snapshot import BackendStatus, Snapshot

SOURCE = "nvml"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NvmlBackend:
    """Args: nvml: the ``pynvml`` module (None = import it; absent -> no devices)."""

    source = SOURCE

    def __init__(self, nvml: Any = None):
        self._reason = ""
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[no-redef]
            except ImportError:
                self._reason = "nvidia-ml-py (pynvml) is not installed"
                nvml = None
        self.nvml = nvml
        self._ready = False

    def _init(self) -> bool:
        if self.nvml is None:
            return False
        if not self._ready:
            try:
                self.nvml.nvmlInit()
                self._ready = True
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                self._reason = f"NVML did not load: {e}"
                return False
        return True

    def status(self) -> BackendStatus:
        if not self._init():
            return BackendStatus(SOURCE, False, self._reason)
        n = self.nvml.nvmlDeviceGetCount()
        return BackendStatus(SOURCE, n > 0, "" if n else "NVML loaded but reports no GPU", devices=n)

    def sample(self) -> list[Snapshot]:
        if not self._init():
            return []
        nv = self.nvml
        try:
            version = _text(nv.nvmlSystemGetDriverVersion())
        except Exception as e:
            version = None
            vreason = str(e)
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            s = Snapshot(device=f"nvml{i}", kind="gpu", source=SOURCE, driver="nvidia", driver_version=version)
            if version is None:
                s.unavailable["driver_version"] = vreason

            def get(field: str, fn: Callable[[], Any]) -> None:
                try:
                    setattr(s, field, fn())
                except Exception as e:
                    s.unavailable[field] = f"NVML: {e}"

            get("name", lambda: _text(nv.nvmlDeviceGetName(h)))
            get("utilization_percent", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            mem = None
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except Exception as e:
                s.unavailable["memory_used_bytes"] = s.unavailable["memory_total_bytes"] = f"NVML: {e}"
            if mem is not None:
                s.memory_used_bytes, s.memory_total_bytes = int(mem.used), int(mem.total)
            get("temperature_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
            out.append(s)
        return out
