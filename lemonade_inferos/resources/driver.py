"""User-space client of the inferos kernel driver (``/dev/inferos``; ``\\\\.\\Inferos`` on Windows).

The protocol (command values, structures, units, errnos) is ``driver/linux/inferos_ioctl.h``
and ``driver/README.md``; the ctypes structures below mirror that header field for field and
``tests/test_driver_client.py`` checks their sizes and offsets against the header compiled
with gcc.

* Linux: ``fcntl.ioctl`` on the device and ``mmap`` of each pinned block (offset = the block's
  offset returned by ALLOC_PINNED).  Tested against the real module inside QEMU
  (``driver/linux/test-in-vm.sh`` runs ``driver/linux/tests/vm_pyclient.py`` in the VM).
* Windows: ``DeviceIoControl`` through ctypes with the same command values
  (``CTL_CODE(FILE_DEVICE_UNKNOWN, 0x804.., METHOD_BUFFERED, FILE_ANY_ACCESS)``) and the
  MAP_PINNED IOCTL instead of mmap.  No Windows driver exists (a KMDF driver is out of scope):
  this branch is unit-tested on its marshalling only, never against a device.

Units on the Python side: bytes, milliseconds, degrees Celsius, fractions 0..1; a field the
driver reports as unavailable is ``None``.

Example::

    with InferosDriver.open() as drv:
        blk = drv.alloc_pinned(1 << 20)
        kv = blk.array("float16", (8, 64, 64))     # numpy view over the pinned mapping
        h = drv.request_begin(); ...; drv.request_end(h, latency_ms=42.0, tokens=128)
        del kv; drv.free_pinned(blk)
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

ABI_VERSION = 1
LINUX_DEVICE = "/dev/inferos"
WINDOWS_DEVICE = "\\\\.\\Inferos"

FILE_DEVICE_UNKNOWN = 0x22
METHOD_BUFFERED = 0
FILE_ANY_ACCESS = 0


def ctl_code(device_type: int, function: int, method: int, access: int) -> int:
    """Windows ``CTL_CODE`` macro: ``(device_type << 16) | (access << 14) | (function << 2) | method``."""
    return (device_type << 16) | (access << 14) | (function << 2) | method


def _code(function: int) -> int:
    return ctl_code(FILE_DEVICE_UNKNOWN, function, METHOD_BUFFERED, FILE_ANY_ACCESS)


# The protocol's command values on every OS (the first five are the seed's).
IOCTL_GET_GPU_STATUS = _code(0x804)       # 0x222010
IOCTL_GET_MEMORY_POOL = _code(0x805)      # 0x222014
IOCTL_GET_SCHEDULER_STATS = _code(0x806)  # 0x222018
IOCTL_ALLOC_PINNED = _code(0x807)         # 0x22201C
IOCTL_FREE_PINNED = _code(0x808)          # 0x222020
IOCTL_REQUEST_BEGIN = _code(0x809)        # 0x222024
IOCTL_REQUEST_END = _code(0x80A)          # 0x222028
IOCTL_GET_INFO = _code(0x80B)             # 0x22202C
IOCTL_MAP_PINNED = _code(0x80C)           # 0x222030, Windows only

UNAVAILABLE_U32 = 0xFFFFFFFF
UNAVAILABLE_S32 = -(2**31)
UNAVAILABLE_U64 = 0xFFFFFFFFFFFFFFFF

GPU_HAS_UTILIZATION = 1 << 0
GPU_HAS_TEMPERATURE = 1 << 1
GPU_HAS_MEMORY = 1 << 2
GPU_HAS_SYSTEM_MEMORY = 1 << 3
REQ_KERNEL_TIME = 1 << 0
MAX_LATENCY_US = 86_400_000_000


# ---------------------------------------------------------------- structures (inferos_ioctl.h)

class GpuStatusRaw(ctypes.Structure):
    _fields_ = [
        ("utilization_permille", ctypes.c_uint32),
        ("temperature_mc", ctypes.c_int32),
        ("memory_used_bytes", ctypes.c_uint64),
        ("memory_total_bytes", ctypes.c_uint64),
        ("system_memory_total_bytes", ctypes.c_uint64),
        ("system_memory_available_bytes", ctypes.c_uint64),
        ("thermal_zone", ctypes.c_char * 20),
        ("flags", ctypes.c_uint32),
    ]


class MemoryPoolRaw(ctypes.Structure):
    _fields_ = [
        ("total_bytes", ctypes.c_uint64),
        ("used_bytes", ctypes.c_uint64),
        ("free_bytes", ctypes.c_uint64),
        ("largest_free_bytes", ctypes.c_uint64),
        ("block_count", ctypes.c_uint32),
        ("fragmentation_permille", ctypes.c_uint32),
    ]


class SchedulerStatsRaw(ctypes.Structure):
    _fields_ = [
        ("processes", ctypes.c_uint32),
        ("open_handles", ctypes.c_uint32),
        ("requests_in_flight", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint32),
        ("requests_completed", ctypes.c_uint64),
        ("requests_aborted", ctypes.c_uint64),
        ("tokens_completed", ctypes.c_uint64),
        ("total_latency_us", ctypes.c_uint64),
        ("avg_latency_us", ctypes.c_uint64),
    ]


class AllocRaw(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class FreeRaw(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64)]


class RequestRaw(ctypes.Structure):
    _fields_ = [
        ("handle", ctypes.c_uint64),
        ("latency_us", ctypes.c_uint64),
        ("tokens", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class InfoRaw(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("granularity_bytes", ctypes.c_uint32),
        ("pool_bytes", ctypes.c_uint64),
    ]


class MapRaw(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64), ("user_address", ctypes.c_uint64)]


#: C struct name in inferos_ioctl.h -> ctypes mirror (the layout test walks this table)
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "inferos_gpu_status": GpuStatusRaw,
    "inferos_memory_pool": MemoryPoolRaw,
    "inferos_scheduler_stats": SchedulerStatsRaw,
    "inferos_alloc": AllocRaw,
    "inferos_free": FreeRaw,
    "inferos_request": RequestRaw,
    "inferos_info": InfoRaw,
    "inferos_map": MapRaw,
}


# ---------------------------------------------------------------- Python-side results

@dataclass(frozen=True)
class GpuStatus:
    """GET_GPU_STATUS in Python units; ``None`` = the driver cannot honestly provide it.

    utilization_percent: 0..100; temperature_c: degrees Celsius of ``thermal_zone``;
    memory_*_bytes: GPU memory; system_memory_*_bytes: RAM (shared with an APU's GPU).
    """

    utilization_percent: float | None
    temperature_c: float | None
    thermal_zone: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    system_memory_total_bytes: int | None
    system_memory_available_bytes: int | None


@dataclass(frozen=True)
class MemoryPoolStatus:
    """GET_MEMORY_POOL: byte counts of the pinned pool; fragmentation = 1 - largest_free / free (0..1)."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    block_count: int
    fragmentation: float
    largest_free_bytes: int


@dataclass(frozen=True)
class SchedulerStats:
    """GET_SCHEDULER_STATS: system-wide over every process that holds the device.

    processes: distinct processes with the device open; requests_*: counts since load
    (aborted = in flight when the owning descriptor closed); avg_latency_ms / total_latency_ms:
    over completed requests.
    """

    processes: int
    requests_in_flight: int
    requests_completed: int
    avg_latency_ms: float
    open_handles: int
    requests_aborted: int
    tokens_completed: int
    total_latency_ms: float


@dataclass(frozen=True)
class DriverInfo:
    abi_version: int
    granularity_bytes: int
    pool_bytes: int


def gpu_status_from_raw(r: GpuStatusRaw) -> GpuStatus:
    has = r.flags

    def u64(v: int, bit: int) -> int | None:
        return None if (not has & bit or v == UNAVAILABLE_U64) else int(v)

    util = None
    if has & GPU_HAS_UTILIZATION and r.utilization_permille != UNAVAILABLE_U32:
        util = r.utilization_permille / 10.0
    temp = None
    if has & GPU_HAS_TEMPERATURE and r.temperature_mc != UNAVAILABLE_S32:
        temp = r.temperature_mc / 1000.0
    zone = r.thermal_zone.decode("ascii", "replace") or None
    return GpuStatus(
        utilization_percent=util,
        temperature_c=temp,
        thermal_zone=zone if temp is not None else None,
        memory_used_bytes=u64(r.memory_used_bytes, GPU_HAS_MEMORY),
        memory_total_bytes=u64(r.memory_total_bytes, GPU_HAS_MEMORY),
        system_memory_total_bytes=u64(r.system_memory_total_bytes, GPU_HAS_SYSTEM_MEMORY),
        system_memory_available_bytes=u64(r.system_memory_available_bytes, GPU_HAS_SYSTEM_MEMORY),
    )


def memory_pool_from_raw(r: MemoryPoolRaw) -> MemoryPoolStatus:
    return MemoryPoolStatus(
        total_bytes=r.total_bytes,
        used_bytes=r.used_bytes,
        free_bytes=r.free_bytes,
        block_count=r.block_count,
        fragmentation=r.fragmentation_permille / 1000.0,
        largest_free_bytes=r.largest_free_bytes,
    )


def scheduler_stats_from_raw(r: SchedulerStatsRaw) -> SchedulerStats:
    return SchedulerStats(
        processes=r.processes,
        requests_in_flight=r.requests_in_flight,
        requests_completed=r.requests_completed,
        avg_latency_ms=r.avg_latency_us / 1000.0,
        open_handles=r.open_handles,
        requests_aborted=r.requests_aborted,
        tokens_completed=r.tokens_completed,
        total_latency_ms=r.total_latency_us / 1000.0,
    )


# ---------------------------------------------------------------- errors

class DriverUnavailable(OSError):
    """The driver cannot be used: device absent, no permission, or a different protocol version.

    ``reason`` says which, in words a user can act on; ``errno`` is the underlying errno when
    there is one.
    """

    def __init__(self, reason: str, err: int | None = None):
        super().__init__(err if err is not None else errno.ENODEV, reason)
        self.reason = reason


_ERRNO_MEANING = {
    errno.EINVAL: "invalid argument (size 0 or larger than the pool, unaligned or out-of-pool "
    "offset, unknown flag, non-zero reserved field, latency over 24 h)",
    errno.ENOMEM: "the pinned pool has no free range that large",
    errno.ENOENT: "no such block or request (never allocated, already freed or ended)",
    errno.EPERM: "the block or request belongs to another open descriptor",
    errno.EBUSY: "the block is still mapped",
    errno.EFAULT: "bad buffer",
    errno.ENOTTY: "command not supported by this driver",
    errno.EAGAIN: "too many requests in flight",
}


def _ioctl_error(op: str, err: int, detail: str = "") -> OSError:
    what = _ERRNO_MEANING.get(err, os.strerror(err))
    return OSError(err, f"inferos {op}{(' ' + detail) if detail else ''}: {what}")


# ---------------------------------------------------------------- transports

class LinuxTransport:
    """ioctl(2) and mmap(2) on an open ``/dev/inferos`` descriptor."""

    def __init__(self, path: str):
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError as e:
            raise DriverUnavailable(
                f"device {path} absent: the inferos module is not loaded "
                "(`sudo inferos driver install`)", e.errno) from e
        except PermissionError as e:
            raise DriverUnavailable(
                f"no permission to open {path}: run as root or join the device's group "
                "(`sudo inferos driver install` creates group 'inferos'; then log in again)",
                e.errno) from e
        except OSError as e:
            raise DriverUnavailable(f"cannot open {path}: {e.strerror}", e.errno) from e
        self.path = path

    def transact(self, op: str, code: int, inp: ctypes.Structure | None,
                 out_cls: type[ctypes.Structure] | None) -> Any:
        import fcntl

        size = max(ctypes.sizeof(inp) if inp is not None else 0,
                   ctypes.sizeof(out_cls) if out_cls is not None else 0)
        buf = bytearray(size)
        if inp is not None:
            buf[: ctypes.sizeof(inp)] = bytes(inp)
        try:
            fcntl.ioctl(self.fd, code, buf, True)
        except OSError as e:
            raise _ioctl_error(op, e.errno) from None
        return out_cls.from_buffer_copy(buf) if out_cls is not None else None

    def map_block(self, offset: int, size: int) -> tuple[Any, Callable[[], None]]:
        mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        return mm, mm.close

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Win32 error codes the Windows driver's NTSTATUS values arrive as -> the protocol's errno.
WIN32_TO_ERRNO = {
    1: errno.ENOTTY,      # ERROR_INVALID_FUNCTION      <- STATUS_INVALID_DEVICE_REQUEST
    2: errno.ENOENT,      # ERROR_FILE_NOT_FOUND (device absent at CreateFile)
    5: errno.EPERM,       # ERROR_ACCESS_DENIED         <- STATUS_ACCESS_DENIED
    8: errno.ENOMEM,      # ERROR_NOT_ENOUGH_MEMORY
    87: errno.EINVAL,     # ERROR_INVALID_PARAMETER     <- STATUS_INVALID_PARAMETER
    122: errno.EFAULT,    # ERROR_INSUFFICIENT_BUFFER   <- STATUS_BUFFER_TOO_SMALL
    170: errno.EBUSY,     # ERROR_BUSY                  <- STATUS_DEVICE_BUSY
    998: errno.EFAULT,    # ERROR_NOACCESS
    1168: errno.ENOENT,   # ERROR_NOT_FOUND             <- STATUS_NOT_FOUND
    1450: errno.ENOMEM,   # ERROR_NO_SYSTEM_RESOURCES   <- STATUS_INSUFFICIENT_RESOURCES
    1784: errno.EFAULT,   # ERROR_INVALID_USER_BUFFER   <- STATUS_INVALID_USER_BUFFER
}

GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value


class WindowsTransport:
    """DeviceIoControl on ``\\\\.\\Inferos`` (METHOD_BUFFERED: input and output buffers as in
    the header).  ``kernel32`` defaults to ``ctypes.WinDLL("kernel32", use_last_error=True)``;
    tests pass an object with the same four functions.  Untested against a real device."""

    def __init__(self, path: str, kernel32: Any = None, get_last_error: Callable[[], int] | None = None):
        if kernel32 is None:  # pragma: no cover - Windows only
            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
            get_last_error = ctypes.get_last_error  # type: ignore[attr-defined]
        self.k32 = kernel32
        self._last_error = get_last_error or (lambda: 0)
        handle = self.k32.CreateFileW(ctypes.c_wchar_p(path), GENERIC_READ | GENERIC_WRITE, 0, None,
                                      OPEN_EXISTING, 0, None)
        if handle is None or handle == INVALID_HANDLE_VALUE:
            code = self._last_error()
            if code == 5:
                raise DriverUnavailable(f"no permission to open {path} (run as Administrator)", errno.EACCES)
            if code in (2, 3):
                raise DriverUnavailable(f"device {path} absent: the inferos driver is not installed",
                                        errno.ENOENT)
            raise DriverUnavailable(f"cannot open {path}: Win32 error {code}", WIN32_TO_ERRNO.get(code))
        self.handle = handle
        self.path = path

    def transact(self, op: str, code: int, inp: ctypes.Structure | None,
                 out_cls: type[ctypes.Structure] | None) -> Any:
        out = out_cls() if out_cls is not None else None
        returned = ctypes.c_uint32(0)
        ok = self.k32.DeviceIoControl(
            self.handle, ctypes.c_uint32(code),
            ctypes.byref(inp) if inp is not None else None,
            ctypes.c_uint32(ctypes.sizeof(inp) if inp is not None else 0),
            ctypes.byref(out) if out is not None else None,
            ctypes.c_uint32(ctypes.sizeof(out) if out is not None else 0),
            ctypes.byref(returned), None)
        if not ok:
            win = self._last_error()
            raise _ioctl_error(op, WIN32_TO_ERRNO.get(win, errno.EIO), f"(Win32 error {win})")
        if out is not None and returned.value != ctypes.sizeof(out):
            raise OSError(errno.EPROTO, f"inferos {op}: driver returned {returned.value} bytes, "
                          f"expected {ctypes.sizeof(out)} (protocol mismatch)")
        return out

    def map_block(self, offset: int, size: int) -> tuple[Any, Callable[[], None]]:
        m = self.transact("MAP_PINNED", IOCTL_MAP_PINNED, MapRaw(offset=offset, size=size, user_address=0),
                          MapRaw)
        if not m.user_address:
            raise OSError(errno.EPROTO, "inferos MAP_PINNED returned a null address")
        view = (ctypes.c_ubyte * size).from_address(m.user_address)
        return view, lambda: None   # the driver unmaps at FREE_PINNED / handle close

    def close(self) -> None:
        if self.handle is not None:
            self.k32.CloseHandle(self.handle)
            self.handle = None


# ---------------------------------------------------------------- client

class PinnedBlock:
    """A block of the driver's pinned pool owned by one :class:`InferosDriver`.

    ``offset``/``size`` in bytes (size is rounded up to the driver's granularity, a page).
    The block is mapped on the first :meth:`array` call.
    """

    def __init__(self, driver: "InferosDriver", offset: int, size: int):
        self._driver = driver
        self.offset = offset
        self.size = size
        self._view: Any = None
        self._unmap: Callable[[], None] | None = None

    def array(self, dtype: Any, shape: int | tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A numpy array of ``shape``/``dtype`` viewing the pinned memory at byte ``offset``
        within the block (no copy; writes go to the pool).  Raises ValueError if it does not fit."""
        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shp):
            raise ValueError(f"shape {shp}: dimensions must be >= 0")
        count = math.prod(shp)
        need = count * dt.itemsize
        if offset < 0 or offset % dt.alignment or offset + need > self.size:
            raise ValueError(f"array {shp} {dt} at offset {offset} needs bytes [{offset}, "
                             f"{offset + need}) but the block has {self.size} bytes "
                             f"(offset must be >= 0 and a multiple of {dt.alignment})")
        with self._driver._lock:
            if self._view is None:
                if self._driver._transport is None:
                    raise ValueError("driver is closed")
                self._view, self._unmap = self._driver._transport.map_block(self.offset, self.size)
            return np.frombuffer(self._view, dtype=dt, count=count, offset=offset).reshape(shp)

    def _release_mapping(self) -> None:
        if self._unmap is not None:
            try:
                self._unmap()
            except BufferError:
                raise OSError(errno.EBUSY, f"inferos FREE_PINNED offset {self.offset}: numpy arrays "
                              "over this block are still alive; delete them first") from None
            self._view = None
            self._unmap = None

    def __repr__(self) -> str:
        return f"PinnedBlock(offset={self.offset}, size={self.size})"


class InferosDriver:
    """An open handle on the inferos driver.  Use :meth:`open`; also a context manager.

    Every method raises OSError with the driver's errno (EINVAL, ENOMEM, ENOENT, EPERM, EBUSY,
    ...; see driver/README.md) when the driver rejects a call, and ValueError for arguments
    rejected before reaching it.  Thread-safe: concurrent requests may share one handle (the
    driver serializes in the kernel; the block table here is under a lock).
    """

    DEFAULT_PATH = WINDOWS_DEVICE if sys.platform == "win32" else LINUX_DEVICE

    def __init__(self, transport: Any):
        self._transport = transport
        self._blocks: dict[int, PinnedBlock] = {}
        self._lock = threading.RLock()
        try:
            raw = transport.transact("GET_INFO", IOCTL_GET_INFO, None, InfoRaw)
        except OSError as e:
            transport.close()
            raise DriverUnavailable(f"{getattr(transport, 'path', 'device')} did not answer GET_INFO "
                                    f"({e.strerror}): not an inferos driver or a too old one", e.errno) from e
        self.info = DriverInfo(raw.abi_version, raw.granularity_bytes, raw.pool_bytes)
        if raw.abi_version != ABI_VERSION:
            transport.close()
            raise DriverUnavailable(f"wrong version: driver ABI {raw.abi_version}, this client speaks "
                                    f"ABI {ABI_VERSION}; update lemonade-inferos or the driver", errno.EPROTO)

    @classmethod
    def open(cls, path: str | None = None) -> "InferosDriver":
        """Open the device (default :attr:`DEFAULT_PATH`).  Raises DriverUnavailable."""
        p = path or cls.DEFAULT_PATH
        transport = WindowsTransport(p) if sys.platform == "win32" else LinuxTransport(p)
        return cls(transport)

    # -- status
    def _get(self, op: str, code: int, cls: type[ctypes.Structure]) -> Any:
        if self._transport is None:
            raise ValueError("driver is closed")
        return self._transport.transact(op, code, None, cls)

    def gpu_status(self) -> GpuStatus:
        return gpu_status_from_raw(self._get("GET_GPU_STATUS", IOCTL_GET_GPU_STATUS, GpuStatusRaw))

    def memory_pool(self) -> MemoryPoolStatus:
        return memory_pool_from_raw(self._get("GET_MEMORY_POOL", IOCTL_GET_MEMORY_POOL, MemoryPoolRaw))

    def scheduler_stats(self) -> SchedulerStats:
        return scheduler_stats_from_raw(
            self._get("GET_SCHEDULER_STATS", IOCTL_GET_SCHEDULER_STATS, SchedulerStatsRaw))

    # -- pinned pool
    def alloc_pinned(self, nbytes: int) -> PinnedBlock:
        """Allocate ``nbytes`` (> 0, <= pool size) of zero-filled pinned memory.

        Raises ValueError for a bad size, OSError(ENOMEM) when the pool has no free range that
        large.  The block is released by :meth:`free_pinned` or when this handle closes."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise ValueError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if not 0 < int(nbytes) <= self.info.pool_bytes:
            raise ValueError(f"nbytes={nbytes}: must be in 1..{self.info.pool_bytes} (the pool size)")
        if self._transport is None:
            raise ValueError("driver is closed")
        raw = self._transport.transact("ALLOC_PINNED", IOCTL_ALLOC_PINNED, AllocRaw(size=int(nbytes)), AllocRaw)
        blk = PinnedBlock(self, int(raw.offset), int(raw.size))
        with self._lock:
            self._blocks[blk.offset] = blk
        return blk

    def free_pinned(self, block_or_offset: PinnedBlock | int) -> None:
        """Give a block back (a PinnedBlock or its offset).  Unmaps it first; raises
        OSError(EBUSY) if numpy arrays over it are still alive, OSError(ENOENT/EPERM) for an
        offset this handle does not own."""
        offset = block_or_offset.offset if isinstance(block_or_offset, PinnedBlock) else int(block_or_offset)
        with self._lock:
            if self._transport is None:
                raise ValueError("driver is closed")
            blk = self._blocks.get(offset)
            if blk is not None:
                blk._release_mapping()
            self._transport.transact("FREE_PINNED", IOCTL_FREE_PINNED, FreeRaw(offset=offset), None)
            self._blocks.pop(offset, None)

    # -- request accounting
    def request_begin(self) -> int:
        """Register a request in flight; returns its handle for :meth:`request_end`."""
        if self._transport is None:
            raise ValueError("driver is closed")
        return int(self._transport.transact("REQUEST_BEGIN", IOCTL_REQUEST_BEGIN, None, RequestRaw).handle)

    def request_end(self, handle: int, latency_ms: float | None, tokens: int = 0) -> None:
        """Complete a request: ``latency_ms`` (>= 0, <= 24 h; None = let the driver time it
        from request_begin) and ``tokens`` generated (>= 0)."""
        flags, latency_us = 0, 0
        if latency_ms is None:
            flags = REQ_KERNEL_TIME
        else:
            lat = float(latency_ms)
            if not math.isfinite(lat) or lat < 0 or lat * 1000 > MAX_LATENCY_US:
                raise ValueError(f"latency_ms={latency_ms}: must be finite, >= 0 and <= 86400000 (24 h)")
            latency_us = round(lat * 1000)
        if int(tokens) < 0:
            raise ValueError(f"tokens={tokens}: must be >= 0")
        if self._transport is None:
            raise ValueError("driver is closed")
        req = RequestRaw(handle=int(handle), latency_us=latency_us, tokens=int(tokens), flags=flags, reserved=0)
        self._transport.transact("REQUEST_END", IOCTL_REQUEST_END, req, None)

    # -- lifetime
    def close(self) -> None:
        """Close the handle: free every block without live numpy views, then close the
        descriptor.  Blocks still viewed stay valid, and with them the descriptor inside the
        kernel; the driver releases them, and this handle's in-flight requests, when the last
        view is gone."""
        with self._lock:
            if self._transport is None:
                return
            for blk in list(self._blocks.values()):
                try:
                    self.free_pinned(blk)
                except OSError:
                    pass  # arrays still alive: that mapping (and the file) outlive this handle
            self._blocks.clear()
            self._transport.close()
            self._transport = None

    def __enter__(self) -> "InferosDriver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def driver_status(path: str | None = None) -> dict[str, Any]:
    """JSON-able summary: ``{"present": False, "path", "reason"}`` when the driver cannot be
    used, else ``{"present": True, "path", "abi_version", "pool_bytes", "gpu", "memory_pool",
    "scheduler"}`` (the dataclasses as dicts)."""
    p = path or InferosDriver.DEFAULT_PATH
    try:
        drv = InferosDriver.open(p)
    except DriverUnavailable as e:
        return {"present": False, "path": p, "reason": e.reason}
    with drv:
        return {
            "present": True,
            "path": p,
            "abi_version": drv.info.abi_version,
            "pool_bytes": drv.info.pool_bytes,
            "gpu": asdict(drv.gpu_status()),
            "memory_pool": asdict(drv.memory_pool()),
            "scheduler": asdict(drv.scheduler_stats()),
        }
