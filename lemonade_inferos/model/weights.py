"""One weights type for every checkpoint source (llama2.c, GGUF, Hugging Face safetensors).

Every loader (:mod:`.llama2c`, :mod:`.gguf`, :mod:`.hf`) returns a :class:`DecoderWeights`;
:func:`lemonade_inferos.model.export.build_decoder` builds both decoder graphs from it, and
:func:`lemonade_inferos.model.reference.forward` is the numpy reference over the same
arrays. Differences between model families are data in :class:`DecoderConfig` (RoPE base,
RMSNorm epsilon, head size, QKV biases, tied classifier), not code forks.

Conventions (shared by all sources):

* matrices are float32 ``[out, in]`` (PyTorch ``nn.Linear`` layout);
* q/k rows are in the **interleaved-pair RoPE layout** (head_dim elements ``2m``/``2m+1``
  form rotation pair ``m``, as llama2.c and llama.cpp's ``LLAMA_ROPE_TYPE_NORM``). Sources
  in Hugging Face's rotate-half layout (pairs ``m``/``m + D/2``; HF Llama/Qwen2 checkpoints,
  GGUF ``qwen2``) are permuted on load with :func:`half_to_interleaved_rows` — the inverse
  of llama.cpp ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DecoderConfig:
    """Shape and numeric facts of a Llama-family decoder (sizes in elements / tokens).

    Attributes:
        dim: hidden size (embedding width).
        hidden_dim: feed-forward (SwiGLU) inner size.
        n_layers, n_heads, n_kv_heads: transformer blocks, query heads, KV heads (GQA).
        vocab_size: rows of the embedding / classifier.
        seq_len: context length in tokens (RoPE table rows, max position + 1).
        shared_classifier: the classifier is the token embedding (tied weights).
        rope_theta: RoPE base (10,000 for llama2.c/Llama 2, 100,000 for SmolLM2,
            500,000 for Llama 3, 1,000,000 for Qwen2).
        rms_eps: RMSNorm epsilon inside the square root.
        head_dim: per-head size when it is not ``dim // n_heads`` (None = derived).
        architecture: source family name (``llama``, ``qwen2``, ``mistral``; informative).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    head_dim: int | None = None
    architecture: str = "llama"

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim else self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def kv_mul(self) -> int:
        """Query heads per KV head (grouped-query attention factor)."""
        return self.n_heads // self.n_kv_heads

    def validate(self, where: str = "model") -> "DecoderConfig":
        """Check the sizes are consistent.

        Raises:
            ValueError: a size is out of range or inconsistent (names ``where`` and the field).
        """
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 < v <= 1 << 24:
                raise ValueError(f"{where}: {name}={v!r} is out of range (1..{1 << 24})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"{where}: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{where}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"{where}: head_size={self.head_size} is odd; RoPE needs pairs")
        if not (self.rope_theta > 0 and 0 < self.rms_eps < 1):
            raise ValueError(f"{where}: rope_theta={self.rope_theta} / rms_eps={self.rms_eps} out of range")
        return self


@dataclass(frozen=True, eq=False)
class DecoderWeights:
    """All weights of a decoder as float32 numpy arrays (matrices ``[out, in]``).

    L = layers, H/KV = query/KV heads, D = head size. ``wcls`` is the classifier
    ``[vocab, dim]``; it is the same array object as ``token_embedding`` when tied.
    ``bq``/``bk``/``bv`` are the QKV biases ``[L, H*D]``/``[L, KV*D]`` of families that have
    them (Qwen2), else None. q/k rows (and ``bq``/``bk``) are in the interleaved RoPE layout.
    """

    config: DecoderConfig
    token_embedding: np.ndarray  # [vocab, dim]
    rms_att: np.ndarray  # [L, dim]
    wq: np.ndarray  # [L, H*D, dim]
    wk: np.ndarray  # [L, KV*D, dim]
    wv: np.ndarray  # [L, KV*D, dim]
    wo: np.ndarray  # [L, dim, H*D]
    rms_ffn: np.ndarray  # [L, dim]
    w1: np.ndarray  # [L, hidden, dim]  (gate)
    w2: np.ndarray  # [L, dim, hidden]  (down)
    w3: np.ndarray  # [L, hidden, dim]  (up)
    rms_final: np.ndarray  # [dim]
    wcls: np.ndarray  # [vocab, dim]
    source: Path | None = None
    bq: np.ndarray | None = None  # [L, H*D]
    bk: np.ndarray | None = None  # [L, KV*D]
    bv: np.ndarray | None = None  # [L, KV*D]

    @property
    def has_qkv_bias(self) -> bool:
        return self.bq is not None

    def check_shapes(self, where: str = "model") -> "DecoderWeights":
        """Check every array's shape against the config and that all values are finite.

        Raises:
            ValueError: names the tensor, its shape and the expected shape.
        """
        c = self.config
        L, D, H, KV = c.n_layers, c.head_size, c.n_heads, c.n_kv_heads
        want = {
            "token_embedding": (c.vocab_size, c.dim), "rms_att": (L, c.dim), "wq": (L, H * D, c.dim),
            "wk": (L, KV * D, c.dim), "wv": (L, KV * D, c.dim), "wo": (L, c.dim, H * D),
            "rms_ffn": (L, c.dim), "w1": (L, c.hidden_dim, c.dim), "w2": (L, c.dim, c.hidden_dim),
            "w3": (L, c.hidden_dim, c.dim), "rms_final": (c.dim,), "wcls": (c.vocab_size, c.dim),
        }
        if self.bq is not None:
            want.update(bq=(L, H * D), bk=(L, KV * D), bv=(L, KV * D))
        for name, shape in want.items():
            arr = getattr(self, name)
            if arr is None or tuple(arr.shape) != shape:
                got = None if arr is None else tuple(arr.shape)
                raise ValueError(f"{where}: tensor {name} has shape {got}, expected {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{where}: tensor {name} contains NaN or Inf values (corrupt)")
        return self


def half_to_interleaved_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k projection rows from rotate-half to interleaved-pair RoPE layout.

    Hugging Face's ``rotate_half`` pairs head element ``m`` with ``m + D/2``; llama2.c and
    llama.cpp pair ``2m`` with ``2m+1``. Row ``2m + j`` of a head in the result is row
    ``j*D/2 + m`` of the input (llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``).

    Args:
        w: ``[n_heads*D, in]`` weight or ``[n_heads*D]`` bias, any float dtype.
        n_heads: heads in ``w`` (query or KV heads).

    Returns:
        array of the same shape and dtype.

    Raises:
        ValueError: the rows do not split into ``n_heads`` heads of even size.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    d = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def interleaved_to_half_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`half_to_interleaved_rows` (interleaved → rotate-half)."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    d = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
