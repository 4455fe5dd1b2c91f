"""KV-cache compression quality on the embedded stories260K model: ours vs reference schemes.

Protocol: :func:`lemonade_inferos.quality.evaluate_ids` (llama.cpp ``perplexity
--kl-divergence`` applied to KV caches). The evaluation text is cut into 512-token chunks
(the model's context); every chunk is decoded token by token from an empty cache, once
with the full-precision cache (baseline, float32 ``model.onnx``) and once with the scheme
under test, so every scored token went through the (quantized) ``past``. Per scheme:

* ``ppl``          perplexity through the scheme's cache; ``ppl_base`` through float32;
* ``dPPL%``        100 * (ppl - ppl_base) / ppl_base;
* ``KLD``          mean KL(P_fp32 || P_scheme) of the next-token distributions, nats;
* ``top1``         fraction of positions where both runs' argmax agree;
* ``bits/el``      stored bits per K/V element of the logical sequence, scales/zero
                   points included, evicted tokens counted as 0 bits;
* ``KV bytes``     resident store bytes at the end of the longest chunk (512 tokens), and
                   ``%fp16`` = KV bytes / (same tokens at float16).

Schemes (all through ``model_tiered.onnx`` via :func:`lemonade_inferos.kv.store.store_for_scheme`,
except the policy presets, which go through the engine's ``kv_cache`` hook exactly like a
request): ``fp16``; ``q8_0`` (uniform INT8 per-token groups of 32, llama.cpp q8_0-like);
``q4_0`` (uniform INT4 per-token groups of 32, q4_0-like); ``hf_quantized`` (INT4 group 64
+ 128-token float16 residual, HF ``QuantizedCache``-like); then the presets ``default``,
``3b``, ``7b``, ``13b``, ``latency``, ``throughput``, ``quality``.

Evaluation text: ``benchmarks/data/eval_stories.txt`` (hand-written TinyStories-style
English) followed by ``benchmarks/data/model_samples.txt`` (stories260K samples at
temperature 1.0, fixed seeds; regenerate with ``--make-samples``; lines starting with
``#`` are the provenance header and are not evaluated).

Targets (printed PASS/FAIL, not asserted): ``default`` at the full 512-token context keeps
KV bytes <= 28 % of float16 with dPPL <= 1 % and mean KLD <= 0.01; ``quality`` dPPL <= 0.2 %.

Usage::

    python benchmarks/kv_quality.py            # full run (all chunks, all schemes)
    python benchmarks/kv_quality.py --quick    # first 512-token chunk only (< 2 min)
    python benchmarks/kv_quality.py --make-samples   # rewrite data/model_samples.txt

Writes ``benchmarks/results/kv_quality.json`` and ``benchmarks/results/kv_quality.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import code_state, print_code_and_targets, write_results

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
STORIES = DATA / "eval_stories.txt"
SAMPLES = DATA / "model_samples.txt"

REFERENCE_SCHEMES = ["fp16", "q8_0", "q4_0", "hf_quantized"]
PRESETS = ["default", "3b", "7b", "13b", "latency", "throughput", "quality"]
SCHEME_LABELS = {
    "fp16": "fp16 (all tokens float16)",
    "q8_0": "q8_0-like (INT8 per-token g32)",
    "q4_0": "q4_0-like (INT4 per-token g32)",
    "hf_quantized": "HF QuantizedCache-like (INT4 g64 + 128 fp16)",
}

#: prompts and seeds of the model samples (temperature 1.0, no top-k/top-p).
SAMPLE_PROMPTS = [
    "Once upon a time",
    "One day, a little boy named Tim",
    "Lily and her mom went to the park.",
    "There was a big dog who",
    "Anna had a red ball.",
    "Once upon a time, in a small town,",
]
SAMPLE_SEED = 1234
SAMPLE_TOKENS = 300

TARGETS = {
    "default_kv_pct_fp16_max": 28.0,
    "default_delta_ppl_pct_max": 1.0,
    "default_kld_max": 0.01,
    "quality_delta_ppl_pct_max": 0.2,
}


def make_samples(engine, path: Path = SAMPLES) -> str:
    """Generate the model samples (full-precision baseline run) and write them to ``path``."""
    from lemonade_inferos.engine import GenerationConfig

    parts = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        cfg = GenerationConfig(temperature=1.0, seed=SAMPLE_SEED + i, max_new_tokens=SAMPLE_TOKENS)
        r = engine.generate(prompt, cfg, baseline=True)
        parts.append((prompt + r.text).strip())
    header = [
        "# stories260K samples for kv_quality.py: temperature 1.0, top_k 0, top_p 1, full-precision",
        (f"# (baseline) cache, seeds {SAMPLE_SEED}..{SAMPLE_SEED + len(SAMPLE_PROMPTS) - 1} (one per prompt), "
         f"max_new_tokens {SAMPLE_TOKENS}, stop at EOS."),
        "# command: python benchmarks/kv_quality.py --make-samples   (lines starting with '#' are not evaluated)",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(parts) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def load_eval_text() -> str:
    def body(p: Path) -> str:
        return "\n".join(l for l in p.read_text(encoding="utf-8").splitlines() if not l.startswith("#")).strip()

    return body(STORIES) + "\n\n" + body(SAMPLES)


def ensure_tiered_graph(spec, say) -> str | None:
    """Make sure the embedded folder has ``model_tiered.onnx``; returns a note if we wrote it."""
    if spec.tiered_model_path.is_file():
        return None
    from lemonade_inferos.kv.graph import write_tiered_graph
    from lemonade_inferos.model.embedded import embedded_source_files

    ckpt, _ = embedded_source_files()
    write_tiered_graph(ckpt, spec.folder)
    note = (f"{spec.folder} had no model_tiered.onnx (the converter does not write it); "
            "kv_quality.py wrote it with kv.graph.write_tiered_graph")
    say("note: " + note)
    return note


def run(args) -> dict:
    from lemonade_inferos.engine import Engine
    from lemonade_inferos.kv.store import store_for_scheme
    from lemonade_inferos.model.embedded import embedded_model_dir
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy
    from lemonade_inferos.quality import chunk_ids, evaluate_ids
    from lemonade_inferos.sysinfo import machine_description

    say = lambda m: print(m, file=sys.stderr, flush=True)
    folder = embedded_model_dir()
    default = load_policy("default")
    engine = Engine(folder, pm=get_plugin_manager(entry_points=False), policy=default)
    spec = engine.spec
    notes = []
    note = ensure_tiered_graph(spec, say)
    if note:
        notes.append(note)
    if args.make_samples or not SAMPLES.is_file():
        say(f"generating model samples into {SAMPLES}")
        make_samples(engine)
    ids = engine.codec.encode(load_eval_text())
    ctx = spec.context_length
    max_chunks = 1 if args.quick else args.max_chunks
    if max_chunks:
        ids = ids[: max_chunks * ctx]
    n_chunks = len(chunk_ids(ids, ctx))
    say(f"evaluation: {len(ids)} tokens, {n_chunks} chunk(s) of <= {ctx}")

    schemes = args.schemes.split(",") if args.schemes else REFERENCE_SCHEMES + PRESETS
    results: dict[str, dict] = {}
    for name in schemes:
        t0 = time.perf_counter()
        if name in REFERENCE_SCHEMES:
            kind, policy = "reference", default
            factory = lambda n=name: store_for_scheme(n, spec)
        else:
            kind, policy, factory = "preset", load_policy(name), None
        r = evaluate_ids(engine, ids, policy, cache_factory=factory)
        r["kind"] = kind
        r["label"] = SCHEME_LABELS.get(name, f"preset {name}")
        r["seconds"] = time.perf_counter() - t0
        r["kv_pct_fp16"] = 100.0 * r["kv_bytes"] / r["kv_bytes_fp16"] if r["kv_bytes_fp16"] else float("nan")
        if r["store"] in ("fp32", "oga"):
            notes.append(f"{name}: the compressed run used store {r['store']!r}, not a tiered store")
        results[name] = r
        say(f"  {name:13s} dPPL {r['delta_ppl_pct']:+7.3f}%  KLD {r['kld_mean']:.5f}  "
            f"{r['bits_per_element']:5.2f} bits  {r['seconds']:.0f} s")

    checks = []
    if "default" in results:
        d = results["default"]
        checks += [
            ("default: KV bytes <= 28% of fp16 at 512 tokens", d["kv_pct_fp16"], "<=", TARGETS["default_kv_pct_fp16_max"]),
            ("default: dPPL <= 1%", d["delta_ppl_pct"], "<=", TARGETS["default_delta_ppl_pct_max"]),
            ("default: mean KLD <= 0.01", d["kld_mean"], "<=", TARGETS["default_kld_max"]),
        ]
        if d["kv_tokens"] < ctx:
            notes.append(f"the longest chunk has {d['kv_tokens']} tokens, not the full context {ctx}")
    if "quality" in results:
        checks.append(("quality: dPPL <= 0.2%", results["quality"]["delta_ppl_pct"], "<=",
                       TARGETS["quality_delta_ppl_pct_max"]))
    target_rows = [{"target": t, "value": v, "op": op, "limit": lim, "pass": bool(v <= lim)}
                   for t, v, op, lim in checks]
    return {
        "benchmark": "kv_quality",
        "model": spec.name,
        "model_shape": {"layers": spec.num_layers, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                        "head_dim": spec.head_dim, "vocab": spec.vocab_size, "context": ctx},
        "text": {"stories": str(STORIES.relative_to(HERE.parent)), "samples": str(SAMPLES.relative_to(HERE.parent)),
                 "tokens": len(ids), "chunks": n_chunks, "chunk_tokens": ctx},
        "quick": bool(args.quick),
        "protocol": "lemonade_inferos.quality.evaluate_ids: token-by-token cached decode per chunk, "
                    "baseline = float32 model.onnx cache; KV bytes at the end of the longest chunk",
        "machine": machine_description(),
        "code": code_state(),
        "results": results,
        "targets": target_rows,
        "notes": notes,
    }


def print_table(out: dict) -> None:
    res = out["results"]
    t = out["text"]
    print(f"\nKV quality — {out['model']}, {t['tokens']} tokens in {t['chunks']} chunk(s) of <= {t['chunk_tokens']}, "
          "token-by-token cached decode vs float32 cache")
    hdr = (f"{'scheme':14s} {'ppl_base':>8s} {'ppl':>8s} {'dPPL%':>8s} {'KLD':>8s} {'top1':>6s} "
           f"{'bits/el':>7s} {'KV bytes':>9s} {'%fp16':>6s} {'L0/L1/L2/L3 tok':>19s}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in res.items():
        ld = r.get("level_distribution", {})
        L = out["model_shape"]["layers"]
        lv = "/".join(str(ld.get(k, 0) // L) for k in ("L0", "L1", "L2", "L3"))
        print(f"{name:14s} {r['ppl_baseline']:8.4f} {r['ppl']:8.4f} {r['delta_ppl_pct']:+8.3f} {r['kld_mean']:8.5f} "
              f"{r['top1_agreement']:6.4f} {r['bits_per_element']:7.2f} {r['kv_bytes']:9d} {r['kv_pct_fp16']:6.1f} "
              f"{lv:>19s}")
    print("(KV bytes and the level split in tokens are at the end of the longest chunk; fp16 bytes there: "
          f"{next(iter(res.values()))['kv_bytes_fp16']})")
    print_code_and_targets(out, width=48, fmt=".4g")
    for n in out["notes"]:
        print(f"note: {n}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    # identical results (presets sharing a configuration) are one point with a joint label
    groups: dict[tuple, list[str]] = {}
    for name, r in res.items():
        groups.setdefault((round(r["bits_per_element"], 3), round(r["delta_ppl_pct"], 6)), []).append(name)
    cmap = plt.get_cmap("tab20")
    for ax, key, ylabel in ((axes[0], "delta_ppl_pct", "ΔPPL vs float32 cache (%)"),
                            (axes[1], "kld_mean", "mean KL divergence (nats)")):
        for i, names in enumerate(groups.values()):
            r = res[names[0]]
            ref = r["kind"] == "reference"
            ax.scatter(r["bits_per_element"], r[key], marker="s" if ref else "o", color=cmap(i % 20), s=60,
                       zorder=3, edgecolors="black", linewidths=0.5, label=" = ".join(names))
        ax.set_xlabel("stored bits per K/V element (metadata incl., evicted = 0)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("symlog", linthresh=0.01 if key == "delta_ppl_pct" else 1e-4)
        ax.grid(True, which="both", alpha=0.3)
    tg = TARGETS
    axes[0].axhline(tg["default_delta_ppl_pct_max"], color="tab:red", ls="--", lw=1, label="default target 1%")
    axes[0].axhline(tg["quality_delta_ppl_pct_max"], color="tab:orange", ls=":", lw=1, label="quality target 0.2%")
    axes[0].axvline(16 * tg["default_kv_pct_fp16_max"] / 100, color="tab:red", ls="--", lw=0.8,
                    label="28% of fp16 = 4.48 bits")
    axes[1].axhline(tg["default_kld_max"], color="tab:red", ls="--", lw=1, label="default target 0.01")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    t = out["text"]
    fig.suptitle(f"KV-cache compression quality — {out['model']}, {t['tokens']} tokens, "
                 f"{t['chunks']}×≤{t['chunk_tokens']}-token chunks (squares: reference schemes, dots: presets)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first 512-token chunk only")
    ap.add_argument("--max-chunks", type=int, default=0, help="evaluate at most this many chunks (0 = all)")
    ap.add_argument("--schemes", default="", help=f"comma-separated subset of {','.join(REFERENCE_SCHEMES + PRESETS)} "
                    "(with --model also kivi4)")
    ap.add_argument("--make-samples", action="store_true", help=f"regenerate {SAMPLES.name} first")
    ap.add_argument("--out", default=str(RESULTS / "kv_quality.json"))
    ap.add_argument("--plot", default=str(RESULTS / "kv_quality.png"), help="PNG path ('' = no plot)")
    ap.add_argument("--model", default=None, metavar="NAME|DIR",
                    help="a real model (e.g. smollm2-135m-instruct): contexts 512 and 2,048, eval_long.txt + "
                    "model samples, and llama.cpp on the same GGUF (see benchmarks/_kv_quality_model.py)")
    ap.add_argument("--contexts", default="512,2048", help="with --model: comma-separated context lengths")
    ap.add_argument("--tf-chunk", type=int, default=16, help="with --model: tokens per teacher-forced run")
    ap.add_argument("--threads", type=int, default=2, help="with --model: threads for our engine and llama.cpp")
    ap.add_argument("--max-tokens", type=int, default=0, help="with --model: evaluate at most this many tokens")
    args = ap.parse_args(argv)
    if args.model:
        import _kv_quality_model as M

        tag = Path(args.model).name.split("-")[0]
        if args.out == str(RESULTS / "kv_quality.json"):
            args.out = str(RESULTS / f"kv_quality_{tag}.json")
        if args.plot == str(RESULTS / "kv_quality.png"):
            args.plot = str(RESULTS / f"kv_quality_{tag}.png")
        t0 = time.perf_counter()
        out = M.run(args)
        out["seconds"] = time.perf_counter() - t0
        M.print_table(out)
        write_results(out, args.out, args.plot, M.plot)
        return 0
    if args.quick and args.out == str(RESULTS / "kv_quality.json"):
        args.out = str(RESULTS / "kv_quality.quick.json")
        if args.plot == str(RESULTS / "kv_quality.png"):
            args.plot = str(RESULTS / "kv_quality.quick.png")
    t0 = time.perf_counter()
    out = run(args)
    out["seconds"] = time.perf_counter() - t0
    print_table(out)
    write_results(out, args.out, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
