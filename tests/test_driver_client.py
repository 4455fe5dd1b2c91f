"""The inferos driver's Python client (lemonade_inferos/resources/driver.py) off the device.

* Structure sizes/offsets and command values are checked against driver/linux/inferos_ioctl.h
  compiled with gcc on this machine (offsetof/sizeof printed by a generated C program).
* The Windows branch's marshalling (DeviceIoControl through ctypes) runs against a stand-in
  kernel32 whose replies are packed with ``struct`` from the header's layout, independently
  of the ctypes mirror.  No Windows driver exists; this is all the Windows testing there is.
* The Linux branch's absent-device and not-an-inferos-device paths run on real files.
The client against the real module is exercised inside QEMU (tests/test_driver_vm.py).
"""

from __future__ import annotations

import ctypes
import errno
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lemonade_inferos.resources import driver as drv

HEADER = Path(__file__).resolve().parents[1] / "driver" / "linux" / "inferos_ioctl.h"

SEED_CODES = {  # phase8-kernel-integration-log.ja.md
    "GET_GPU_STATUS": 0x222010,
    "GET_MEMORY_POOL": 0x222014,
    "GET_SCHEDULER_STATS": 0x222018,
    "ALLOC_PINNED": 0x22201C,
    "FREE_PINNED": 0x222020,
}
EXTRA_CODES = ["REQUEST_BEGIN", "REQUEST_END", "GET_INFO", "MAP_PINNED"]


# ---------------------------------------------------------------- layout vs the C header

