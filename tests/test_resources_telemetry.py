"""Telemetry backends on recorded sysfs/procfs trees (kernel-documented formats) and
recorded API samples; the real /sys of this machine reads as absent."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from lemonade_inferos.resources import Telemetry, device_utilization, resource_provider
from lemonade_inferos.resources.host_memory import cgroup_memory, host_memory, parse_meminfo
from lemonade_inferos.resources.kernel_driver import NOT_INSTALLED, KernelDriverBackend
from lemonade_inferos.resources.linux_drm import LinuxDrmBackend
from lemonade_inferos.resources.nvml import NvmlBackend
from lemonade_inferos.resources.windows import (
    aggregate_adapter_memory,
    aggregate_engine_utilization,
    build_snapshots,
    WindowsBackend,
)


def w(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def amd_tree(root: Path, busy: int = 37, temp_milli: int = 54000) -> None:
    d = "sys/class/drm/card0/device/"
    w(root, d + "uevent", "DRIVER=amdgpu\nPCI_CLASS=30000\nPCI_ID=1002:15BF\nPCI_SLOT_NAME=0000:c4:00.0\n")
    w(root, d + "gpu_busy_percent", f"{busy}\n")
    w(root, d + "mem_info_vram_total", "536870912\n")
    w(root, d + "mem_info_vram_used", "123731968\n")
    w(root, d + "mem_info_gtt_total", "16777216000\n")
    w(root, d + "mem_info_gtt_used", "41943040\n")
    w(root, d + "hwmon/hwmon3/temp1_input", f"{temp_milli}\n")
    w(root, d + "hwmon/hwmon3/temp1_label", "edge\n")
    (root / "sys/class/drm/card0-eDP-1").mkdir(parents=True)  # a connector, not a card
    (root / "sys/class/drm/renderD128").mkdir(parents=True)
    w(root, "sys/class/accel/accel0/device/uevent", "DRIVER=amdxdna\nPCI_ID=1022:17F0\n")
    w(root, "proc/sys/kernel/osrelease", "6.10.0-test\n")


def test_amdgpu_and_xdna_from_recorded_tree(tmp_path):
    amd_tree(tmp_path)
    snaps = LinuxDrmBackend(tmp_path).sample()
    assert [s.device for s in snaps] == ["card0", "accel0"]
    gpu, npu = snaps
    assert (gpu.kind, gpu.driver, gpu.name) == ("gpu", "amdgpu", "1002:15BF")
    assert gpu.utilization_percent == 37.0
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (123731968, 536870912)
    assert gpu.extra["gtt_used_bytes"] == 41943040 and gpu.extra["gtt_total_bytes"] == 16777216000
    assert gpu.temperature_c == 54.0 and gpu.extra["temperature_sensor"] == "edge"
    assert gpu.driver_version == "kernel 6.10.0-test"
    assert gpu.unavailable == {}
    assert npu.kind == "npu" and npu.driver == "amdxdna" and "XDNA" in npu.name
    assert npu.utilization_percent is None and "ioctl" in npu.unavailable["utilization_percent"]
    assert device_utilization(snaps) == {"npu": None, "dml": 0.37, "igpu": 0.37, "gpu": 0.37}


def test_module_version_wins_and_i915_explains_missing_utilisation(tmp_path):
    w(tmp_path, "sys/class/drm/card1/device/uevent", "DRIVER=i915\nPCI_ID=8086:7D55\n")
    w(tmp_path, "sys/module/i915/version", "1.6.0\n")
    (s,) = LinuxDrmBackend(tmp_path).sample()
    assert s.driver_version == "1.6.0"
    assert "perf PMU" in s.unavailable["utilization_percent"]
    assert s.temperature_c is None and "hwmon" in s.unavailable["temperature_c"]


def test_this_machine_sysfs_reads_absent_or_consistent():
    b = LinuxDrmBackend("/")
    st = b.status()
    if not Path("/sys/class/drm").is_dir() and not Path("/sys/class/accel").is_dir():
        assert not st.present and "no DRM cards" in st.reason and b.sample() == []
    else:
        assert st.present == bool(b.sample())


def test_meminfo_and_cgroup_v2_limit(tmp_path):
    w(tmp_path, "proc/meminfo", "MemTotal:       65536000 kB\nMemFree:        1000 kB\nMemAvailable:   60000000 kB\nHugePages_Total:       0\n")
    assert parse_meminfo((tmp_path / "proc/meminfo").read_text())["HugePages_Total"] == 0
    w(tmp_path, "proc/self/cgroup", "0::/user.slice/app.scope\n")
    w(tmp_path, "sys/fs/cgroup/user.slice/app.scope/memory.max", "2147483648\n")
    w(tmp_path, "sys/fs/cgroup/user.slice/app.scope/memory.current", "536870912\n")
    s = host_memory(tmp_path)
    assert s.memory_total_bytes == 2147483648
    assert s.extra["available_bytes"] == 2147483648 - 536870912
    assert s.memory_used_bytes == 536870912
    w(tmp_path, "sys/fs/cgroup/user.slice/app.scope/memory.max", "max\n")
    s = host_memory(tmp_path)
    assert s.memory_total_bytes == 65536000 * 1024 and s.extra["available_bytes"] == 60000000 * 1024


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    w(tmp_path, "proc/self/cgroup", "4:memory:/box\n0::/\n")
    w(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # namespace root
    lim, use, where = cgroup_memory(tmp_path)
    assert lim is None and "v1" in where
    w(tmp_path, "sys/fs/cgroup/memory/box/memory.limit_in_bytes", "1073741824\n")
    w(tmp_path, "sys/fs/cgroup/memory/box/memory.usage_in_bytes", "100\n")
    assert cgroup_memory(tmp_path)[:2] == (1073741824, 100)


class _Rec:
    """Recorded NVML answers (values as nvidia-smi showed them on an RTX 3060)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA GeForce RTX 3060"

    def nvmlSystemGetDriverVersion(self):
        return "550.54.14"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=12, memory=3)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=12884901888, used=1048576000, free=11836325888)

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise self.NVMLError("Not Supported")


