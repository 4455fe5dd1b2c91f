"""Host memory pools for KV buffers, with the seed's status fields (total, used, free,
block count, fragmentation).

:class:`HostPool` maps one anonymous region (``mmap``) and sub-allocates it first-fit in
``granule``-byte units, coalescing freed neighbours (the scheme of the kernel's
``genalloc``). It is page-locked with ``mlock(2)`` when ``RLIMIT_MEMLOCK`` allows the whole
region (so KV pages are never swapped out and can be DMA'd); otherwise it stays ordinary
pageable memory and ``note`` says why. :meth:`HostPool.zeros` hands out numpy arrays whose
block returns to the pool when the array (and every view of it) is garbage collected.

:class:`DriverPool` is the same interface over the ``/dev/inferos`` driver's pinned pool
(``alloc_pinned`` / ``free_pinned`` / ``memory_pool``).

``fragmentation`` = 1 - largest free extent / free bytes (0 = one free extent; near 1 =
free memory scattered in small holes), as the driver reports it.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import sys
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .driver import MemoryPoolStatus


@dataclass(frozen=True)
class PoolStatus(MemoryPoolStatus):
    """The driver's ``MemoryPoolStatus`` fields plus whether the memory is page-locked,
    which pool it is (``host`` | ``inferos_driver``) and a note (why it is not locked)."""

    locked: bool = False
    source: str = "host"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memlock_limit() -> int | None:
    """Soft ``RLIMIT_MEMLOCK`` in bytes, None when unlimited or not applicable (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _mlock(buf: mmap.mmap, n: int) -> str:
    """Lock ``buf``; '' on success else the reason."""
    if sys.platform == "win32":
        return "page locking not implemented on Windows (VirtualLock): ordinary memory"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) != 0:
        return f"mlock failed (errno {ctypes.get_errno()}): ordinary memory"
    return ""


class HostPool:
    """Args: total_bytes (> 0); granule: allocation unit (bytes, power of two);
    lock: try ``mlock`` (True) or never (False)."""

    def __init__(self, total_bytes: int, granule: int = 4096, lock: bool = True):
        if not isinstance(total_bytes, int) or total_bytes <= 0:
            raise ValueError(f"total_bytes={total_bytes!r} is not allowed; must be a positive integer")
        if granule <= 0 or granule & (granule - 1):
            raise ValueError(f"granule={granule!r} is not allowed; must be a power of two")
        self.granule = granule
        self.total_bytes = -(-total_bytes // granule) * granule
        self._mm = mmap.mmap(-1, self.total_bytes)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.total_bytes)]  # sorted (offset, size)
        self._used: dict[int, int] = {}
        self.locked = False
        self.note = ""
        if lock:
            lim = memlock_limit()
            if lim is not None and lim < self.total_bytes:
                self.note = (f"RLIMIT_MEMLOCK is {lim} bytes < pool {self.total_bytes} bytes: ordinary (pageable) "
                             "memory; raise it (ulimit -l, systemd LimitMEMLOCK) to pin the KV pool")
            else:
                why = _mlock(self._mm, self.total_bytes)
                self.locked = not why
                self.note = why
        else:
            self.note = "page locking not requested"
        self.overflow = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new block of at least ``nbytes``, or None when no extent fits."""
        size = max(self.granule, -(-int(nbytes) // self.granule) * self.granule)
        with self._lock:
            for i, (off, sz) in enumerate(self._free):
                if sz >= size:
                    if sz == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, sz - size)
                    self._used[off] = size
                    return off
        return None

    def free(self, offset: int) -> None:
        """Return a block (coalescing with free neighbours).

        Raises:
            KeyError: ``offset`` is not an allocated block.
        """
        with self._lock:
            size = self._used.pop(offset)
            i = bisect.bisect_left(self._free, (offset, 0))
            self._free.insert(i, (offset, size))
            if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
                self._free[i] = (offset, size + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> np.ndarray:
        """A zeroed C-contiguous array from the pool (ordinary ``np.zeros`` when the pool is
        full; counted in ``overflow``). Its block is freed when the array is collected."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        off = self.alloc(max(1, count * dt.itemsize))
        if off is None:
            self.overflow += 1
            return np.zeros(shape, dt)
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=off).reshape(shape)
        arr[...] = 0
        weakref.finalize(arr, self.free, off)
        return arr

    def status(self) -> PoolStatus:
        with self._lock:
            used = sum(self._used.values())
            free = self.total_bytes - used
            largest = max((s for _, s in self._free), default=0)
            n = len(self._used)
        frag = 0.0 if free == 0 else round(1.0 - largest / free, 6)
        return PoolStatus(self.total_bytes, used, free, n, frag, largest, self.locked, "host", self.note)


class DriverPool:
    """The kernel driver's pinned pool behind :class:`HostPool`'s interface.

    Args:
        driver: an open ``InferosDriver`` (see :mod:`.kernel_driver` for the contract).
    """

    def __init__(self, driver: Any):
        self.driver = driver
        self._blocks: dict[int, Any] = {}
        self.overflow = 0

    def alloc(self, nbytes: int) -> int | None:
        try:
            b = self.driver.alloc_pinned(int(nbytes))
        except OSError:
            return None
        self._blocks[b.offset] = b
        return b.offset

    def free(self, offset: int) -> None:
        self.driver.free_pinned(self._blocks.pop(offset))

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> np.ndarray:
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape)) * dt.itemsize
        try:
            b = self.driver.alloc_pinned(max(1, nbytes))
        except OSError:
            self.overflow += 1
            return np.zeros(shape, dt)
        arr = b.array(dt, shape)
        arr[...] = 0
        weakref.finalize(arr, self.driver.free_pinned, b.offset)
        return arr

    def status(self) -> PoolStatus:
        m = self.driver.memory_pool()
        return PoolStatus(int(m.total_bytes), int(m.used_bytes), int(m.free_bytes), int(m.block_count),
                          float(m.fragmentation), int(getattr(m, "largest_free_bytes", 0) or 0), True, "inferos_driver",
                          "the /dev/inferos driver's pinned pool")
