"""Hook and stats overhead: a bare onnxruntime decode loop vs the engine with all hooks on.

Three variants, interleaved round-robin in one run so machine noise hits all alike:

* ``bare_ort``      – a minimal loop: one InferenceSession, IOBinding, greedy argmax,
                      present fed back as past; no hooks, no detokenizer, no stats.
* ``engine_nohooks``– the engine with the no-op manager (baseline mode): adds sampling,
                      streaming detokenization, stop handling and timing.
* ``engine_hooks``  – the engine with every built-in hook plus a PostRun-recording plugin
                      (KV store disabled so only hook/stats cost differs from the line above).

Reported per variant: median decode tokens/s and TTFT over the repeats. Overhead ratios are
medians of per-repeat pair ratios (variants run back to back, so load drift cancels):
``hooks_vs_nohooks`` = 1 - tps(engine_hooks)/tps(engine_nohooks) (the hooks' cost) and
``engine_vs_bare`` = 1 - tps(engine_hooks)/tps(bare_ort) (the whole engine's cost).
Both engine variants use one Engine object (hooks off = its no-op-manager baseline mode),
and the order of the variants rotates every repeat.

Usage: python benchmarks/hooks_overhead.py [--tokens 256] [--repeats 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from _common import code_state

from lemonade_inferos.engine import Engine, GenerationConfig
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.model.embedded import embedded_model_dir
from lemonade_inferos.ort_options import prime_run_options
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.sysinfo import machine_description

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."


class PostRunRecorder:
    """A realistic PostRun consumer: serialises the stats like the agent client does."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    @hookimpl
    def after_request(self, context, stats):
        self.reports.append(json.dumps(stats.to_dict()))


def bare_ort(folder: Path, prompt: list[int], n_new: int) -> tuple[float, float]:
    """Returns (ttft_ms, decode tokens/s) of a minimal greedy IOBinding loop."""
    spec = bare_ort.spec  # type: ignore[attr-defined]
    sess = bare_ort.sess  # type: ignore[attr-defined]
    ro = prime_run_options(ort.RunOptions())
    L = spec.num_layers
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    past = {}
    for i in range(L):
        past[f"past_key_values.{i}.key"] = empty
        past[f"past_key_values.{i}.value"] = empty
    outs = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    mask = np.ones((1, spec.context_length), np.int64)
    t0 = time.perf_counter()
    ids = np.array([prompt], np.int64)
    pos0, plen = 0, 0
    t_first = None
    for step in range(n_new):
        n = ids.shape[1]
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask[:, : plen + n])
        io.bind_cpu_input("position_ids", np.arange(pos0, pos0 + n, dtype=np.int64)[None])
        for k, v in past.items():
            if isinstance(v, np.ndarray):
                io.bind_cpu_input(k, v)
            else:
                io.bind_ortvalue_input(k, v)
        io.bind_output("logits", "cpu")
        for o in outs:
            io.bind_output(o, "cpu")
        sess.run_with_iobinding(io, ro)
        vals = io.get_outputs()
        tok = int(np.argmax(vals[0].numpy()[0, -1]))
        for i in range(L):
            past[f"past_key_values.{i}.key"] = vals[1 + 2 * i]
            past[f"past_key_values.{i}.value"] = vals[2 + 2 * i]
        pos0 += n
        plen += n
        ids = np.array([[tok]], np.int64)
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return (t_first - t0) * 1e3, (n_new - 1) / (t_end - t_first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run (default 256)")
    ap.add_argument("--repeats", type=int, default=21, help="runs per variant (default 21)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hooks_overhead.json"))
    args = ap.parse_args(argv)

    folder = embedded_model_dir()
    policy = load_policy("default").merged({"kv": {"mode": "disabled"}}, name="default-kv-off")
    rec = PostRunRecorder()
    # one engine for both engine variants: "no hooks" is its baseline mode (no-op manager),
    # so both share the model folder, tokenizer and process state; only the hooks differ
    # prefix cache off: every repeat must prefill its prompt, like the baseline run
    eng_hooks = Engine(folder, pm=get_plugin_manager(entry_points=False, extra=[("recorder", rec)]), policy=policy,
                       prefix_cache_bytes=0)
    eng_plain = eng_hooks
    prompt = eng_hooks.encode(PROMPT)
    cfg = GenerationConfig(max_new_tokens=args.tokens, stop_on_eos=False)
    bare_ort.spec = eng_hooks.spec  # type: ignore[attr-defined]
    bare_ort.sess = eng_plain.session("model.onnx", policy)  # same SessionOptions for all  # type: ignore[attr-defined]

    def run_engine_hooks() -> tuple[float, float]:
        r = eng_hooks.generate(prompt, cfg)
        return r.stats.ttft_ms, r.stats.decode_tps

    def run_engine_nohooks() -> tuple[float, float]:
        r = eng_plain.generate(prompt, cfg, baseline=True, policy=policy)
        return r.stats.ttft_ms, r.stats.decode_tps

    variants = {
        "bare_ort": lambda: bare_ort(folder, prompt, args.tokens),
        "engine_nohooks": run_engine_nohooks,
        "engine_hooks": run_engine_hooks,
    }
    for f in variants.values():  # warm-up
        f()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        # rotate the order every repeat so no variant always follows the same one
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(variants[name]())
        print(f"\rrepeat {r + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    res = {}
    for name, s in samples.items():
        res[name] = {
            "decode_tps_median": statistics.median(x[1] for x in s),
            "ttft_ms_median": statistics.median(x[0] for x in s),
            "decode_tps_all": [round(x[1], 1) for x in s],
        }
    def pair_ratio(a: str, b: str) -> float:
        """Median over repeats of tps(a)/tps(b) measured back to back (cancels load drift)."""
        return statistics.median(x[1] / y[1] for x, y in zip(samples[a], samples[b]))

    ratios = {
        "hooks_vs_nohooks_overhead": 1 - pair_ratio("engine_hooks", "engine_nohooks"),
        "engine_vs_bare_overhead": 1 - pair_ratio("engine_hooks", "bare_ort"),
    }
    print(f"\nhook and stats overhead — embedded model, {args.tokens} new tokens, median of {args.repeats}")
    print(f"{'variant':16s} {'decode tok/s':>13s} {'TTFT ms':>9s}")
    for name, v in res.items():
        print(f"{name:16s} {v['decode_tps_median']:13.0f} {v['ttft_ms_median']:9.2f}")
    ok = ratios["hooks_vs_nohooks_overhead"] <= 0.02
    print(f"hooks vs no hooks: {ratios['hooks_vs_nohooks_overhead']:+.2%} of decode throughput "
          f"(median of per-repeat pair ratios; target <= 2%: {'PASS' if ok else 'FAIL'})")
    print(f"engine vs bare ORT loop: {ratios['engine_vs_bare_overhead']:+.2%}")
    out = {"benchmark": "hooks_overhead", "tokens": args.tokens, "repeats": args.repeats,
           "machine": machine_description(), "code": code_state(), "results": res, "ratios": ratios,
           "postrun_reports": len(rec.reports)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
