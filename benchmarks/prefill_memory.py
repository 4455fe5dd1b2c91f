"""Peak memory of a long prefill: chunked (the engine's ``runtime.prefill_chunk_tokens``) vs
one shot, on a real model.

Each setting runs in its own subprocess: load the engine (full-precision KV cache, so only
the prefill differs), reset the peak-RSS mark (Linux ``/proc/self/clear_refs``), prefill a
``--tokens``-token prompt (the evaluation text, repeated) and generate one token, then report
``VmHWM`` (peak resident set during the request, model included), the RSS before the
request, and the prefill time. One-shot prefill materialises every layer's attention scores
``[heads, T, T]`` float32 at once (9 x 8,064^2 x 4 B = 2.3 GB per layer on SmolLM2); chunks of
512 tokens never hold more than ``[heads, 512, T]``.

Usage::

    python benchmarks/prefill_memory.py [--model smollm2-135m-instruct] [--tokens 8064]
                                        [--chunks 512,8064] [--threads 2]

Writes ``benchmarks/results/prefill_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model: str, tokens: int, chunk: int, threads: int) -> dict:
    from kv_speed import _hwm_bytes, _hwm_reset

    from lemonade_inferos.engine import Engine, GenerationConfig
    from lemonade_inferos.model.registry import resolve_model
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy

    pol = load_policy("default").merged({"kv": {"mode": "disabled"},
                                         "runtime": {"intra_op_threads": threads, "prefill_chunk_tokens": chunk}})
    eng = Engine(resolve_model(model), pm=get_plugin_manager(entry_points=False), policy=pol, prefix_cache_bytes=0)
    eng.generate([1, 2, 3], GenerationConfig(max_new_tokens=1))  # session loaded
    ids = eng.encode((HERE / "data" / "eval_long.txt").read_text(encoding="utf-8"))
    while len(ids) < tokens:
        ids = ids + ids
    ids = ids[:tokens]
    import psutil

    before = psutil.Process().memory_info().rss
    _hwm_reset()
    t0 = time.perf_counter()
    r = eng.generate(ids, GenerationConfig(max_new_tokens=1))
    return {"chunk": chunk, "tokens": tokens, "peak_rss": _hwm_bytes(), "rss_before": before,
            "prefill_ms": r.stats.prefill_ms, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=8064)
    ap.add_argument("--chunks", default="512,8064", help="prefill chunk sizes to compare (>= tokens = one shot)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "prefill_memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.tokens, int(args.child), args.threads)))
        return 0
    from _common import code_state

    from lemonade_inferos.sysinfo import machine_description

    rows = []
    for c in (int(x) for x in args.chunks.split(",")):
        r = subprocess.run([sys.executable, __file__, "--child", str(c), "--model", args.model,
                            "--tokens", str(args.tokens), "--threads", str(args.threads)],
                           capture_output=True, text=True, cwd=str(HERE))
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"chunk {c:6d}: peak RSS {row['peak_rss'] / 2**20:7.0f} MiB (before {row['rss_before'] / 2**20:5.0f} MiB), "
              f"prefill {row['prefill_ms'] / 1e3:6.1f} s for {row['tokens']} tokens", flush=True)
    out = {"benchmark": "prefill_memory", "model": args.model, "threads": args.threads, "rows": rows,
           "machine": machine_description(), "code": code_state()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
