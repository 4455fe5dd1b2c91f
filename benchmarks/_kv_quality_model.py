"""``kv_quality.py --model NAME``: KV-cache quality on a real model, side by side with llama.cpp.

One run, on the same token ids:

* our engine: float32 cache (baseline), then ``fp16``, ``q8_0``-like, ``q4_0``-like,
  ``kivi4`` (KIVI layout at 4 bits), ``hf_quantized`` (HF ``QuantizedCache``-like) and the
  presets, through ``model_tiered.onnx``; ΔPPL and KLD against our float32-cache run;
* real llama.cpp (llama-cpp-python) on the model's GGUF with ``type_k``/``type_v`` f16,
  q8_0 and q4_0 (flash attention); ΔPPL and KLD against llama.cpp's own f16 run.

Text: ``data/eval_long.txt`` (≈6,100 words of varied English written for this project)
followed by model samples (``data/<model>_samples.txt``, temperature 1.0, fixed seeds),
cut into chunks of each context length (512 and 2,048 by default).

Teacher forcing runs ``--tf-chunk`` tokens per model run (default 16): every token reads
everything before its run from the compressed cache and the ≤15 earlier tokens of its run at
float32. The reference schemes keep their newest < 16 tokens at float16 anyway (blocks of
16), and the presets a float16 window of ≥ 24 tokens, so this changes little against the
exact one-token protocol (``--tf-chunk 1``), which costs ~10x the time on this model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
EVAL_TEXT = DATA / "eval_long.txt"

REFERENCE = ["fp16", "q8_0", "q4_0", "kivi4", "hf_quantized"]
PRESETS = ["default", "quality", "latency", "throughput"]
LABELS = {
    "fp16": "ours fp16 (all tokens float16)", "q8_0": "ours q8_0-like (INT8 per-token g32)",
    "q4_0": "ours q4_0-like (INT4 per-token g32)", "kivi4": "ours KIVI layout at 4 bits (K per-channel, R=128)",
    "hf_quantized": "ours HF QuantizedCache-like (INT4 g64 + 128 fp16)",
}
TARGETS = {"default_kv_pct_fp16_max": 22.0, "default_delta_ppl_pct_max": 1.0, "default_kld_max": 0.01,
           "quality_delta_ppl_pct_max": 0.1}
SAMPLE_PROMPTS = ["Tell me a short story about a lighthouse.", "Explain how a bicycle gear works.",
                  "Write a letter to a friend about a rainy holiday.", "What should I pack for a day of hiking?"]


def _say(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def samples_path(model_name: str) -> Path:
    return DATA / f"{model_name.split('-')[0]}_samples.txt"


def make_samples(engine, path: Path, tokens: int = 300) -> str:
    """Chat samples of the model at temperature 1.0 (seeds 1234+i), one per prompt."""
    from lemonade_inferos.commands import chat_prompt
    from lemonade_inferos.engine import GenerationConfig

    parts = [f"# {engine.spec.name} samples: temperature 1.0, seeds 1234.., max {tokens} tokens, "
             f"prompts through the chat template (written by benchmarks/kv_quality.py --model --make-samples)"]
    for i, q in enumerate(SAMPLE_PROMPTS):
        r = engine.generate(chat_prompt(engine.spec.folder, q), GenerationConfig(
            max_new_tokens=tokens, temperature=1.0, seed=1234 + i), baseline=True)
        parts.append(r.text.strip())
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path.read_text(encoding="utf-8")


def _body(p: Path) -> str:
    return "\n".join(ln for ln in p.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")).strip()


def _ll_scores(base_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(len(targets))
    nll_b = -base_lp[idx, targets].astype(np.float64)
    nll = -lp[idx, targets].astype(np.float64)
    kld = np.sum(np.exp(base_lp.astype(np.float64)) * (base_lp - lp), axis=-1)
    top1 = base_lp.argmax(-1) == lp.argmax(-1)
    return nll_b, nll, kld, top1


def run_llamacpp(gguf: str, ids: list[int], ctx: int, threads: int) -> dict:
    """llama.cpp f16/q8_0/q4_0 caches over the same chunks; ΔPPL/KLD vs its own f16 run."""
    import _llamacpp as L
    from lemonade_inferos.engine.sampling import log_softmax
    from lemonade_inferos.quality import chunk_ids

    chunks = chunk_ids(ids, ctx)
    out: dict[str, dict] = {}
    acc = {t: [[], [], [], []] for t in ("q8_0", "q4_0")}
    base_nll: list[np.ndarray] = []
    models = {t: L.load(gguf, ctx, t, threads, logits_all=True) for t in ("f16", "q8_0", "q4_0")}
    t0 = time.perf_counter()
    for ch in chunks:
        targets = np.asarray(ch[1:])
        base = log_softmax(L.logits(models["f16"], ch)[:-1]).astype(np.float32)
        base_nll.append(-base[np.arange(len(targets)), targets].astype(np.float64))
        for t in ("q8_0", "q4_0"):
            lp = log_softmax(L.logits(models[t], ch)[:-1]).astype(np.float32)
            for a, v in zip(acc[t], _ll_scores(base, lp, targets)):
                a.append(v)
    nb = np.concatenate(base_nll)
    ppl_b = float(np.exp(nb.mean()))
    out["llama.cpp f16"] = {"kind": "llama.cpp", "label": "llama.cpp f16 cache", "ppl_baseline": ppl_b, "ppl": ppl_b,
                            "delta_ppl_pct": 0.0, "kld_mean": 0.0, "top1_agreement": 1.0, "bits_per_element": 16.0,
                            "kv_pct_fp16": 100.0}
    for t in ("q8_0", "q4_0"):
        _, nll, kld, top1 = (np.concatenate(a) for a in acc[t])
        ppl = float(np.exp(nll.mean()))
        out[f"llama.cpp {t}"] = {
            "kind": "llama.cpp", "label": f"llama.cpp {t} cache (flash attention)", "ppl_baseline": ppl_b, "ppl": ppl,
            "delta_ppl_pct": 100 * (ppl - ppl_b) / ppl_b, "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)), "top1_agreement": float(top1.mean()),
            "bits_per_element": L.KV_BITS[t], "kv_pct_fp16": 100 * L.KV_BITS[t] / 16}
    for r in out.values():
        r["seconds"] = (time.perf_counter() - t0) / 3
    del models
    return out


def run(args) -> dict:
    from lemonade_inferos.engine import Engine
    from lemonade_inferos.kv.store import store_for_scheme
    from lemonade_inferos.model.registry import KNOWN_MODELS, downloaded_file, resolve_model
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy
    from lemonade_inferos.sysinfo import machine_description

    import _llamacpp as L
    from _common import code_state

    folder = resolve_model(args.model, _say)
    threads = args.threads
    default = load_policy("default").merged({"runtime": {"intra_op_threads": threads}})
    engine = Engine(folder, pm=get_plugin_manager(entry_points=False), policy=default, prefix_cache_bytes=0)
    spec = engine.spec
    sp = samples_path(args.model)
    if args.make_samples or not sp.is_file():
        _say(f"generating model samples into {sp}")
        make_samples(engine, sp)
    text = _body(EVAL_TEXT) + "\n\n" + _body(sp)
    ids = engine.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    contexts = [int(c) for c in args.contexts.split(",")]
    schemes = args.schemes.split(",") if args.schemes else REFERENCE + PRESETS
    gguf = None
    if args.model.lower() in KNOWN_MODELS:
        gguf = str(downloaded_file(KNOWN_MODELS[args.model.lower()]))
    llama_reason = L.unavailable_reason() if gguf else "the model has no GGUF file (not a known model name)"
    notes = [] if not llama_reason else [f"llama.cpp skipped: {llama_reason}"]
    by_ctx = {}
    from lemonade_inferos.quality import chunk_ids, evaluate_ids

    for ctx in contexts:
        memo: dict = {}
        n_chunks = len(chunk_ids(ids, ctx))
        _say(f"context {ctx}: {len(ids)} tokens in {n_chunks} chunk(s), tf-chunk {args.tf_chunk}, {threads} thread(s)")
        res: dict[str, dict] = {}
        for name in schemes:
            t0 = time.perf_counter()
            if name in REFERENCE:
                r = evaluate_ids(engine, ids, default, cache_factory=lambda n=name: store_for_scheme(n, spec),
                                 context_length=ctx, tf_chunk=args.tf_chunk, baseline_memo=memo)
                r["kind"], r["label"] = "reference", LABELS[name]
            else:
                pol = load_policy(name).merged({"runtime": {"intra_op_threads": threads}})
                r = evaluate_ids(engine, ids, pol, context_length=ctx, tf_chunk=args.tf_chunk, baseline_memo=memo)
                r["kind"], r["label"] = "preset", f"ours preset {name}"
            r["seconds"] = time.perf_counter() - t0
            r["kv_pct_fp16"] = 100.0 * r["kv_bytes"] / r["kv_bytes_fp16"] if r["kv_bytes_fp16"] else float("nan")
            res[name] = r
            _say(f"  {name:13s} dPPL {r['delta_ppl_pct']:+7.3f}%  KLD {r['kld_mean']:.5f}  "
                 f"{r['bits_per_element']:5.2f} bits  {r['kv_pct_fp16']:5.1f}% fp16  {r['seconds']:.0f} s")
        del memo
        if not llama_reason:
            t0 = time.perf_counter()
            ll = run_llamacpp(gguf, ids, ctx, threads)
            res.update(ll)
            for k, r in ll.items():
                _say(f"  {k:13s} dPPL {r['delta_ppl_pct']:+7.3f}%  KLD {r['kld_mean']:.5f}  {r['bits_per_element']:5.2f} bits")
            _say(f"  llama.cpp {time.perf_counter() - t0:.0f} s")
        by_ctx[str(ctx)] = {"chunks": n_chunks, "results": res}

    targets = []
    top = str(max(contexts))
    r = by_ctx[top]["results"]
    if "default" in r:
        d = r["default"]
        targets += [
            {"target": f"default @{top}: KV <= 22% of fp16", "value": d["kv_pct_fp16"], "limit": 22.0},
            {"target": f"default @{top}: dPPL <= 1%", "value": d["delta_ppl_pct"], "limit": 1.0},
            {"target": f"default @{top}: mean KLD <= 0.01", "value": d["kld_mean"], "limit": 0.01},
        ]
        if "llama.cpp q4_0" in r:
            q = r["llama.cpp q4_0"]
            targets.append({"target": f"default @{top}: dPPL below llama.cpp q4_0's ({q['delta_ppl_pct']:.3f}%)",
                            "value": d["delta_ppl_pct"], "limit": q["delta_ppl_pct"]})
            targets.append({"target": f"default @{top}: KV % of fp16 <= llama.cpp q4_0's (28.1%)",
                            "value": d["kv_pct_fp16"], "limit": q["kv_pct_fp16"]})
    if "quality" in r:
        targets.append({"target": f"quality @{top}: dPPL <= 0.1%", "value": r["quality"]["delta_ppl_pct"], "limit": 0.1})
    for t in targets:
        t["op"] = "<="
        t["pass"] = bool(t["value"] <= t["limit"])
    return {
        "benchmark": "kv_quality", "model": spec.name, "model_arg": args.model,
        "model_shape": {"layers": spec.num_layers, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                        "head_dim": spec.head_dim, "vocab": spec.vocab_size, "context": spec.context_length},
        "text": {"eval": str(EVAL_TEXT.relative_to(HERE.parent)), "samples": str(sp.relative_to(HERE.parent)),
                 "tokens": len(ids)},
        "contexts": by_ctx, "tf_chunk": args.tf_chunk, "threads": threads,
        "llama_cpp": None if llama_reason else {"version": L.version(), "gguf": gguf},
        "protocol": "evaluate_ids per context: chunks of the context length, teacher-forced through each cache "
                    f"{args.tf_chunk} token(s) per run; ours vs our float32 cache, llama.cpp vs its f16 cache",
        "machine": machine_description(), "code": code_state(), "targets": targets, "notes": notes,
    }


def print_table(out: dict) -> None:
    from _common import print_code_and_targets

    for ctx, block in out["contexts"].items():
        print(f"\nKV quality — {out['model']}, context {ctx}: {out['text']['tokens']} tokens in {block['chunks']} chunk(s)")
        hdr = f"{'scheme':16s} {'ppl_base':>9s} {'ppl':>9s} {'dPPL%':>8s} {'KLD':>8s} {'top1':>6s} {'bits/el':>7s} {'%fp16':>6s}"
        print(hdr)
        print("-" * len(hdr))
        for name, r in block["results"].items():
            print(f"{name:16s} {r['ppl_baseline']:9.4f} {r['ppl']:9.4f} {r['delta_ppl_pct']:+8.3f} {r['kld_mean']:8.5f} "
                  f"{r['top1_agreement']:6.4f} {r['bits_per_element']:7.2f} {r['kv_pct_fp16']:6.1f}")
    print_code_and_targets(out, width=58, fmt=".4g")
    for n in out["notes"]:
        print(f"note: {n}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = list(out["contexts"])
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6.5 * len(ctxs), 5.2), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        res = out["contexts"][ctx]["results"]
        for name, r in res.items():
            style = {"reference": ("s", "tab:blue"), "preset": ("o", "tab:green"), "llama.cpp": ("^", "tab:red")}[r["kind"]]
            ax.scatter(r["kv_pct_fp16"], max(r["delta_ppl_pct"], 1e-4), marker=style[0], color=style[1], s=55,
                       edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(name, (r["kv_pct_fp16"], max(r["delta_ppl_pct"], 1e-4)), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel("KV bytes, % of float16")
        ax.set_ylabel("ΔPPL % vs the engine's own full-precision cache")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.axvline(22.0, color="gray", ls=":", lw=0.8)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{out['model']} — context {ctx} (squares: our schemes, dots: presets, triangles: llama.cpp)",
                     fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
