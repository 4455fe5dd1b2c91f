"""``kv_speed.py --model NAME``: decode tokens/s and TTFT on a real model, side by side with
onnxruntime-genai and llama.cpp, same weights file family and the same thread count.

Engines (each in its own worker subprocess, so peak RSS is per engine):

* ``og``           onnxruntime-genai ``og.Generator`` on the same model folder (``model.onnx``;
                   seeded search options — an unseeded generator costs ~14 ms to construct
                   here; threads through an ``og.Config`` overlay);
* ``ours-fp``      our engine, full-precision KV cache (``kv.mode: disabled``);
* ``ours-default`` our engine, ``default`` preset (tiered KV store, ``model_tiered.onnx``);
* ``llama.cpp-f16`` / ``llama.cpp-q4_0``  llama-cpp-python on the model's GGUF, K/V cache
                   f16 or q4_0, flash attention.

For each context length ``T`` a prompt of ``T`` tokens (the evaluation text, repeated) is
prefilled and ``--steps`` tokens are decoded greedily (no EOS stop). TTFT = prompt given →
first token out (ours: ``RunStats.ttft_ms`` of the real ``Engine.generate``; og:
``append_tokens`` + first ``generate_next_token``; llama.cpp: ``eval(prompt)`` + first
sample). Decode tokens/s over the remaining tokens. Engines run round-robin, order rotated
every repeat; medians and per-repeat pair ratios (ours / og, ours / llama.cpp) are reported.

Peak RSS: the worker's ``VmHWM`` during one measurement (reset before it), model included.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ["og", "ours-fp", "ours-default", "llama.cpp-f16", "llama.cpp-q4_0"]


def _prompt(encode, T: int) -> list[int]:
    text = (HERE / "data" / "eval_long.txt").read_text(encoding="utf-8")
    ids = encode(text)
    while len(ids) < T:
        ids = ids + ids
    return ids[:T]


# ------------------------------------------------------------------------------ worker
def worker(cfg: dict) -> None:
    from kv_speed import _hwm_bytes, _hwm_reset

    eng, folder, threads, steps = cfg["engine"], cfg["folder"], cfg["threads"], cfg["steps"]
    tok = None
    if eng == "og":
        import onnxruntime_genai as og

        c = og.Config(folder)
        c.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(c)
        tok = og.Tokenizer(model)
        encode = lambda s: list(tok.encode(s))  # noqa: E731
    elif eng.startswith("ours"):
        from lemonade_inferos.engine import Engine, GenerationConfig
        from lemonade_inferos.plugins import get_plugin_manager
        from lemonade_inferos.policy import load_policy

        pol = load_policy("default").merged({"runtime": {"intra_op_threads": threads}})
        if eng == "ours-fp":
            pol = pol.merged({"kv": {"mode": "disabled"}})
        # prefix cache off: every measurement prefills its whole prompt, like og and llama.cpp
        engine = Engine(folder, pm=get_plugin_manager(entry_points=False), policy=pol, prefix_cache_bytes=0)
        encode = engine.encode
    else:
        import _llamacpp as L
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        encode = lambda s: hf.encode(s, add_special_tokens=False).ids  # noqa: E731
        llm_by_ctx: dict = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        T = int(cmd["T"])
        ids = _prompt(encode, T)
        _hwm_reset()
        if eng == "og":
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=T + steps + 1, do_sample=False, random_seed=0)
            t0 = time.perf_counter()
            gen = og.Generator(model, params)
            gen.append_tokens(ids)
            gen.generate_next_token()
            gen.get_next_tokens()
            t1 = time.perf_counter()
            for _ in range(steps - 1):
                gen.generate_next_token()
                gen.get_next_tokens()
            t2 = time.perf_counter()
            del gen
            res = {"ttft_ms": (t1 - t0) * 1e3, "decode_tps": (steps - 1) / (t2 - t1)}
        elif eng.startswith("ours"):
            r = engine.generate(ids, GenerationConfig(max_new_tokens=steps, stop_on_eos=False))
            res = {"ttft_ms": r.stats.ttft_ms, "decode_tps": r.stats.decode_tps, "kv_bytes": r.stats.kv.total_bytes,
                   "kv_fp16_bytes": r.stats.kv.fp16_bytes}
        else:
            kv = eng.split("-", 1)[1]
            n_ctx = T + steps + 16
            llm = llm_by_ctx.get(n_ctx)
            if llm is None:
                llm_by_ctx.clear()
                llm = llm_by_ctx[n_ctx] = L.load(cfg["gguf"], n_ctx, kv, threads)
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t = llm.sample(temp=0.0)
            t1 = time.perf_counter()
            for _ in range(steps - 1):
                llm.eval([t])
                t = llm.sample(temp=0.0)
            t2 = time.perf_counter()
            res = {"ttft_ms": (t1 - t0) * 1e3, "decode_tps": (steps - 1) / (t2 - t1)}
        res["peak_rss"] = _hwm_bytes()
        print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ driver
class _Worker:
    def __init__(self, cfg: dict):
        self.p = subprocess.Popen([sys.executable, str(Path(__file__)), "worker", json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(HERE))
        msg = json.loads(self.p.stdout.readline() or "{}")
        if not msg.get("ready"):
            raise RuntimeError(f"worker {cfg['engine']} failed to start")

    def measure(self, T: int) -> dict:
        self.p.stdin.write(json.dumps({"T": T}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def run(args) -> dict:
    from lemonade_inferos.model.registry import KNOWN_MODELS, downloaded_file, resolve_model
    from lemonade_inferos.sysinfo import machine_description

    import _llamacpp as L
    from _common import code_state

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    folder = str(resolve_model(args.model, say))
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    notes = []
    gguf = str(downloaded_file(KNOWN_MODELS[args.model.lower()])) if args.model.lower() in KNOWN_MODELS else None
    reason = L.unavailable_reason() if gguf else "no GGUF for this model"
    if reason:
        engines = [e for e in engines if not e.startswith("llama.cpp")]
        notes.append(f"llama.cpp skipped: {reason}")
    lengths = [int(x) for x in args.lengths.split(",")]
    workers = {e: _Worker({"engine": e, "folder": folder, "threads": args.threads, "steps": args.steps, "gguf": gguf})
               for e in engines}
    say(f"engines {engines}, lengths {lengths}, {args.repeats} repeats, {args.steps} steps, {args.threads} threads")
    raw: dict[str, dict[int, list[dict]]] = {e: {T: [] for T in lengths} for e in engines}
    for T in lengths:
        for e in engines:  # warm-up at this length (sessions, arenas, llama.cpp context)
            workers[e].measure(min(T, 256))
        for rep in range(args.repeats):
            order = engines[rep % len(engines):] + engines[: rep % len(engines)]
            for e in order:
                r = workers[e].measure(T)
                raw[e][T].append(r)
                say(f"  T={T} rep {rep + 1}/{args.repeats} {e:15s} TTFT {r['ttft_ms']:8.1f} ms  decode {r['decode_tps']:7.1f} tok/s")
    for w in workers.values():
        w.close()
    table: dict[str, dict[str, dict]] = {}
    for e in engines:
        table[e] = {}
        for T in lengths:
            rs = raw[e][T]
            table[e][str(T)] = {"decode_tps": statistics.median(r["decode_tps"] for r in rs),
                                "ttft_ms": statistics.median(r["ttft_ms"] for r in rs),
                                "peak_rss": max(r["peak_rss"] for r in rs),
                                **({"kv_pct_fp16": 100 * rs[-1]["kv_bytes"] / rs[-1]["kv_fp16_bytes"]}
                                   if rs[-1].get("kv_fp16_bytes") else {})}
    ratios: dict[str, dict[str, dict]] = {}
    for a, b in [("ours-default", "og"), ("ours-fp", "og"), ("ours-default", "ours-fp"),
                 ("ours-default", "llama.cpp-f16"), ("ours-default", "llama.cpp-q4_0")]:
        if a in engines and b in engines:
            ratios[f"{a}/{b}"] = {str(T): {
                "decode": statistics.median(x["decode_tps"] / y["decode_tps"] for x, y in zip(raw[a][T], raw[b][T])),
                "ttft": statistics.median(x["ttft_ms"] / y["ttft_ms"] for x, y in zip(raw[a][T], raw[b][T]))}
                for T in lengths}
    targets = []
    if "ours-default/og" in ratios:
        r = ratios["ours-default/og"]
        for T in lengths:
            targets.append({"target": f"T={T}: default decode >= 1.0x og", "value": r[str(T)]["decode"], "op": ">=",
                            "limit": 1.0, "pass": r[str(T)]["decode"] >= 1.0})
            targets.append({"target": f"T={T}: default TTFT <= og's", "value": r[str(T)]["ttft"], "op": "<=",
                            "limit": 1.0, "pass": r[str(T)]["ttft"] <= 1.0})
        top = str(max(lengths))
        targets.append({"target": f"T={top}: default decode >= 1.15x og", "value": r[top]["decode"], "op": ">=",
                        "limit": 1.15, "pass": r[top]["decode"] >= 1.15})
    return {"benchmark": "kv_speed", "model": Path(folder).name, "model_arg": args.model, "engines": engines,
            "lengths": lengths, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
            "results": table, "ratios": ratios, "raw": {e: {str(T): v for T, v in d.items()} for e, d in raw.items()},
            "llama_cpp": None if reason else L.version(), "machine": machine_description(), "code": code_state(),
            "targets": targets, "notes": notes}


def print_table(out: dict) -> None:
    from _common import print_code_and_targets

    L = out["lengths"]
    print(f"\nDecode tokens/s and TTFT — {out['model']}, {out['threads']} thread(s), {out['steps']} steps, "
          f"median of {out['repeats']}")
    print(f"{'engine':16s} " + " ".join(f"{'T=' + str(T):>22s}" for T in L))
    for e, d in out["results"].items():
        print(f"{e:16s} " + " ".join(f"{d[str(T)]['decode_tps']:7.1f} tok/s {d[str(T)]['ttft_ms']:7.0f} ms" for T in L))
    print("peak RSS MiB:")
    for e, d in out["results"].items():
        print(f"  {e:16s} " + " ".join(f"{d[str(T)]['peak_rss'] / 2**20:8.0f}" for T in L))
    print("pair ratios (median of per-repeat ratios): decode / TTFT")
    for k, d in out["ratios"].items():
        print(f"  {k:30s} " + " ".join(f"{d[str(T)]['decode']:5.2f}x/{d[str(T)]['ttft']:5.2f}x" for T in L))
    print_code_and_targets(out, width=40, fmt=".3f")
    for n in out["notes"]:
        print(f"note: {n}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for e, d in out["results"].items():
        xs = out["lengths"]
        axes[0].plot(xs, [d[str(T)]["decode_tps"] for T in xs], marker="o", label=e)
        axes[1].plot(xs, [d[str(T)]["ttft_ms"] for T in xs], marker="o", label=e)
    for ax, yl in ((axes[0], "decode tokens/s"), (axes[1], "TTFT ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(f"{out['model']}: decode speed and TTFT vs context ({out['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    sys.path.insert(0, str(HERE))
    worker(json.loads(sys.argv[2]))
