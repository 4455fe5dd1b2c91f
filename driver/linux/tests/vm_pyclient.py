"""The Python client (lemonade_inferos.resources.driver) against the real module, inside the
test VM: test-in-vm.sh shares the host's root read-only over 9p, chroots into it and runs
this file with the project's interpreter.  Prints TAP lines without numbers like vmtest.c
("ok - name", "not ok - name # why") and "# bench" lines.  Needs only numpy and the client.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.getcwd())
from lemonade_inferos.resources.driver import (  # noqa: E402
    DriverUnavailable, InferosDriver, driver_status)

MIB = 1 << 20
failures = 0


def result(ok: bool, name: str, why: str = "") -> None:
    global failures
    print(f"{'ok' if ok else 'not ok'} - py: {name}{(' # ' + why) if (why and not ok) else ''}", flush=True)
    failures += not ok


def expect_oserror(fn, err: int, name: str) -> None:
    try:
        fn()
    except OSError as e:
        result(e.errno == err, f"{name} -> {errno.errorcode[err]}", f"got {e!r}")
        return
    result(False, f"{name} -> {errno.errorcode[err]}", "no error raised")


def main() -> None:
    st = driver_status()
    result(st["present"] is True and st["abi_version"] == 1 and st["pool_bytes"] == 256 * MIB,
           "driver_status(): present, ABI 1, 256 MiB pool", json.dumps(st)[:200])
    json.dumps(st)
    result(st["gpu"]["utilization_percent"] is None and st["gpu"]["memory_total_bytes"] is None,
           "driver_status(): GPU utilization/memory None (unavailable), not invented")
    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    result(abs(st["gpu"]["system_memory_total_bytes"] - phys) <= 64 * MIB,
           "gpu_status().system_memory_total_bytes ~ sysconf physical pages",
           f'{st["gpu"]["system_memory_total_bytes"]} vs {phys}')
    result(driver_status("/dev/does-not-exist")["present"] is False, "driver_status() on a missing path: present False")

    a = InferosDriver.open()
    b = InferosDriver.open()
    s0 = b.scheduler_stats()
    result(s0.processes == 1 and s0.open_handles == 2, "two handles of one process: processes 1, open_handles 2",
           str(s0))

    blk = a.alloc_pinned(MIB)
    kv = blk.array(np.float16, (8, 256, 256))
    result(bool((kv == 0).all()), "alloc_pinned: the numpy view over the mapping starts zeroed")
    kv[:] = np.arange(kv.size, dtype=np.float32).reshape(kv.shape).astype(np.float16)
    again = blk.array(np.float16, (8, 256, 256))
    result(bool((again == kv).all()) and np.shares_memory(again, kv), "two arrays over one block see the same memory")
    mp = b.memory_pool()
    result(mp.used_bytes == MIB and mp.block_count == 1, "another handle sees the block in memory_pool()", str(mp))
    expect_oserror(lambda: b.free_pinned(blk.offset), errno.EPERM, "free_pinned of another handle's block")
    expect_oserror(lambda: a.free_pinned(blk), errno.EBUSY, "free_pinned while numpy views are alive")
    result(b.memory_pool().used_bytes == MIB, "the refused free left the block allocated")
    del kv, again
    a.free_pinned(blk)
    result(b.memory_pool().used_bytes == 0, "free_pinned after the views are gone returns the block")
    expect_oserror(lambda: a.free_pinned(blk.offset), errno.ENOENT, "double free_pinned")

    try:
        a.alloc_pinned(256 * MIB + 1)
        result(False, "alloc_pinned(pool + 1) -> ValueError")
    except ValueError:
        result(True, "alloc_pinned(pool + 1) -> ValueError")
    blocks = []
    try:
        while True:
            blocks.append(a.alloc_pinned(16 * MIB))
    except OSError as e:
        result(e.errno == errno.ENOMEM and len(blocks) == 16, "pool exhaustion -> OSError ENOMEM after 16 x 16 MiB",
               f"{e!r} after {len(blocks)}")
    result(b.memory_pool().free_bytes == 0, "full pool: free_bytes 0")

    h = a.request_begin()
    result(b.scheduler_stats().requests_in_flight == 1, "request_begin: 1 in flight system-wide")
    a.request_end(h, latency_ms=12.5, tokens=10)
    s1 = b.scheduler_stats()
    result(s1.requests_completed == s0.requests_completed + 1 and s1.tokens_completed == s0.tokens_completed + 10
           and abs(s1.total_latency_ms - s0.total_latency_ms - 12.5) < 1e-9 and s1.requests_in_flight == 0,
           "request_end(12.5 ms, 10 tokens) lands in scheduler_stats()", str(s1))
    h = a.request_begin()
    time.sleep(0.03)
    a.request_end(h, latency_ms=None)
    s2 = b.scheduler_stats()
    result(30.0 <= s2.total_latency_ms - s1.total_latency_ms < 2000.0,
           "request_end(latency_ms=None): the driver times the request (>= 30 ms sleep)",
           f"{s2.total_latency_ms - s1.total_latency_ms} ms")
    expect_oserror(lambda: b.request_end(h, 1.0), errno.ENOENT, "request_end of an ended handle")

    # close() with numpy views alive: the views stay valid, the blocks come back when they die
    view = blocks[3].array(np.uint8, 16 * MIB)
    blocks.clear()
    a.close()
    view[:4] = 7
    result(b.memory_pool().used_bytes == 16 * MIB and int(view[:4].sum()) == 28,
           "after close(), a live view keeps its block (and only it) valid", str(b.memory_pool()))
    del view
    gc.collect()
    result(b.memory_pool().used_bytes == 0 and b.scheduler_stats().open_handles == 1,
           "when the last view dies the driver releases the block and the handle")

    # the client's own round trip (Python + ctypes + fcntl.ioctl)
    n = 3000
    t = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        b.scheduler_stats()
        t[i] = time.perf_counter_ns() - t0
    t.sort()
    print(f"# bench py_scheduler_stats n={n} median_ns={int(t[n // 2])} p99_ns={int(t[int(n * 0.99)])} "
          f"min_ns={int(t[0])}", flush=True)
    for i in range(1000):
        t0 = time.perf_counter_ns()
        bl = b.alloc_pinned(4096)
        b.free_pinned(bl)
        t[i] = time.perf_counter_ns() - t0
    u = np.sort(t[:1000])
    print(f"# bench py_alloc_free_4KiB n=1000 median_ns={int(u[500])} p99_ns={int(u[990])} min_ns={int(u[0])}",
          flush=True)
    b.close()
    try:
        InferosDriver.open("/dev/null")
        result(False, "open(/dev/null) -> DriverUnavailable")
    except DriverUnavailable as e:
        result("not an inferos driver" in e.reason, "open(/dev/null) -> DriverUnavailable", e.reason)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        result(False, "python client test crashed", traceback.format_exc().replace("\n", " | ")[-400:])
    print(f"# py client done: {failures} failure(s)", flush=True)
    sys.exit(1 if failures else 0)
