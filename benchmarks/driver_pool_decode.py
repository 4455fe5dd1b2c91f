"""Decode speed of the tiered KV store with its L0 buffer in the inferos driver's pinned pool
vs ordinary (heap) memory.

Needs ``/dev/inferos``. This machine's kernel cannot load the module (no headers for it), so
it runs inside the driver's test VM::

    sudo driver/linux/test-in-vm.sh --config base --no-install-test \\
        --guest-script benchmarks/driver_pool_decode.py --bench-json benchmarks/results/driver_pool_decode.json

Method: the embedded model (stories260K) with the default policy; per repeat, for each variant
(order alternating every repeat): a fresh :class:`~lemonade_inferos.kv.store.TieredKVCache`,
a prefill of ``--prefill`` prompt tokens, then ``--steps`` timed greedy decode steps through
``Engine._run`` (IOBinding on), as ``benchmarks/kv_speed.py`` does. ``pool`` differs from
``heap`` only in where ``_alloc_l0`` puts the channel-major L0 float16 buffer: a
driver block (``alloc_pinned`` + ``numpy`` view of the mmap) instead of ``np.zeros``. The
resource manager's real integration (issue 11) is not used; the subclass below is a
measurement device only. Output: TAP lines (both variants decode the same tokens; the buffer
is in the pool) and ``# bench`` lines (median tok/s per variant, median pool/heap pair ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lemonade_inferos.kv import store as store_mod  # noqa: E402
from lemonade_inferos.kv.store import TieredKVCache  # noqa: E402
from lemonade_inferos.resources.driver import DriverUnavailable, InferosDriver  # noqa: E402


class PoolTieredKVCache(TieredKVCache):
    """TieredKVCache whose L0 buffer ``[2L, E, cap]`` float16 lives in a driver block."""

    driver: InferosDriver

    def __init__(self, spec, policy, driver: InferosDriver):
        self.driver = driver
        self.blocks: list = []     # every block ever used, freed once no view holds it
        super().__init__(spec, policy)

    def _alloc_l0(self, cap: int) -> None:
        real_np, drv, blocks = store_mod.np, self.driver, self.blocks

        class _PoolNumpy:
            def __getattr__(self, name):
                return getattr(real_np, name)

            @staticmethod
            def zeros(shape, dtype=float):
                if isinstance(shape, tuple) and len(shape) == 3 and real_np.dtype(dtype) == real_np.float16:
                    nbytes = int(real_np.prod(shape)) * 2
                    blk = drv.alloc_pinned(nbytes)   # zero-filled by the driver
                    blocks.append(blk)
                    return blk.array(real_np.float16, shape)
                return real_np.zeros(shape, dtype)

        store_mod.np = _PoolNumpy()
        try:
            super()._alloc_l0(cap)
        finally:
            store_mod.np = real_np
        self.release_unused()

    def release_unused(self) -> None:
        for blk in list(self.blocks[:-1]):
            try:
                self.driver.free_pinned(blk)
                self.blocks.remove(blk)
            except OSError:
                pass   # a view (IOBinding, old array) still holds it: retry later


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=48, help="prompt tokens before timing (default 48)")
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per run (default 48)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    args = ap.parse_args(argv)

    try:
        drv = InferosDriver.open()
    except DriverUnavailable as e:
        print(f"not ok - decode benchmark: driver unavailable: {e.reason}")
        return 1

    import onnxruntime as ort

    from lemonade_inferos.engine import Engine
    from lemonade_inferos.engine.text import TextCodec
    from lemonade_inferos.ort_options import prime_run_options
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy

    policy = load_policy("default")
    engine = Engine(None, pm=get_plugin_manager(entry_points=False), policy=policy)
    spec = engine.spec
    text = (ROOT / "benchmarks" / "data" / "eval_stories.txt").read_text(encoding="utf-8")
    prompt = TextCodec(spec).encode(text)[: args.prefill]
    ro = prime_run_options(ort.RunOptions())
    graph = TieredKVCache(spec, policy).graph_file
    sess = engine.session(graph, policy)

    def run(variant: str) -> tuple[float, list[int], int]:
        cache = PoolTieredKVCache(spec, policy, drv) if variant == "pool" else TieredKVCache(spec, policy)
        engine._run(sess, cache, np.array([prompt], np.int64), 0, ro, True)
        pos, ids, out = len(prompt), np.zeros((1, 1), np.int64), []
        ids[0, 0] = prompt[-1]
        in_pool = drv.memory_pool().used_bytes if variant == "pool" else 0
        t = time.perf_counter()
        for _ in range(args.steps):
            logits = engine._run(sess, cache, ids, pos, ro, True)
            ids[0, 0] = int(np.argmax(logits[-1]))
            out.append(int(ids[0, 0]))
            pos += 1
        tps = args.steps / (time.perf_counter() - t)
        if variant == "pool":
            blocks = cache.blocks
            del cache, logits
            import gc

            gc.collect()
            for blk in blocks:
                try:
                    drv.free_pinned(blk)
                except OSError:
                    pass
        return tps, out, in_pool

    run("heap")   # warm-up
    tps = {"heap": [], "pool": []}
    tokens, in_pool = {}, 0
    for r in range(args.repeats):
        for v in (("heap", "pool") if r % 2 == 0 else ("pool", "heap")):
            t, out, used = run(v)
            tps[v].append(t)
            tokens.setdefault(v, out)
            in_pool = max(in_pool, used)
    ratios = [p / h for p, h in zip(tps["pool"], tps["heap"])]
    print(f"{'ok' if tokens['pool'] == tokens['heap'] else 'not ok'} - decode: the pool-backed store "
          f"generates the same {args.steps} tokens as the heap store")
    print(f"{'ok' if in_pool > 0 else 'not ok'} - decode: the L0 buffer lived in the driver pool "
          f"({in_pool} bytes during decode)")
    for v in ("heap", "pool"):
        print(f"# bench decode_{v} tps_median={statistics.median(tps[v]):.2f} "
              f"tps_min={min(tps[v]):.2f} tps_max={max(tps[v]):.2f} repeats={args.repeats} "
              f"steps={args.steps} prefill={len(prompt)}")
    print(f"# bench decode_pool_over_heap ratio_median={statistics.median(ratios):.3f} "
          f"ratio_min={min(ratios):.3f} ratio_max={max(ratios):.3f}")
    drv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
