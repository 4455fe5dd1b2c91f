"""Load a llama2.c checkpoint ("legacy" export version 0) into numpy float32 weights.

Format (karpathy/llama2.c ``run.c``: ``read_checkpoint`` / ``memory_map_weights``):

* header: 7 little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len``; a negative ``vocab_size`` means a separate classifier (``wcls``)
  follows the other tensors, a positive one means the classifier is the token embedding;
* then float32 row-major tensors, matrices stored ``[out, in]`` (``y = W @ x``)::

    token_embedding [vocab, dim]        rms_att  [L, dim]
    wq [L, n_heads*hs, dim]             wk [L, n_kv_heads*hs, dim]
    wv [L, n_kv_heads*hs, dim]          wo [L, dim, n_heads*hs]
    rms_ffn [L, dim]                    w1 [L, hidden, dim]
    w2 [L, dim, hidden]                 w3 [L, hidden, dim]
    rms_final [dim]                     freq_cis_real/imag [seq_len, hs/2] (skipped)
    wcls [vocab, dim]                   (only when vocab_size < 0)
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .weights import DecoderConfig, DecoderWeights

HEADER_FORMAT = "<7i"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 28

#: RMSNorm epsilon used by llama2.c ``rmsnorm``.
RMS_EPS = 1e-5
#: RoPE base used by llama2.c (``1/10000^(i/head_size)`` for even i).
ROPE_THETA = 10000.0


#: llama2.c checkpoints are :class:`DecoderConfig` / :class:`DecoderWeights` with llama2.c's
#: RoPE base and RMSNorm epsilon (the defaults); the names stay for readability.
Llama2cConfig = DecoderConfig
Llama2cWeights = DecoderWeights


def _validate_config(path: Path, cfg: Llama2cConfig) -> None:
    fields = {
        "dim": cfg.dim,
        "hidden_dim": cfg.hidden_dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len,
    }
    for name, value in fields.items():
        if not 0 < value <= 1 << 20:
            raise ValueError(
                f"{path}: header field {name}={value} is out of range; "
                "not a llama2.c (legacy v0) checkpoint or the file is corrupt"
            )
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"{path}: dim={cfg.dim} is not divisible by n_heads={cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"{path}: n_heads={cfg.n_heads} is not a multiple of n_kv_heads={cfg.n_kv_heads}"
        )
    if cfg.head_size % 2:
        raise ValueError(f"{path}: head_size={cfg.head_size} is odd; RoPE needs pairs")


def load_llama2c(path: str | Path) -> Llama2cWeights:
    """Read a llama2.c legacy (version 0) checkpoint.

    Args:
        path: the ``.bin`` file (e.g. ``stories260K.bin``).

    Returns:
        :class:`Llama2cWeights` with C-contiguous float32 arrays (copies, the file is closed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is shorter than the header, a header field is out of range or
            inconsistent, or the file size does not match the header (truncated, trailing
            bytes, or a newer export version); the message names the file and the problem.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < HEADER_BYTES:
        raise ValueError(
            f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, "
            f"the header alone needs {HEADER_BYTES}"
        )
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from(HEADER_FORMAT, data)
    shared = vocab > 0
    cfg = Llama2cConfig(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, shared)
    _validate_config(path, cfg)

    hs = cfg.head_size
    L = cfg.n_layers
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (cfg.vocab_size, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, n_heads * hs, dim)),
        ("wk", (L, n_kv * hs, dim)),
        ("wv", (L, n_kv * hs, dim)),
        ("wo", (L, dim, n_heads * hs)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
        ("_freq_cis_real", (seq_len, hs // 2)),
        ("_freq_cis_imag", (seq_len, hs // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (cfg.vocab_size, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = HEADER_BYTES + 4 * n_floats
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: llama2.c checkpoint {what}: {len(data)} bytes but the header "
            f"(dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv}, vocab_size={vocab}, seq_len={seq_len}) implies {expected}"
        )
    flat = np.frombuffer(data, dtype="<f4", offset=HEADER_BYTES, count=n_floats)
    tensors: dict[str, np.ndarray] = {}
    off = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arr = flat[off : off + n].reshape(shape).astype(np.float32, copy=True)
        off += n
        if not name.startswith("_"):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{path}: tensor {name} contains NaN or Inf values (corrupt)")
            tensors[name] = arr
    if shared:
        tensors["wcls"] = tensors["token_embedding"]
    return Llama2cWeights(config=cfg, source=path, **tensors)


def save_llama2c(weights: Llama2cWeights, path: str | Path) -> Path:
    """Write ``weights`` in the llama2.c legacy format (inverse of :func:`load_llama2c`).

    Used by tests to build synthetic checkpoints (e.g. with a separate classifier). The
    legacy RoPE tables are written as llama2.c's ``export.py`` computes them.
    """
    cfg = weights.config
    path = Path(path)
    shared = weights.wcls is weights.token_embedding
    vocab = cfg.vocab_size if shared else -cfg.vocab_size
    hs = cfg.head_size
    freqs = 1.0 / (ROPE_THETA ** (np.arange(0, hs, 2)[: hs // 2] / hs))
    ang = np.outer(np.arange(cfg.seq_len), freqs)
    parts = [
        weights.token_embedding, weights.rms_att, weights.wq, weights.wk, weights.wv,
        weights.wo, weights.rms_ffn, weights.w1, weights.w2, weights.w3, weights.rms_final,
        np.cos(ang), np.sin(ang),
    ]
    if not shared:
        parts.append(weights.wcls)
    with open(path, "wb") as f:
        f.write(struct.pack(HEADER_FORMAT, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                            cfg.n_kv_heads, vocab, cfg.seq_len))
        for p in parts:
            f.write(np.ascontiguousarray(p, dtype="<f4").tobytes())
    return path