def test_nvml_mapping_on_recorded_values_and_absent_library():
    (s,) = NvmlBackend(_Rec()).sample()
    assert (s.name, s.driver_version, s.utilization_percent) == ("NVIDIA GeForce RTX 3060", "550.54.14", 12.0)
    assert (s.memory_used_bytes, s.memory_total_bytes) == (1048576000, 12884901888)
    assert s.temperature_c is None and "Not Supported" in s.unavailable["temperature_c"]
    try:
        import pynvml  # noqa: F401
    except ImportError:
        b = NvmlBackend()
        assert b.sample() == [] and "not installed" in b.status().reason


# Recorded typeperf output on a Ryzen AI laptop (Radeon 890M + NPU), instance names verbatim.
ENGINE = {
    "pid_4242_luid_0x00000000_0x0000D1B8_phys_0_eng_0_engtype_3D": 30.5,
    "pid_5151_luid_0x00000000_0x0000D1B8_phys_0_eng_0_engtype_3D": 12.0,
    "pid_4242_luid_0x00000000_0x0000D1B8_phys_0_eng_3_engtype_Compute": 61.0,
    "pid_4242_luid_0x00000000_0x0001A2F0_phys_0_eng_0_engtype_Compute": 80.0,
    "pid_1_luid_0x00000000_0x0001A2F0_phys_0_eng_0_engtype_Compute": 35.0,
    "garbage": 99.0,
}
MEM_DED = {"luid_0x00000000_0x0000D1B8_phys_0": 402653184.0}
MEM_SHR = {"luid_0x00000000_0x0000D1B8_phys_0": 1073741824.0, "luid_0x00000000_0x0001A2F0_phys_0": 4096.0}


def test_windows_counter_aggregation_on_recorded_samples():
    eng = aggregate_engine_utilization(ENGINE)
    gpu = eng["0x00000000_0x0000D1B8"]
    assert gpu["percent"] == 61.0  # busiest engine (Compute), not the 3D sum 42.5
    assert gpu["by_engtype"] == {"3D": 42.5, "Compute": 61.0}
    assert eng["0x00000000_0x0001A2F0"]["percent"] == 100.0  # 80 + 35 capped
    mem = aggregate_adapter_memory(MEM_DED, MEM_SHR)
    assert mem["0x00000000_0x0000D1B8"] == {"dedicated_bytes": 402653184, "shared_bytes": 1073741824}
    adapters = [{"name": "AMD Radeon(TM) 890M Graphics", "luid": "0x00000000_0x0000D1B8",
                 "budget_bytes": 3221225472, "usage_bytes": 398458880, "dedicated_video_memory": 536870912}]
    snaps = build_snapshots(adapters, eng, mem)
    assert [(s.kind, s.utilization_percent) for s in snaps] == [("gpu", 61.0), ("npu", 100.0)]
    assert snaps[0].memory_total_bytes == 3221225472 and snaps[0].memory_used_bytes == 398458880
    assert WindowsBackend().status().present is False or __import__("sys").platform == "win32"


def test_driver_backend_absent_reason():
    r = KernelDriverBackend("/nonexistent/inferos").read()
    assert r["present"] is False and r["reason"]
    try:
        import lemonade_inferos.resources.driver as drv  # noqa: F401
        has_client = hasattr(drv, "InferosDriver")
    except ImportError:
        has_client = False
    if not has_client:
        assert r["reason"] == NOT_INSTALLED


def test_telemetry_and_provider_on_recorded_tree(tmp_path):
    amd_tree(tmp_path, busy=80)
    w(tmp_path, "proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 250 kB\n")
    tel = Telemetry(backends=[LinuxDrmBackend(tmp_path), KernelDriverBackend("/nonexistent")], root=tmp_path)
    out = resource_provider(tel)()
    assert out["device_utilization"]["igpu"] == 0.8
    assert out["host_memory"]["memory_used_bytes"] == 750 * 1024
    assert out["driver"]["present"] is False
    assert {b["source"] for b in out["backends"]} == {"linux_drm", "inferos_driver"}