@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot compile inferos_ioctl.h to check the ctypes layout")
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{HEADER}"', "int main(void) {"]
    for cname, cls in drv.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in cls._fields_:
            lines.append(f'printf("field {cname} {fname} %zu %zu\\n", offsetof(struct {cname}, {fname}), '
                         f"sizeof(((struct {cname} *)0)->{fname}));")
    for name in list(SEED_CODES) + EXTRA_CODES:
        lines.append(f'printf("code {name} %u\\n", (unsigned)INFEROS_IOC_{name});')
    for const in ["ABI_VERSION", "UNAVAILABLE_U32", "GPU_HAS_UTILIZATION", "GPU_HAS_TEMPERATURE",
                  "GPU_HAS_MEMORY", "GPU_HAS_SYSTEM_MEMORY", "REQ_KERNEL_TIME"]:
        lines.append(f'printf("const {const} %llu\\n", (unsigned long long)INFEROS_{const});')
    lines.append('printf("const UNAVAILABLE_S32 %lld\\n", (long long)INFEROS_UNAVAILABLE_S32);')
    lines.append('printf("const UNAVAILABLE_U64 %llu\\n", (unsigned long long)INFEROS_UNAVAILABLE_U64);')
    lines.append('printf("const MAX_LATENCY_US %llu\\n", (unsigned long long)INFEROS_MAX_LATENCY_US);')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text("\n".join(lines))
    subprocess.run([gcc, "-Wall", "-Werror", "-o", str(d / "layout"), str(d / "layout.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    sizes, fields, codes, consts = {}, {}, {}, {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "code":
            codes[rest[0]] = int(rest[1])
        else:
            consts[rest[0]] = int(rest[1])
    return sizes, fields, codes, consts


@pytest.mark.parametrize("cname", list(drv.STRUCTS))
def test_struct_layout_matches_c_header(c_layout, cname):
    sizes, fields, _, _ = c_layout
    cls = drv.STRUCTS[cname]
    assert ctypes.sizeof(cls) == sizes[cname], f"sizeof(struct {cname})"
    assert sizes[cname] % 8 == 0, f"struct {cname} must be a multiple of 8 bytes (32/64-bit ABI)"
    c_fields = {f for (s, f) in fields if s == cname}
    assert c_fields == {f for f, *_ in cls._fields_}
    for fname, *_ in cls._fields_:
        desc = getattr(cls, fname)
        assert (desc.offset, desc.size) == fields[(cname, fname)], f"{cname}.{fname} offset/size"


def test_command_values_are_the_seeds_and_ctl_codes(c_layout):
    _, _, codes, _ = c_layout
    for name, value in SEED_CODES.items():
        assert codes[name] == value, name
        assert getattr(drv, f"IOCTL_{name}") == value, name
    for name in EXTRA_CODES:
        assert getattr(drv, f"IOCTL_{name}") == codes[name], name
    # CTL_CODE(FILE_DEVICE_UNKNOWN, 0x804 + i, METHOD_BUFFERED, FILE_ANY_ACCESS), computed by hand
    order = list(SEED_CODES) + EXTRA_CODES
    for i, name in enumerate(order):
        assert codes[name] == (0x22 << 16) | ((0x804 + i) << 2), name
    assert drv.ctl_code(0x22, 0x804, 0, 0) == 0x222010


def test_constants_match_header(c_layout):
    *_, consts = c_layout
    assert consts["ABI_VERSION"] == drv.ABI_VERSION
    assert consts["UNAVAILABLE_U32"] == drv.UNAVAILABLE_U32
    assert consts["UNAVAILABLE_S32"] == drv.UNAVAILABLE_S32
    assert consts["UNAVAILABLE_U64"] == drv.UNAVAILABLE_U64
    assert consts["GPU_HAS_UTILIZATION"] == drv.GPU_HAS_UTILIZATION
    assert consts["GPU_HAS_TEMPERATURE"] == drv.GPU_HAS_TEMPERATURE
    assert consts["GPU_HAS_MEMORY"] == drv.GPU_HAS_MEMORY
    assert consts["GPU_HAS_SYSTEM_MEMORY"] == drv.GPU_HAS_SYSTEM_MEMORY
    assert consts["REQ_KERNEL_TIME"] == drv.REQ_KERNEL_TIME
    assert consts["MAX_LATENCY_US"] == drv.MAX_LATENCY_US


# ---------------------------------------------------------------- packed replies (header layout)

def pack_info(abi=1, gran=4096, pool=256 << 20):
    return struct.pack("<IIQ", abi, gran, pool)


def pack_gpu(util, temp_mc, used, total, sys_total, sys_avail, zone: bytes, flags):
    return struct.pack("<IiQQQQ20sI", util, temp_mc, used, total, sys_total, sys_avail, zone, flags)


def pack_pool(total, used, free, largest, blocks, frag):
    return struct.pack("<QQQQII", total, used, free, largest, blocks, frag)


def pack_sched(procs, handles, inflight, completed, aborted, tokens, total_us, avg_us):
    return struct.pack("<IIIIQQQQQ", procs, handles, inflight, 0, completed, aborted, tokens, total_us, avg_us)


class FakeKernel32:
    """Stands in for kernel32: records every DeviceIoControl (code, input bytes, output size)
    and answers from ``replies[code]`` (bytes, or an int Win32 error)."""

    INVALID = ctypes.c_void_p(-1).value

    def __init__(self, replies=None, open_error=None):
        self.replies = dict(replies or {})
        self.replies.setdefault(drv.IOCTL_GET_INFO, pack_info())
        self.open_error = open_error
        self.calls = []
        self.last_error = 0
        self.closed = []
        self.opened = []

    def CreateFileW(self, path, access, share, sec, disposition, flags, template):
        self.opened.append((path.value, access, disposition))
        if self.open_error is not None:
            self.last_error = self.open_error
            return self.INVALID
        return 0x1234

    def DeviceIoControl(self, handle, code, inbuf, insize, outbuf, outsize, returned, overlapped):
        assert handle == 0x1234 and overlapped is None
        data_in = ctypes.string_at(ctypes.addressof(inbuf._obj), insize.value) if inbuf is not None else b""
        self.calls.append((code.value, data_in, outsize.value))
        reply = self.replies.get(code.value, b"")
        if isinstance(reply, int):
            self.last_error = reply
            return 0
        if callable(reply):
            reply = reply(data_in)
        assert len(reply) <= outsize.value
        if reply:
            ctypes.memmove(ctypes.addressof(outbuf._obj), reply, len(reply))
        returned._obj.value = len(reply)
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)
        return 1


def win_driver(k32):
    t = drv.WindowsTransport(drv.WINDOWS_DEVICE, kernel32=k32, get_last_error=lambda: k32.last_error)
    return drv.InferosDriver(t)


def test_windows_open_reads_info_and_closes():
    k = FakeKernel32()
    d = win_driver(k)
    assert k.opened == [("\\\\.\\Inferos", 0xC0000000, 3)]
    assert k.calls == [(0x22202C, b"", 16)]
    assert d.info == drv.DriverInfo(1, 4096, 256 << 20)
    d.close()
    assert k.closed == [0x1234]


def test_windows_gpu_status_units_and_unavailable():
    k = FakeKernel32({0x222010: pack_gpu(0xFFFFFFFF, 61250, 2**64 - 1, 2**64 - 1, 32 << 30, 20 << 30,
                                         b"acpitz", drv.GPU_HAS_TEMPERATURE | drv.GPU_HAS_SYSTEM_MEMORY)})
    g = win_driver(k).gpu_status()
    assert k.calls[-1] == (0x222010, b"", 64)
    assert g == drv.GpuStatus(utilization_percent=None, temperature_c=61.25, thermal_zone="acpitz",
                              memory_used_bytes=None, memory_total_bytes=None,
                              system_memory_total_bytes=32 << 30, system_memory_available_bytes=20 << 30)


def test_windows_gpu_status_all_present():
    k = FakeKernel32({0x222010: pack_gpu(452, -5000, 4 << 30, 10 << 30, 1, 1, b"", 0xF)})
    g = win_driver(k).gpu_status()
    assert g.utilization_percent == pytest.approx(45.2)
    assert g.temperature_c == -5.0 and g.thermal_zone is None   # no zone name given
    assert (g.memory_used_bytes, g.memory_total_bytes) == (4 << 30, 10 << 30)


def test_windows_memory_pool_and_scheduler_stats():
    k = FakeKernel32({
        0x222014: pack_pool(256 << 20, 3 << 20, 253 << 20, 250 << 20, 3, 12),
        0x222018: pack_sched(3, 4, 2, 1000, 5, 64000, 2_500_000, 2500),
    })
    d = win_driver(k)
    assert d.memory_pool() == drv.MemoryPoolStatus(256 << 20, 3 << 20, 253 << 20, 3, 0.012, 250 << 20)
    s = d.scheduler_stats()
    assert (s.processes, s.open_handles, s.requests_in_flight, s.requests_completed) == (3, 4, 2, 1000)
    assert (s.requests_aborted, s.tokens_completed) == (5, 64000)
    assert s.avg_latency_ms == 2.5 and s.total_latency_ms == 2500.0
    assert [c[:1] + c[2:] for c in k.calls[1:]] == [(0x222014, 40), (0x222018, 56)]
    json.dumps(drv.asdict(s))


def test_windows_alloc_map_array_and_free():
    backing = (ctypes.c_ubyte * 8192)()
    k = FakeKernel32({
        0x22201C: lambda data: struct.pack("<QQ", 8192, 4096 * 7),
        0x222030: lambda data: struct.pack("<QQQ", *struct.unpack("<QQQ", data)[:2], ctypes.addressof(backing)),
        0x222020: b"",
    })
    d = win_driver(k)
    blk = d.alloc_pinned(5000)
    assert k.calls[-1] == (0x22201C, struct.pack("<QQ", 5000, 0), 16)
    assert (blk.offset, blk.size) == (4096 * 7, 8192)
    a = blk.array(np.float32, (4, 8))
    assert k.calls[-1] == (0x222030, struct.pack("<QQQ", 4096 * 7, 8192, 0), 24)
    a[:] = 3.5
    assert bytes(backing[:4]) == struct.pack("<f", 3.5)       # the view is the driver's memory
    with pytest.raises(ValueError, match="needs bytes"):
        blk.array(np.float64, 1025)
    del a
    d.free_pinned(blk)
    assert k.calls[-1] == (0x222020, struct.pack("<Q", 4096 * 7), 0)


def test_windows_request_accounting_marshalling():
    k = FakeKernel32({0x222024: struct.pack("<QQQII", 17, 0, 0, 0, 0), 0x222028: b""})
    d = win_driver(k)
    h = d.request_begin()
    assert h == 17 and k.calls[-1] == (0x222024, b"", 32)
    d.request_end(h, latency_ms=12.3456, tokens=40)
    assert k.calls[-1] == (0x222028, struct.pack("<QQQII", 17, 12346, 40, 0, 0), 0)
    d.request_end(h, latency_ms=None)
    assert k.calls[-1] == (0x222028, struct.pack("<QQQII", 17, 0, 0, 1, 0), 0)


@pytest.mark.parametrize("win32,err", [(1450, errno.ENOMEM), (87, errno.EINVAL), (1168, errno.ENOENT),
                                       (5, errno.EPERM), (170, errno.EBUSY), (1, errno.ENOTTY)])
def test_windows_errors_map_to_protocol_errno(win32, err):
    k = FakeKernel32({0x22201C: win32})
    with pytest.raises(OSError) as ei:
        win_driver(k).alloc_pinned(4096)
    assert ei.value.errno == err
    assert f"Win32 error {win32}" in str(ei.value)


@pytest.mark.parametrize("win32,text", [(2, "absent"), (5, "no permission")])
def test_windows_open_failure_is_driver_unavailable(win32, text):
    with pytest.raises(drv.DriverUnavailable) as ei:
        win_driver(FakeKernel32(open_error=win32))
    assert text in ei.value.reason


def test_windows_wrong_abi_and_short_reply():
    k = FakeKernel32({drv.IOCTL_GET_INFO: pack_info(abi=2)})
    with pytest.raises(drv.DriverUnavailable, match="wrong version: driver ABI 2"):
        win_driver(k)
    assert k.closed == [0x1234]
    k = FakeKernel32({0x222014: b"\0" * 16})
    with pytest.raises(OSError) as ei:
        win_driver(k).memory_pool()
    assert ei.value.errno == errno.EPROTO


# ---------------------------------------------------------------- validation before the driver

def test_arguments_rejected_before_the_driver():
    k = FakeKernel32()
    d = win_driver(k)
    n = len(k.calls)
    for bad in (0, -1, (256 << 20) + 1, 1.5, True):
        with pytest.raises(ValueError):
            d.alloc_pinned(bad)
    for lat in (-1.0, float("nan"), float("inf"), 86_400_001.0):
        with pytest.raises(ValueError, match="latency_ms"):
            d.request_end(1, lat)
    with pytest.raises(ValueError, match="tokens"):
        d.request_end(1, 1.0, tokens=-3)
    assert len(k.calls) == n   # nothing reached the driver
    d.close()
    with pytest.raises(ValueError, match="closed"):
        d.memory_pool()


# ---------------------------------------------------------------- Linux branch without the module

def test_linux_absent_device(tmp_path):
    p = str(tmp_path / "inferos")
    with pytest.raises(drv.DriverUnavailable) as ei:
        drv.InferosDriver(drv.LinuxTransport(p))
    assert "absent" in ei.value.reason and ei.value.errno == errno.ENOENT
    st = drv.driver_status(p)
    assert st == {"present": False, "path": p, "reason": ei.value.reason}
    json.dumps(st)


def test_linux_not_an_inferos_device():
    # /dev/null answers every ioctl with ENOTTY: the client must refuse it, not misread it
    with pytest.raises(drv.DriverUnavailable, match="not an inferos driver"):
        drv.InferosDriver(drv.LinuxTransport("/dev/null"))
