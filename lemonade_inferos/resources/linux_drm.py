"""GPUs and NPUs through Linux sysfs (DRM and accel classes), read from a root path.

Files read (formats as documented by the kernel):

* ``sys/class/drm/cardN/device/uevent`` – ``DRIVER=amdgpu``, ``PCI_ID=1002:15BF``
  (``Documentation/ABI`` uevent format, ``KEY=value`` lines).
* amdgpu (``Documentation/gpu/amdgpu/thermal.rst``, ``driver-misc.rst``):
  ``device/gpu_busy_percent`` (integer %), ``device/mem_info_vram_total`` /
  ``mem_info_vram_used`` / ``mem_info_gtt_total`` / ``mem_info_gtt_used`` (bytes),
  ``device/hwmon/hwmonM/temp*_input`` (millidegrees Celsius; ``temp*_label`` e.g. "edge").
* Intel i915/xe: identity and hwmon temperatures where present; they expose no busy
  percentage in sysfs (engine busyness is a perf PMU counter), so utilisation is
  reported unavailable with that reason.
* ``sys/class/accel/accelN/device/uevent`` – NPUs on the accel subsystem (AMD XDNA:
  ``DRIVER=amdxdna``); the driver reports busy time only through its ioctl interface.
* Driver version: ``sys/module/<driver>/version`` when the module declares one, else
  the kernel release (``proc/sys/kernel/osrelease``: in-tree drivers are versioned with
  the kernel).

Tests point ``root`` at recorded trees; on a machine without these classes every device
list is empty and :meth:`LinuxDrmBackend.status` says why.
"""

from __future__ import annotations

import re
from pathlib import Path

from .snapshot import BackendStatus, Snapshot

SOURCE = "linux_drm"
_CARD = re.compile(r"^card\d+$")
_ACCEL = re.compile(r"^accel\d+$")
NPU_DRIVERS = {"amdxdna": "AMD XDNA NPU", "intel_vpu": "Intel NPU", "ivpu": "Intel NPU"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    s = _read(path)
    if s is None:
        return None
    try:
        return int(s.split()[0])
    except (ValueError, IndexError):
        return None


def parse_uevent(text: str | None) -> dict[str, str]:
    """``KEY=value`` lines -> dict (blank and malformed lines skipped)."""
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def hwmon_temperature(device_dir: Path) -> tuple[float | None, str | None]:
    """Hottest ``hwmon*/temp*_input`` under ``device_dir`` in °C, and its label; (None, None)
    when there is no sensor."""
    best: tuple[float | None, str | None] = (None, None)
    for hw in sorted(device_dir.glob("hwmon/hwmon*")):
        for f in sorted(hw.glob("temp*_input")):
            milli = _read_int(f)
            if milli is None:
                continue
            c = milli / 1000.0
            if best[0] is None or c > best[0]:
                label = _read(f.with_name(f.name.replace("_input", "_label")))
                best = (c, label or f.name.replace("_input", ""))
    return best


class LinuxDrmBackend:
    """Samples every DRM card and accel device under ``root`` (default ``/``).

    Args:
        root: filesystem root holding ``sys/`` and ``proc/`` (tests: a recorded tree).
    """

    source = SOURCE

    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def _driver_version(self, driver: str | None) -> str | None:
        if not driver:
            return None
        v = _read(self.root / "sys/module" / driver / "version")
        if v:
            return v
        rel = _read(self.root / "proc/sys/kernel/osrelease")
        return f"kernel {rel}" if rel else None

    def _devices(self, cls: str, pattern: re.Pattern) -> list[Path]:
        d = self.root / "sys/class" / cls
        if not d.is_dir():
            return []
        return sorted((p for p in d.iterdir() if pattern.match(p.name)), key=lambda p: int(p.name.lstrip("cardel")))

    def status(self) -> BackendStatus:
        n = len(self._devices("drm", _CARD)) + len(self._devices("accel", _ACCEL))
        if n:
            return BackendStatus(SOURCE, True, devices=n)
        return BackendStatus(SOURCE, False, f"no DRM cards or accel devices under {self.root / 'sys/class'}")

    def sample(self) -> list[Snapshot]:
        """One :class:`Snapshot` per ``cardN`` (kind ``gpu``) and ``accelN`` (kind ``npu``)."""
        out = [self._card(p) for p in self._devices("drm", _CARD)]
        out += [self._accel(p) for p in self._devices("accel", _ACCEL)]
        return out

    def _identity(self, p: Path, kind: str) -> Snapshot:
        dev = p / "device"
        ue = parse_uevent(_read(dev / "uevent"))
        driver = ue.get("DRIVER")
        snap = Snapshot(device=p.name, kind=kind, source=SOURCE, name=ue.get("PCI_ID") or ue.get("OF_NAME"),
                        driver=driver, driver_version=self._driver_version(driver))
        if driver is None:
            snap.unavailable["driver"] = f"{dev / 'uevent'} has no DRIVER= line (no driver bound)"
        temp, label = hwmon_temperature(dev)
        snap.temperature_c = temp
        if temp is None:
            snap.unavailable["temperature_c"] = f"no hwmon temp*_input under {dev}"
        else:
            snap.extra["temperature_sensor"] = label
        return snap

    def _card(self, p: Path) -> Snapshot:
        snap = self._identity(p, "gpu")
        dev = p / "device"
        if snap.driver == "amdgpu":
            snap.utilization_percent = _opt_float(_read_int(dev / "gpu_busy_percent"))
            snap.memory_total_bytes = _read_int(dev / "mem_info_vram_total")
            snap.memory_used_bytes = _read_int(dev / "mem_info_vram_used")
            for k in ("gtt_total", "gtt_used", "vis_vram_total", "vis_vram_used"):
                v = _read_int(dev / f"mem_info_{k}")
                if v is not None:
                    snap.extra[f"{k}_bytes"] = v
            snap.explain_missing("amdgpu did not expose it (file missing or unreadable)")
        elif snap.driver in ("i915", "xe"):
            snap.unavailable.setdefault(
                "utilization_percent", f"{snap.driver} exposes engine busyness only as perf PMU counters, not in sysfs")
            snap.explain_missing(f"{snap.driver} does not expose it in sysfs")
        else:
            snap.explain_missing(f"driver {snap.driver or '(none)'} is not one inferos reads")
        return snap

    def _accel(self, p: Path) -> Snapshot:
        snap = self._identity(p, "npu")
        if snap.driver in NPU_DRIVERS:
            snap.name = f"{NPU_DRIVERS[snap.driver]} ({snap.name})" if snap.name else NPU_DRIVERS[snap.driver]
        snap.utilization_percent = None
        snap.explain_missing(f"{snap.driver or 'the accel driver'} reports it only through its ioctl interface, "
                             "not sysfs")
        return snap


def _opt_float(v: int | None) -> float | None:
    return None if v is None else float(v)
