"""A synthetic Llama-shaped model with random weights, for KV-cache speed/memory benchmarks.

Random (seeded) weights scaled like a trained model's initialisation, so activations stay
in a sane range at every layer and every context length: all matrices ``normal(0, 0.02)``
(GPT-2 / Llama init), the residual-stream output projections (``wo``, ``w2``) scaled by
``1/sqrt(2 * n_layers)`` (GPT-2's scaled init), RMSNorm weights 1, classifier shared with
the token embedding. The model is *not* trained: its logits are close to uniform. It is
only meant for timing and memory at long contexts; quality is measured on the embedded
(trained) stories260K model by ``kv_quality.py``.

Shapes (``--preset``; all use the 512-token stories tokenizer ``tok512.bin``, head_dim 64):

=========  ====  ======  ======  ========  ======  =====  =======  ==========  ===========
preset      dim  layers   heads  kv_heads  hidden  vocab  context  params      KV fp16/tok
=========  ====  ======  ======  ========  ======  =====  =======  ==========  ===========
default    2048       4      32         8    5632    512     8704  181 M        8 KiB
small       512       4       8         4    1408    512     4608  12.1 M       4 KiB
=========  ====  ======  ======  ========  ======  =====  =======  ==========  ===========

``default`` is a 1/8-depth slice of a TinyLlama/Llama-3-style block (dim 2048, 32 query
heads sharing 8 KV heads, head_dim 64, SwiGLU hidden 2.75x dim): each ONNX graph is
~1.04 GB (0.8 GB of folded float32 weights + 0.2 GB of RoPE tables for 8704 positions;
below protobuf's 2 GB limit, so weights stay embedded). Building it takes ~1 min and
~4 GB of RAM once; it is rebuilt when the generator or the graph-writing code changes.
The context is 8192 + 512 so that 512 decode steps fit after an 8K-token prefill.
KV per token = 2 (K,V) x layers x kv_heads x head_dim elements.

The folder (``benchmarks/out/synthetic-<preset>/``, gitignored) is written with the
project's own converter pieces: ``model.onnx`` from
:func:`lemonade_inferos.model.export.build_decoder`, ``genai_config.json`` from
:func:`lemonade_inferos.model.convert.genai_config`, tokenizer files from
:class:`lemonade_inferos.model.tokenizer.Llama2cTokenizer`, and ``model_tiered.onnx`` from
:func:`lemonade_inferos.kv.graph.write_tiered_graph` (when that module exists). A manifest
(shape + seed + generator version) makes later calls reuse the folder.

Usage::

    python benchmarks/synthetic_model.py [--preset default|small] [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from lemonade_inferos.model.convert import genai_config
from lemonade_inferos.model.embedded import embedded_source_files
from lemonade_inferos.model.export import build_decoder
from lemonade_inferos.model.llama2c import Llama2cConfig, Llama2cWeights
from lemonade_inferos.model.tokenizer import Llama2cTokenizer

#: bump when the generated files change.
GENERATOR_VERSION = "2"
MANIFEST = "synthetic_manifest.json"
OUT_ROOT = Path(__file__).resolve().parent / "out"

PRESETS: dict[str, Llama2cConfig] = {
    "default": Llama2cConfig(dim=2048, hidden_dim=5632, n_layers=4, n_heads=32, n_kv_heads=8,
                             vocab_size=512, seq_len=8192 + 512),
    "small": Llama2cConfig(dim=512, hidden_dim=1408, n_layers=4, n_heads=8, n_kv_heads=4,
                           vocab_size=512, seq_len=4096 + 512),
}


def param_count(c: Llama2cConfig) -> int:
    """Parameters of a llama2.c model with a shared classifier."""
    hs = c.head_size
    per_layer = (2 * c.dim + c.dim * c.n_heads * hs * 2 + 2 * c.dim * c.n_kv_heads * hs
                 + 3 * c.dim * c.hidden_dim)
    return c.vocab_size * c.dim + c.n_layers * per_layer + c.dim


def kv_elements_per_token(c: Llama2cConfig) -> int:
    """K + V scalars one token occupies across all layers."""
    return 2 * c.n_layers * c.n_kv_heads * c.head_size


def synthetic_weights(config: Llama2cConfig, seed: int = 0, std: float = 0.02) -> Llama2cWeights:
    """Seeded random :class:`Llama2cWeights` (float32), see the module docstring for scaling."""
    rng = np.random.default_rng(seed)
    c = config
    L, hs = c.n_layers, c.head_size

    def normal(*shape: int, scale: float = std) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    resid = std / np.sqrt(2 * L)
    emb = normal(c.vocab_size, c.dim)
    return Llama2cWeights(
        config=c,
        token_embedding=emb,
        rms_att=np.ones((L, c.dim), np.float32),
        wq=normal(L, c.n_heads * hs, c.dim),
        wk=normal(L, c.n_kv_heads * hs, c.dim),
        wv=normal(L, c.n_kv_heads * hs, c.dim),
        wo=normal(L, c.dim, c.n_heads * hs, scale=resid),
        rms_ffn=np.ones((L, c.dim), np.float32),
        w1=normal(L, c.hidden_dim, c.dim),
        w2=normal(L, c.dim, c.hidden_dim, scale=resid),
        w3=normal(L, c.hidden_dim, c.dim),
        rms_final=np.ones((c.dim,), np.float32),
        wcls=emb,
    )


def _code_hash(*modules: str) -> str:
    """Short sha256 of the source files of ``modules`` (so graphs are rebuilt when the code
    that writes them changes; the KV graph is under active development)."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for name in modules:
        try:
            mod = importlib.import_module(name)
            h.update(Path(mod.__file__).read_bytes())
        except ImportError:
            h.update(b"missing:" + name.encode())
    return h.hexdigest()[:16]


