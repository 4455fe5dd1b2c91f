"""N concurrent long chats under a KV budget below their float16 total, with and without
the resource manager.

Arms (each runs in its own subprocess, so peak RSS is per arm; arms are interleaved and
their order alternates every repeat):

* ``fp32_no_rm``   -- what a server without inferos does: full-precision store
                      (``kv.mode: disabled``), no budget, every chat at once;
* ``tiered_no_rm`` -- the ``default`` policy's tiered store, no budget or admission;
* ``tiered_rm``    -- the same policy with the resource manager: the process KV budget
                      (``--budget-frac`` of the chats' float16 total), admission (reserve
                      before prefill; tighten via ``kv.budget_bytes``; FIFO queue with
                      ``--timeout``; refuse with 503 after it).

Each chat: a ``--prompt``-token prompt (random token ids, seeded per chat) then
``--new`` generated tokens (greedy, EOS ignored), all ``--chats`` submitted at once on
``--chats`` threads. Measured per arm: completed / refused requests, request latency
(submission to completion, queueing included; p50 / p95 over completed requests), peak
RSS of the worker (``VmHWM``: model weights + KV + runtime), the peak of the live KV bytes
summed over running requests (sampled every 2 ms from the stores' own accounting; a
request's cache counts from its creation until its request returns) and
its ratio to the budget ("budget adherence": <= 1.0 means never exceeded), total tokens/s.

Model: ``--model synthetic`` (benchmarks/synthetic_model.py preset ``small``: dim 512,
4 layers, 8 heads / 4 KV heads, head_dim 64, 4 KiB fp16 KV per token; random weights and
random prompt ids, so the numbers are about memory and scheduling, not text) or a real
model (a folder, or a name ``inferos pull`` knows, e.g. ``smollm2-135m-instruct``), whose
prompts are consecutive slices of ``--text`` (default ``benchmarks/data/eval_long.txt``).

Usage::

    python benchmarks/memory_pressure.py [--chats 6 --prompt 1024 --new 256 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ARMS = ("fp32_no_rm", "tiered_no_rm", "tiered_rm")


def vm_hwm() -> int:
    """Peak RSS of this process so far (bytes): ``VmHWM`` on Linux, else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from lemonade_inferos.sysinfo import peak_rss_bytes

    return peak_rss_bytes()


def reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def worker(args: argparse.Namespace) -> dict:
    """Run one arm in this process; returns its measurements."""
    import numpy as np

    from lemonade_inferos.engine import Engine
    from lemonade_inferos.engine.sampling import GenerationConfig
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy
    from lemonade_inferos.resources.budget import BudgetExceeded
    from lemonade_inferos.resources.manager import ResourceManager, attach
    from lemonade_inferos.sysinfo import rss_bytes
    from lemonade_inferos.types import InferenceContext

    pol = load_policy("default")
    if args.arm == "fp32_no_rm":
        pol = pol.merged({"kv": {"mode": "disabled"}})
    pm = get_plugin_manager(entry_points=False)
    eng = Engine(args.model_dir, pm=pm, policy=pol)
    caches: dict[str, object] = {}  # request id -> its cache, while the request runs
    real_kv = pm.kv_cache

    def tracked(policy, spec, context):
        c = real_kv(policy, spec, context)
        caches[context.request_id] = c
        return c

    pm.kv_cache = tracked
    if args.arm == "tiered_rm":
        attach(eng, ResourceManager(args.budget, timeout_s=args.timeout))
    rng = np.random.default_rng(0)
    if args.text:  # a real model: consecutive slices of a real text, one per chat
        ids = eng.encode(Path(args.text).read_text(encoding="utf-8"))
        while len(ids) < args.chats * (args.prompt - 1):
            ids = ids + ids
        prompts = [[eng.spec.bos_token_id, *ids[i * (args.prompt - 1):(i + 1) * (args.prompt - 1)]]
                   for i in range(args.chats)]
    else:
        prompts = [[eng.spec.bos_token_id, *rng.integers(3, eng.spec.vocab_size, args.prompt - 1).tolist()]
                   for _ in range(args.chats)]
    eng.generate(prompts[0][:32], GenerationConfig(max_new_tokens=4),  # warm the session
                 context=InferenceContext(model="bench", prompt_tokens=32, max_new_tokens=4, request_id="warm"))
    caches.clear()
    idle_rss = rss_bytes()
    reset_hwm()
    lat, refused, tokens = [], 0, 0
    peak_kv = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def live_kv() -> int:
        total = 0
        for c in list(caches.values()):
            tb = getattr(c, "total_bytes", None)
            try:
                total += int(tb() if callable(tb) else c.stats().total_bytes)
            except Exception:
                pass
        return total

    def sample() -> None:
        while not stop.is_set():
            peak_kv[0] = max(peak_kv[0], live_kv())
            time.sleep(0.002)

    def chat(i: int) -> None:
        nonlocal refused, tokens
        t0 = time.perf_counter()
        rid = f"chat{i}"
        ctx = InferenceContext(model="bench", prompt_tokens=len(prompts[i]), max_new_tokens=args.new, request_id=rid)
        try:
            r = eng.generate(prompts[i], GenerationConfig(max_new_tokens=args.new, stop_on_eos=False), context=ctx)
        except BudgetExceeded:
            with lock:
                refused += 1
            return
        finally:
            caches.pop(rid, None)
        with lock:
            lat.append(time.perf_counter() - t0)
            tokens += len(r.token_ids)

    s = threading.Thread(target=sample, daemon=True)
    s.start()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=chat, args=(i,)) for i in range(args.chats)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    s.join()
    out = {
        "arm": args.arm, "completed": len(lat), "refused": refused, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2), "latency_p50_s": round(percentile(lat, 50) or 0, 3),
        "latency_p95_s": round(percentile(lat, 95) or 0, 3), "peak_rss_bytes": vm_hwm(), "idle_rss_bytes": idle_rss,
        "peak_live_kv_bytes": peak_kv[0], "budget_bytes": args.budget,
        "budget_adherence": round(peak_kv[0] / args.budget, 4),
    }
    if eng.resources is not None:
        st = eng.resources.budget.status()
        out["admission"] = {k: st[k] for k in ("admitted_total", "tightened_total", "waited_total", "refused_total",
                                                 "peak_reserved_bytes")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic", help="'synthetic' (preset small) or a model folder")
    ap.add_argument("--chats", type=int, default=6, help="concurrent chats (default 6)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per chat (default 1024)")
    ap.add_argument("--new", type=int, default=256, help="generated tokens per chat (default 256)")
    ap.add_argument("--budget-frac", type=float, default=0.25,
                    help="KV budget as a fraction of the chats' float16 KV total (default 0.25)")
    ap.add_argument("--timeout", type=float, default=120.0, help="admission queue timeout, s (default 120)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", default=str(HERE / "results" / "memory_pressure.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "memory_pressure.png"))
    ap.add_argument("--text", default=None,
                    help="prompt text for a real model (default: benchmarks/data/eval_long.txt unless --model synthetic)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:  # worker mode
        print(json.dumps(worker(args)))
        return 0
    from _common import code_state, write_results

    from lemonade_inferos.model.spec import DecoderSpec
    from lemonade_inferos.sysinfo import machine_description

    if args.model == "synthetic":
        from synthetic_model import ensure_synthetic_model

        folder = ensure_synthetic_model("small", progress=print)
    else:
        folder = Path(args.model).expanduser().resolve()
        if not folder.is_dir():  # a model name: the folder `inferos pull NAME` made
            from lemonade_inferos.model.registry import resolve_model  # noqa: PLC0415

            folder = Path(resolve_model(args.model))
        if args.text is None:
            args.text = str(HERE / "data" / "eval_long.txt")
    spec = DecoderSpec.from_folder(folder)
    fp16_total = int(spec.kv_bytes_per_token(2)) * (args.prompt + args.new) * args.chats
    budget = int(fp16_total * args.budget_frac)
    print(f"model {folder.name}: {args.chats} chats x ({args.prompt} + {args.new}) tokens; fp16 KV total "
          f"{fp16_total / 2**20:.1f} MiB; KV budget {budget / 2**20:.2f} MiB ({args.budget_frac:.0%})", flush=True)
    arms = [a for a in args.arms.split(",") if a]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    t_start = time.time()
    for rep in range(args.repeats):
        order = arms if rep % 2 == 0 else list(reversed(arms))
        for arm in order:
            cmd = [sys.executable, __file__, "--arm", arm, "--model-dir", str(folder), "--budget", str(budget),
                   "--chats", str(args.chats), "--prompt", str(args.prompt), "--new", str(args.new),
                   "--timeout", str(args.timeout)] + (["--text", args.text] if args.text else [])
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "INFEROS_AGENT_URL": ""})
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            runs[arm].append(res)
            print(f"repeat {rep + 1} {arm:13s}: {res['completed']} done {res['refused']} refused, p95 "
                  f"{res['latency_p95_s']:.2f} s, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB, peak KV "
                  f"{res['peak_live_kv_bytes'] / 2**20:.2f} MiB = {res['budget_adherence']:.2f}x budget", flush=True)

    def med(arm: str, key: str) -> float:
        xs = sorted(r[key] for r in runs[arm])
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    summary = {a: {k: med(a, k) for k in ("completed", "refused", "latency_p50_s", "latency_p95_s", "peak_rss_bytes",
                                          "peak_live_kv_bytes", "budget_adherence", "tokens_per_s", "wall_s")}
               for a in arms}
    out = {"model": folder.name, "chats": args.chats, "prompt_tokens": args.prompt, "new_tokens": args.new,
           "fp16_kv_total_bytes": fp16_total, "budget_bytes": budget, "budget_frac": args.budget_frac,
           "repeats": args.repeats, "runs": runs, "median": summary, "machine": machine_description(),
           "code": code_state(), "seconds": time.time() - t_start}
    for a in arms:
        s = summary[a]
        print(f"median {a:13s}: completed {s['completed']:.0f}/{args.chats}, p95 {s['latency_p95_s']:.2f} s, peak RSS "
              f"{s['peak_rss_bytes'] / 2**20:.0f} MiB, peak KV {s['peak_live_kv_bytes'] / 2**20:.2f} MiB "
              f"({s['budget_adherence']:.2f}x budget), {s['tokens_per_s']:.1f} tok/s")
    write_results(out, args.json, args.plot, plot)
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(out["median"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    m = out["median"]
    axes[0].bar(arms, [m[a]["peak_live_kv_bytes"] / 2**20 for a in arms], color="#4a7")
    axes[0].axhline(out["budget_bytes"] / 2**20, color="red", ls="--", label="KV budget")
    axes[0].set_title("peak live KV (MiB)")
    axes[0].legend()
    axes[1].bar(arms, [m[a]["latency_p95_s"] for a in arms], color="#47a")
    axes[1].set_title("p95 request latency (s)")
    axes[2].bar(arms, [m[a]["peak_rss_bytes"] / 2**20 for a in arms], color="#a74")
    axes[2].set_title("peak RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"{out['chats']} chats x ({out['prompt_tokens']}+{out['new_tokens']}) tokens, {out['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
