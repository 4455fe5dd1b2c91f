"""Decode speed and KV memory against context length: full-precision vs compressed KV cache.

For every model and context length ``T``: build a fresh cache, fill it to ``T`` tokens,
run one untimed decode step, then time ``--steps`` decode steps (the engine's own
``Engine._run`` with IOBinding, argmax feedback, exactly the per-step work of
``Engine.generate`` minus sampling/detokenization). ``tok/s = steps / seconds``; the median
over ``--repeats`` is reported. Variants are measured round-robin (order alternating every
repeat) so machine noise (other jobs on the box) hits all alike.

Variants (``--variants``):

* ``fp``         – :class:`~lemonade_inferos.kv.base.FullPrecisionKVCache` with ``model.onnx``
                   (float32 past/present, the baseline every host uses);
* ``compressed`` – :class:`~lemonade_inferos.kv.store.TieredKVCache` for ``--policy``
                   (default preset) with ``model_tiered.onnx`` (dequantization in-graph);
* ``fp16``       – diagnostic: the tiered store with every token float16 (same graph as
                   ``compressed``, no quantization), to separate graph cost from store cost.

Each variant runs in its own worker subprocess (one model session each, fed commands over
a pipe), so memory numbers are per variant: ``peak RSS`` is the worker's peak resident set
during that one measurement (Linux: ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` before building the cache; elsewhere the process-lifetime peak
from ``getrusage``), model weights included; ``idle RSS`` is the worker's RSS with the
session loaded and no cache. ``KV bytes`` are the resident store bytes (``KVStats.total_bytes``:
float32 arrays for ``fp``; float16 rows + codes + scales + zero points for the tiered store)
at exactly ``T`` tokens, and ``%fp16`` = KV bytes / (T tokens at float16).

Fill (``--fill``): ``model`` = real prefill through the graph (the prompt is the
evaluation text, repeated to length; used for the embedded model), ``random`` = the
cache's own ``update()`` fed random K/V (N(0,1)) and random attention mass in 512-token
chunks, as a chunked prefill would (output shapes read from the graph's metadata) (used for the synthetic model, whose 8K-token real
prefill would take minutes on 2 cores; decode cost does not depend on the values).

Models: ``embedded`` (stories260K, lengths 64/128/256/448) and ``synthetic``
(``benchmarks/synthetic_model.py`` preset ``default``: dim 2048, 4 layers, 32/8 heads,
head_dim 64; lengths 512/1K/2K/4K/8K). ``--quick``: embedded 64/448 and the ``small``
synthetic preset at 512/2K, fewer repeats (< 2 min).

Targets (printed PASS/FAIL, not asserted): compressed tok/s >= 0.9 x fp tok/s at every
length; compressed KV bytes <= 22 % of float16 at 8K on the synthetic model.

``--profile``: after timing, each worker runs ``--steps`` steps at the longest length with
ORT profiling on and reports the kernel time by op type and by graph region, plus the
store's Python time per step (``update``), so the report says where decode time goes.

Usage::

    python benchmarks/kv_speed.py [--quick] [--models embedded,synthetic] [--repeats N]
                                  [--steps N] [--profile]

Writes ``benchmarks/results/kv_speed.json`` (and ``kv_speed.png``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import code_state, print_code_and_targets, time_store_updates, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

MODEL_DEFAULTS = {
    # name: (lengths, timed steps per measurement, repeats, fill, reuse the filled cache)
    "embedded": ([64, 128, 256, 448], 32, 41, "model", False),
    "synthetic": ([512, 1024, 2048, 4096, 8192], 16, 10, "random", True),
}
QUICK = {
    "embedded": ([64, 448], 32, 5, "model", False),
    "synthetic": ([512, 2048], 16, 4, "random", True),
}
TARGET_SPEED_RATIO = 0.9
TARGET_KV_PCT_8K = 22.0


# ============================================================================ worker side
def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    from lemonade_inferos.sysinfo import peak_rss_bytes

    return peak_rss_bytes()


class _TimedSession:
    """Proxy of an InferenceSession that times ``run_with_iobinding``."""

    def __init__(self, sess):
        self._s = sess
        self.run_s = 0.0

    def io_binding(self):
        return self._s.io_binding()

    def run_with_iobinding(self, io, ro=None):
        t = time.perf_counter()
        self._s.run_with_iobinding(io, ro)
        self.run_s += time.perf_counter() - t


class Worker:
    def __init__(self, cfg: dict):
        import numpy as np
        import onnxruntime as ort

        from lemonade_inferos.engine import Engine
        from lemonade_inferos.ort_options import prime_run_options
        from lemonade_inferos.plugins import get_plugin_manager
        from lemonade_inferos.policy import load_policy

        self.np, self.ort = np, ort
        self.cfg = cfg
        self.variant = cfg["variant"]
        self.policy = load_policy(cfg["policy"])
        if cfg.get("threads") is not None:  # both variants alike (see --threads)
            self.policy = self.policy.merged({"runtime": {"intra_op_threads": int(cfg["threads"])}})
        # prefix cache off: repeats of one prompt must each prefill it (TTFT is measured)
        self.engine = Engine(cfg["folder"], pm=get_plugin_manager(entry_points=False), policy=self.policy, prefix_cache_bytes=0)
        self.spec = self.engine.spec
        self.rng = np.random.default_rng(0)
        self.ro = prime_run_options(ort.RunOptions())
        c = self.new_cache()
        self.graph_file = c.graph_file
        # one timing proxy for the worker's life: the engine keeps one IOBinding per
        # (cache, session) object, so the proxy must not change between steps
        self.sess = _TimedSession(self.engine.session(self.graph_file, self.policy))
        self.prompt = [int(t) for t in cfg.get("prompt", [])] or [1]
        # warm-up: a short prefill + decode
        self._prefill_model(c, min(16, self.spec.context_length // 4))
        self._decode(c, 2)
        del c
        gc.collect()
        from lemonade_inferos.sysinfo import rss_bytes

        self.idle_rss = rss_bytes()

    def new_cache(self):
        from lemonade_inferos.kv.base import FullPrecisionKVCache
        from lemonade_inferos.kv.store import TieredKVCache, store_for_scheme

        if self.variant == "fp":
            return FullPrecisionKVCache(self.spec)
        if self.variant == "compressed":
            return TieredKVCache(self.spec, self.policy)
        if self.variant == "fp16":
            return store_for_scheme("fp16", self.spec)
        raise ValueError(f"unknown variant {self.variant!r}")

    # -- filling ---------------------------------------------------------------------
    def _prefill_model(self, cache, n: int, chunk: int = 512) -> None:
        np = self.np
        ids = (self.prompt * (n // len(self.prompt) + 1))[:n]
        done = 0
        while done < n:
            s = min(chunk, n - done)
            self.engine._run(self.sess, cache, np.array([ids[done:done + s]], np.int64), done, self.ro, True)
            done += s

    def _fill_random(self, cache, n: int, chunk: int = 512) -> None:
        from lemonade_inferos.kv.base import FullPrecisionKVCache

        np, s = self.np, self.spec
        L, KV, D = s.num_layers, s.num_kv_heads, s.head_dim
        if isinstance(cache, FullPrecisionKVCache):
            outs = {}
            for i in range(L):
                outs[s.present_key_name % i] = self.rng.standard_normal((1, KV, n, D), dtype=np.float32)
                outs[s.present_value_name % i] = self.rng.standard_normal((1, KV, n, D), dtype=np.float32)
            cache.update(outs, n)
            return
        # the tiered store: feed update() what its graph would output, with shapes read from
        # the graph's output metadata (so the fill follows layout changes of kv.graph)
        metas = {o.name: o for o in self.sess._s.get_outputs()}
        names = list(cache.output_names())

        def shape_of(name: str, S: int, P: int) -> tuple[int, ...]:
            dims = []
            for d in metas[name].shape:
                if isinstance(d, int):
                    dims.append(d)
                elif "batch" in str(d):
                    dims.append(1)
                elif "total" in str(d):
                    dims.append(P + S)
                else:
                    dims.append(S)
            return tuple(dims)

        done = 0
        while done < n:
            S = min(chunk, n - done)
            P = cache.past_length
            outs = {}
            for name in names:
                shp = shape_of(name, S, P)
                if "mass" in name:
                    # attention mass of a chunked prefill: S queries spread it over P + S keys
                    m = self.rng.exponential(1.0, shp).astype(np.float32)
                    outs[name] = m * np.float32(S * L * s.num_heads / m.sum())
                else:
                    outs[name] = self.rng.standard_normal(shp, dtype=np.float32)
            cache.update(outs, S)
            done += S

    # -- decoding --------------------------------------------------------------------
    def _decode(self, cache, steps: int, sess=None) -> tuple[float, list[float]]:
        np = self.np
        sess = sess or self.sess
        pos = cache.seq_length
        ids = np.zeros((1, 1), np.int64)
        ids[0, 0] = self.prompt[pos % len(self.prompt)]
        times = []
        t_all = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            logits = self.engine._run(sess, cache, ids, pos, self.ro, True)
            ids[0, 0] = int(np.argmax(logits[-1]))
            pos += 1
            times.append(time.perf_counter() - t)
        return time.perf_counter() - t_all, times

    def measure(self, length: int, steps: int, fill: str, reuse: bool = False) -> dict:
        """Time ``steps`` decode steps at context ``length``.

        With ``reuse``, the cache filled by the previous call at the same ``length`` keeps
        decoding (so fills are not repeated) until it has grown by more than
        ``max(64, length // 8)`` tokens; then it is refilled. Peak RSS covers the fill and
        every step since.
        """
        from lemonade_inferos.sysinfo import rss_bytes

        c = getattr(self, "_cur", None)
        grown = c["cache"].seq_length + steps - length if c else 0
        if not (reuse and c and c["length"] == length and grown <= max(64, length // 8)):
            self._cur = c = None
            gc.collect()
            hwm_ok = _hwm_reset()
            cache = self.new_cache()
            t = time.perf_counter()
            if fill == "model":
                self._prefill_model(cache, length)
            else:
                self._fill_random(cache, length)
            fill_s = time.perf_counter() - t
            st = cache.stats()
            rss_filled = rss_bytes()
            upd_acc = time_store_updates(cache)  # the store's Python work per step
            self._decode(cache, 1)  # untimed first step
            c = self._cur = {"cache": cache, "length": length, "st": st, "fill_s": fill_s, "rss": rss_filled,
                             "upd": upd_acc, "hwm_ok": hwm_ok}
        cache, st = c["cache"], c["st"]
        c["upd"][0] = 0.0
        ts = self.sess
        ts.run_s = 0.0
        total, times = self._decode(cache, steps)
        st_end = cache.stats()
        peak = _hwm_bytes()
        res = {
            "length": length,
            "steps": steps,
            "fill": fill,
            "fill_s": c["fill_s"],
            "tps": steps / total,
            "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_mean": 1e3 * total / steps,
            "step_ms_max": 1e3 * max(times),
            "graph_ms_per_step": 1e3 * ts.run_s / steps,
            "update_ms_per_step": 1e3 * c["upd"][0] / steps,
            "other_ms_per_step": 1e3 * (total - ts.run_s - c["upd"][0]) / steps,
            "kv_bytes": int(st.total_bytes),
            "kv_bytes_fp16": int(st.fp16_bytes),
            "kv_pct_fp16": 100.0 * st.total_bytes / st.fp16_bytes if st.fp16_bytes else 0.0,
            "kv_bytes_by_tier": dict(st.bytes_by_tier),
            "level_tokens": {k: v // self.spec.num_layers for k, v in st.level_distribution.items()},
            "kv_tokens": int(st.tokens),
            "kv_bytes_end": int(st_end.total_bytes),
            "kv_tokens_end": int(st_end.tokens),
            "store": st.store,
            "rss_after_fill": c["rss"],
            "peak_rss": peak,
            "peak_rss_scope": "since this fill (VmHWM reset)" if c["hwm_ok"] else "process lifetime (getrusage)",
            "idle_rss": self.idle_rss,
        }
        if not reuse:
            self._cur = None
            del cache, c
            gc.collect()
        return res

    def profile(self, length: int, steps: int, fill: str) -> dict:
        """ORT kernel profile of ``steps`` decode steps at ``length``."""
        ort = self.ort
        tmp = tempfile.mkdtemp(prefix="kv_speed_prof_")
        so = self.engine.pm.session_options(self.policy, self.spec)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        psess = ort.InferenceSession(str(self.spec.folder / self.graph_file), sess_options=so,
                                     providers=["CPUExecutionProvider"])
        cache = self.new_cache()
        if fill == "model":
            self._prefill_model(cache, length)
        else:
            self._fill_random(cache, length)
        upd_acc = time_store_updates(cache)
        self._decode(cache, 1, psess)  # warm step, excluded below
        upd_acc[0] = 0.0
        total, _ = self._decode(cache, steps, psess)
        path = psess.end_profiling()
        with open(path) as f:
            events = json.load(f)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
        cut = runs[1] if len(runs) > 1 else 0
        events = [e for e in events if e.get("ts", 0) >= cut]
        by_op: dict[str, float] = {}
        by_region: dict[str, float] = {}
        by_node: dict[str, float] = {}
        kernel = 0.0
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            dur = e["dur"] / 1e3  # ms
            op = e.get("args", {}).get("op_name", "?")
            node = e["name"][: -len("_kernel_time")]
            kernel += dur
            by_op[op] = by_op.get(op, 0.0) + dur
            region = _region(node)
            by_region[region] = by_region.get(region, 0.0) + dur
            by_node[node] = by_node.get(node, 0.0) + dur
        per = lambda d: {k: round(v / steps, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
        return {
            "length": length,
            "steps": steps,
            "step_ms": 1e3 * total / steps,
            "kernel_ms_per_step": kernel / steps,
            "update_ms_per_step": 1e3 * upd_acc[0] / steps,
            "op_ms_per_step": per(by_op),
            "region_ms_per_step": per(by_region),
            "top_nodes_ms_per_step": dict(list(per(by_node).items())[:15]),
        }


def _region(node: str) -> str:
    """Coarse graph region of a node name (tiered graph: ``kv/...`` is the dequant path)."""
    node = node.lstrip("/")
    if "probs_sum" in node or "mass" in node:
        return "attention-mass output"
    if "kv_new" in node:
        return "kv.new output"
    if node.startswith(("kv/", "kv_")):
        return "kv dequant/concat (kv/*)"
    m = re.match(r"layers\.\d+/(\w+)", node)
    if m:
        part = m.group(1)
        if part in ("k_all", "v_all"):
            return "past+new concat"
        if part in ("scores", "scores_masked", "probs", "ctx", "k_t", "k_t5", "v5", "ctx_t", "ctx_flat",
                    "attn_probs"):
            return "attention (QK, softmax, PV)"
        if part in ("qkv", "qkv_rot", "w1", "w3", "w2", "attn_out"):
            return "weight matmuls"
        return "other layer ops"
    return "other"


def worker_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    out = sys.stdout
    sys.stdout = sys.stderr  # keep the protocol channel clean
    try:
        w = Worker(cfg)
        print(json.dumps({"ready": True, "graph": w.graph_file, "idle_rss": w.idle_rss}), file=out, flush=True)
    except Exception as e:  # noqa: BLE001 -- any setup failure is reported to the parent, then quit
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=out, flush=True)
        return 1
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "measure":
                r = w.measure(cmd["length"], cmd["steps"], cmd["fill"], cmd.get("reuse", False))
            elif cmd["cmd"] == "profile":
                w._cur = None
                gc.collect()
                r = w.profile(cmd["length"], cmd["steps"], cmd["fill"])
            elif cmd["cmd"] == "quit":
                break
            else:
                r = {"error": f"unknown command {cmd['cmd']!r}"}
        except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises it
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(r), file=out, flush=True)
    return 0


# ============================================================================ parent side
class WorkerProc:
    def __init__(self, cfg: dict):
        self.variant = cfg["variant"]
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        if "error" in hello:
            raise RuntimeError(f"worker {self.variant}: {hello['error']}")
        self.hello = hello

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} exited (rc={self.p.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        r = self._read()
        if "error" in r:
            raise RuntimeError(f"worker {self.variant}: {r['error']}")
        return r

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.close()
        except OSError:
            pass
        self.p.wait(timeout=60)


def _model_folder(model: str, quick: bool, say) -> tuple[Path, dict]:
    if model == "embedded":
        from lemonade_inferos.model.embedded import embedded_model_dir

        folder = embedded_model_dir()
        if not (folder / "model_tiered.onnx").is_file():
            from lemonade_inferos.kv.graph import write_tiered_graph
            from lemonade_inferos.model.embedded import embedded_source_files

            say(f"note: {folder} has no model_tiered.onnx; writing it with kv.graph.write_tiered_graph")
            write_tiered_graph(embedded_source_files()[0], folder)
        return folder, {"name": "stories260K (embedded)"}
    sys.path.insert(0, str(HERE))
    import synthetic_model as sm

    preset = "small" if quick else "default"
    folder = sm.ensure_synthetic_model(preset, progress=say)
    return folder, {"name": f"synthetic-{preset}", "description": sm.describe(preset)}


def _prompt_ids() -> list[int]:
    from lemonade_inferos.engine.text import TextCodec
    from lemonade_inferos.model.embedded import embedded_model_dir
    from lemonade_inferos.model.spec import DecoderSpec

    text = (HERE / "data" / "eval_stories.txt").read_text(encoding="utf-8")
    return TextCodec(DecoderSpec.from_folder(embedded_model_dir())).encode(text)


def run_model(model: str, args, say) -> dict:
    lengths, steps, repeats, fill, reuse = (QUICK if args.quick else MODEL_DEFAULTS)[model]
    if args.lengths and model in args.lengths:
        lengths = args.lengths[model]
    steps = args.steps or steps
    repeats = args.repeats or repeats
    fill = args.fill or fill
    folder, info = _model_folder(model, args.quick, say)
    variants = args.variants.split(",")
    say(f"[{model}] {folder}: variants {variants}, lengths {lengths}, {steps} steps x {repeats} repeats, fill {fill}")
    prompt = _prompt_ids()
    workers = {}
    try:
        for v in variants:
            workers[v] = WorkerProc({"variant": v, "folder": str(folder), "policy": args.policy, "prompt": prompt,
                                     "threads": args.threads or None})
        samples: dict[str, dict[int, list[dict]]] = {v: {n: [] for n in lengths} for v in variants}
        for n in lengths:
            for r in range(repeats):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    samples[v][n].append(workers[v].ask(cmd="measure", length=n, steps=steps, fill=fill,
                                                        reuse=reuse))
                say(f"[{model}] T={n} repeat {r + 1}/{repeats}: " + "  ".join(
                    f"{v} {samples[v][n][-1]['tps']:.1f} tok/s" for v in variants))
        profiles = {}
        if args.profile:
            # interleaved rounds; keep each variant's fastest round (least disturbed by other jobs)
            for rnd in range(args.profile_rounds):
                for v in (variants if rnd % 2 == 0 else variants[::-1]):
                    say(f"[{model}] profiling {v} at T={lengths[-1]} (round {rnd + 1}/{args.profile_rounds})")
                    p = workers[v].ask(cmd="profile", length=lengths[-1], steps=steps, fill=fill)
                    p["rounds"] = args.profile_rounds
                    if v not in profiles or p["step_ms"] < profiles[v]["step_ms"]:
                        profiles[v] = p
        idle = {v: w.hello["idle_rss"] for v, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    rows = []
    for n in lengths:
        row = {"length": n}
        for v in variants:
            s = samples[v][n]

            def med(k: str, s: list[dict] = s) -> float:
                return statistics.median(x[k] for x in s)

            last = s[-1]
            row[v] = {
                "tps_median": med("tps"),
                "tps_all": [round(x["tps"], 2) for x in s],
                "tps_max": max(x["tps"] for x in s),
                "step_ms_median": med("step_ms_median"),
                "step_ms_mean": med("step_ms_mean"),
                "graph_ms_per_step": med("graph_ms_per_step"),
                "update_ms_per_step": med("update_ms_per_step"),
                "other_ms_per_step": med("other_ms_per_step"),
                "kv_bytes": last["kv_bytes"],
                "kv_bytes_fp16": last["kv_bytes_fp16"],
                "kv_pct_fp16": last["kv_pct_fp16"],
                "kv_bytes_by_tier": last["kv_bytes_by_tier"],
                "level_tokens": last["level_tokens"],
                "store": last["store"],
                "peak_rss": max(x["peak_rss"] for x in s),
                "peak_rss_scope": last["peak_rss_scope"],
                "rss_after_fill": med("rss_after_fill"),
                "idle_rss": idle[v],
                "fill_s": med("fill_s"),
            }
        if "fp" in variants:
            for v in variants:
                if v != "fp":
                    row[v]["speed_vs_fp"] = row[v]["tps_median"] / row["fp"]["tps_median"]
                    row[v]["speed_vs_fp_best"] = row[v]["tps_max"] / row["fp"]["tps_max"]
                    # repeats alternate fp/compressed back to back: the ratio within each
                    # pair cancels slow load drifts from other jobs on the machine
                    row[v]["speed_vs_fp_paired"] = statistics.median(
                        a["tps"] / b["tps"] for a, b in zip(samples[v][n], samples["fp"][n]))
        rows.append(row)
    return {"model": info["name"], "folder": str(folder), "info": info, "lengths": lengths, "steps": steps,
            "repeats": repeats, "fill": fill, "reuse": reuse, "variants": variants, "rows": rows, "profiles": profiles}


def targets(out: dict) -> list[dict]:
    rows = []
    for m in out["models"]:
        for row in m["rows"]:
            c = row.get("compressed")
            if c and "speed_vs_fp_paired" in c:
                rows.append({"target": f"{m['model']} T={row['length']}: compressed tok/s >= 0.9x fp",
                             "value": c["speed_vs_fp_paired"], "limit": TARGET_SPEED_RATIO, "op": ">=",
                             "metric": "median over repeats of the back-to-back pair ratio",
                             "pass": c["speed_vs_fp_paired"] >= TARGET_SPEED_RATIO})
        if m["model"].startswith("synthetic"):
            for row in m["rows"]:
                c = row.get("compressed")
                if c and row["length"] == 8192:
                    rows.append({"target": f"{m['model']} T=8192: compressed KV bytes <= 22% of fp16",
                                 "value": c["kv_pct_fp16"], "limit": TARGET_KV_PCT_8K, "op": "<=",
                                 "pass": c["kv_pct_fp16"] <= TARGET_KV_PCT_8K})
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def print_tables(out: dict) -> None:
    for m in out["models"]:
        print(f"\ndecode speed vs context — {m['model']} ({m['fill']} fill{', cache reused across repeats' if m.get('reuse') else ''}, "
              f"{m['steps']} timed steps x {m['repeats']} repeats, policy {out['policy']!r} for 'compressed', "
              f"{out.get('threads') or 'default'} intra-op thread(s))")
        if m["info"].get("description"):
            print(f"  {m['info']['description']}")
        hdr = (f"{'T':>6s} {'variant':10s} {'tok/s':>8s} {'vs fp':>6s} {'med':>6s} {'best':>6s} {'ms/step':>8s} {'graph':>7s} {'store':>6s} "
               f"{'KV MiB':>8s} {'%fp16':>6s} {'peakRSS':>8s} {'idleRSS':>8s}  tiers (MiB L0/L1/L2; tokens L0/L1/L2/L3)")
        print(hdr)
        print("-" * len(hdr))
        for row in m["rows"]:
            for v in m["variants"]:
                r = row[v]
                ratio = f"{r['speed_vs_fp_paired']:.2f}x" if "speed_vs_fp_paired" in r else ""
                med = f"{r['speed_vs_fp']:.2f}x" if "speed_vs_fp" in r else ""
                best = f"{r['speed_vs_fp_best']:.2f}x" if "speed_vs_fp_best" in r else ""
                by = r["kv_bytes_by_tier"]
                tiers = ""
                if "L0_fp16" in by:
                    lt = r["level_tokens"]
                    tiers = (f"{_mib(by.get('L0_fp16', 0))}/{_mib(by.get('L1_int8', 0))}/{_mib(by.get('L2_int4', 0))}; "
                             f"{lt.get('L0', 0)}/{lt.get('L1', 0)}/{lt.get('L2', 0)}/{lt.get('L3', 0)}")
                print(f"{row['length']:6d} {v:10s} {r['tps_median']:8.1f} {ratio:>6s} {med:>6s} {best:>6s} {r['step_ms_mean']:8.2f} "
                      f"{r['graph_ms_per_step']:7.2f} {r['update_ms_per_step']:6.2f} {_mib(r['kv_bytes']):>8s} "
                      f"{r['kv_pct_fp16']:6.1f} {_mib(r['peak_rss']):>8s} {_mib(r['idle_rss']):>8s}  {tiers}")
        print("  tok/s = median over repeats; vs fp = median of the per-repeat compressed/fp ratios (fp and compressed "
              "run back to back, so the pair ratio cancels load drift; the target uses it); med = ratio of the "
              "medians; best = ratio of the best repeats; "
              "ms/step = mean step (1000/tok/s); graph = ORT run_with_iobinding per step; store = KVCache.update per step "
              "(mean); KV = resident store bytes at T tokens; peakRSS (MiB) = worker peak during the measurement "
              "(weights incl.); idleRSS = worker with session loaded, no cache")
        for v, p in m.get("profiles", {}).items():
            print(f"  ORT profile {v} at T={p['length']} (fastest of {p.get('rounds', 1)} rounds): {p['step_ms']:.2f} ms/step "
                  f"(profiling on), kernels {p['kernel_ms_per_step']:.2f} ms, "
                  f"store update {p['update_ms_per_step']:.2f} ms")
            print("    by region: " + ", ".join(f"{k} {v2:.2f}" for k, v2 in list(p["region_ms_per_step"].items())[:6]))
            print("    by op:     " + ", ".join(f"{k} {v2:.2f}" for k, v2 in list(p["op_ms_per_step"].items())[:8]))
            print("    top nodes: " + ", ".join(f"{k} {v2:.2f}" for k, v2 in list(p["top_nodes_ms_per_step"].items())[:6]))
    print_code_and_targets(out, width=58, fmt=".3f")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = out["models"]
    fig, axes = plt.subplots(2, len(ms), figsize=(6 * len(ms), 8), squeeze=False)
    for j, m in enumerate(ms):
        xs = [r["length"] for r in m["rows"]]
        for v in m["variants"]:
            axes[0][j].plot(xs, [r[v]["tps_median"] for r in m["rows"]], marker="o", label=v)
            axes[1][j].plot(xs, [r[v]["kv_bytes"] / 2**20 for r in m["rows"]], marker="o", label=f"{v} KV")
        axes[1][j].plot(xs, [r[m["variants"][0]]["kv_bytes_fp16"] / 2**20 for r in m["rows"]], ls=":", color="gray",
                        label="fp16 reference")
        for k, v in enumerate(m["variants"]):
            axes[1][j].plot(xs, [(r[v]["peak_rss"] - r[v]["idle_rss"]) / 2**20 for r in m["rows"]], ls="--",
                            marker="x", color=f"C{k}", alpha=0.7, label=f"{v} peak RSS - idle RSS")
        axes[0][j].set_title(m["model"])
        axes[0][j].set_ylabel("decode tokens/s (median)")
        axes[1][j].set_ylabel("MiB")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_lengths(spec: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split(";")):
        name, vals = part.split("=")
        out[name.strip()] = [int(x) for x in vals.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< 2 min): fewer lengths, small synthetic model")
    ap.add_argument("--models", default="embedded,synthetic")
    ap.add_argument("--variants", default="fp,compressed", help="comma-separated: fp, compressed, fp16")
    ap.add_argument("--policy", default="default", help="preset of the compressed variant")
    ap.add_argument("--threads", type=int, default=None,
                    help="onnxruntime intra-op threads of every variant's session (default 1: "
                         "single-stream decode; with --model 2, for every engine; 0 = the policy's setting, "
                         "i.e. ORT's default)")
    ap.add_argument("--lengths", default="", help="e.g. 'embedded=64,448;synthetic=512,8192'")
    ap.add_argument("--steps", type=int, default=0, help="timed decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--fill", choices=["model", "random"], default=None, help="override the per-model fill")
    ap.add_argument("--profile", action="store_true", help="ORT-profile each variant at the longest length")
    ap.add_argument("--profile-rounds", type=int, default=3, help="interleaved profile rounds (fastest kept)")
    ap.add_argument("--out", default="")
    ap.add_argument("--plot", default=None, help="PNG path ('' = none)")
    ap.add_argument("--model", default=None, metavar="NAME|DIR",
                    help="a real model (e.g. smollm2-135m-instruct): our engine vs onnxruntime-genai and "
                    "llama.cpp, decode tok/s and TTFT (see benchmarks/_kv_speed_model.py)")
    ap.add_argument("--engines", default="", help="with --model: subset of og,ours-fp,ours-default,"
                    "llama.cpp-f16,llama.cpp-q4_0")
    args = ap.parse_args(argv)
    if args.model:
        import _kv_speed_model as M

        args.lengths = args.lengths or "256,1024,4096,8064"
        args.steps = args.steps or 64
        args.repeats = args.repeats or 3
        args.threads = 2 if args.threads is None else args.threads
        tag = Path(args.model).name.split("-")[0]
        t0 = time.perf_counter()
        out = M.run(args)
        out["seconds"] = time.perf_counter() - t0
        M.print_table(out)
        write_results(out, args.out or str(RESULTS / f"kv_speed_{tag}.json"),
                      str(RESULTS / f"kv_speed_{tag}.png") if args.plot is None else args.plot, M.plot)
        return 0
    args.threads = 1 if args.threads is None else args.threads
    args.lengths = _parse_lengths(args.lengths)
    stem = "kv_speed.quick" if args.quick else "kv_speed"
    args.out = args.out or str(RESULTS / f"{stem}.json")
    if args.plot is None:
        args.plot = str(RESULTS / f"{stem}.png")
    say = lambda m: print(m, file=sys.stderr, flush=True)
    from lemonade_inferos.sysinfo import machine_description

    t0 = time.perf_counter()
    out = {"benchmark": "kv_speed", "quick": args.quick, "policy": args.policy, "threads": args.threads,
           "machine": machine_description(),
           "code": code_state(),
           "models": [run_model(m, args, say) for m in args.models.split(",")]}
    out["targets"] = targets(out)
    out["seconds"] = time.perf_counter() - t0
    print_tables(out)
    write_results(out, args.out, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