def _model_code() -> str:
    return _code_hash("lemonade_inferos.model.export", "lemonade_inferos.model.llama2c")


def _tiered_code() -> str:
    return _code_hash("lemonade_inferos.model.export", "lemonade_inferos.kv.graph")


def _manifest(preset: str, config: Llama2cConfig, seed: int) -> dict:
    return {
        "generator": "benchmarks/synthetic_model.py",
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "config": asdict(config),
        "params": param_count(config),
        "kv_elements_per_token": kv_elements_per_token(config),
        "model_code": _model_code(),
    }


def _up_to_date(folder: Path, want: dict, tiered: bool) -> bool:
    try:
        have = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if any(have.get(k) != v for k, v in want.items()):
        return False
    files = ["model.onnx", "genai_config.json", "tokenizer.json"]
    if tiered:
        files.append("model_tiered.onnx")
        if have.get("tiered_code") != _tiered_code():
            return False
    return all((folder / f).is_file() for f in files)


def _write_tiered(weights: Llama2cWeights, folder: Path, say) -> bool:
    try:
        from lemonade_inferos.kv.graph import write_tiered_graph
    except ImportError as e:  # the KV store is not there yet
        say(f"no tiered graph: {e}")
        return False
    for old in folder.glob("model_tiered*.onnx"):  # incl. variants derived by kv.graph.ensure_graph
        old.unlink()
    t = time.perf_counter()
    write_tiered_graph(weights, folder)
    say(f"wrote model_tiered.onnx ({time.perf_counter() - t:.0f} s)")
    mp = folder / MANIFEST
    if mp.is_file():
        m = json.loads(mp.read_text())
        m["tiered_code"] = _tiered_code()
        mp.write_text(json.dumps(m, indent=2) + "\n")
    return True


def ensure_synthetic_model(preset: str = "default", *, seed: int = 0, out_root: Path = OUT_ROOT,
                           force: bool = False, tiered: bool = True, progress=None) -> Path:
    """Folder of the synthetic model ``preset`` (built on first use, then reused).

    Args:
        preset: a key of :data:`PRESETS`.
        seed: weight seed.
        out_root: parent folder (default ``benchmarks/out``).
        force: rebuild even when the folder is up to date.
        tiered: also write ``model_tiered.onnx`` (needs :mod:`lemonade_inferos.kv.graph`).
        progress: called with short messages.

    Returns:
        the model folder (absolute).
    """
    say = progress or (lambda _m: None)
    config = PRESETS[preset]
    folder = (Path(out_root) / f"synthetic-{preset}").resolve()
    want = _manifest(preset, config, seed)
    if not force and _up_to_date(folder, want, tiered):
        return folder
    if not force and _up_to_date(folder, want, False) and tiered:
        # only the tiered graph is missing or stale (the KV graph code changed)
        say("(re)writing model_tiered.onnx of an existing synthetic model")
        _write_tiered(synthetic_weights(config, seed), folder, say)
        return folder
    say(f"building synthetic model {preset!r}: {param_count(config) / 1e6:.1f} M params, seed {seed}")
    t0 = time.perf_counter()
    weights = synthetic_weights(config, seed)
    _, tok_path = embedded_source_files()
    tok = Llama2cTokenizer.load(tok_path, config.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model = build_decoder(weights, context_length=config.seq_len, name=f"synthetic_{preset}",
                              check=False)
        onnx.save_model(model, str(tmp / "model.onnx"))
        del model
        say(f"wrote model.onnx ({time.perf_counter() - t0:.0f} s)")
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(weights), indent=2) + "\n")
        tok.write_hf_files(tmp, config.seq_len)
        (tmp / MANIFEST).write_text(json.dumps(want, indent=2) + "\n")
        if tiered:
            _write_tiered(weights, tmp, say)
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"synthetic model ready in {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def describe(preset: str) -> str:
    c = PRESETS[preset]
    kv = kv_elements_per_token(c)
    return (f"{preset}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} KV heads, "
            f"head_dim {c.head_size}, hidden {c.hidden_dim}, vocab {c.vocab_size}, context {c.seq_len}; "
            f"{param_count(c) / 1e6:.1f} M params ({param_count(c) * 4 / 2**20:.0f} MiB fp32); "
            f"KV {kv} elements/token = {kv * 2 / 1024:.0f} KiB fp16/token, "
            f"{kv * 2 * 8192 / 2**20:.0f} MiB fp16 at 8K")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--no-tiered", action="store_true", help="skip model_tiered.onnx")
    args = ap.parse_args(argv)
    print(describe(args.preset))
    folder = ensure_synthetic_model(args.preset, seed=args.seed, force=args.force,
                                    tiered=not args.no_tiered, progress=print)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
