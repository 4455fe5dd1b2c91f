"""Pure-numpy reference forward pass of a Llama-family decoder, with a KV cache.

Ground truth for the ONNX export tests. It follows karpathy/llama2.c ``run.c``
``forward()`` step for step, but processes a chunk of tokens at once with a causal mask:

* RMSNorm ``x * w / sqrt(mean(x^2) + eps)`` (``config.rms_eps``);
* q/k/v projections plus the QKV biases when the weights have them (Qwen2);
* RoPE on interleaved pairs ``(x[2i], x[2i+1])`` of every head with angle
  ``pos * theta^(-2i/head_size)`` (``config.rope_theta``), applied to q and k; k is cached
  *after* RoPE;
* grouped-query attention: query head ``h`` reads KV head ``h // (n_heads/n_kv_heads)``;
* SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``; shared or separate classifier.

Computation is in float64 by default (``dtype``) so it is a tighter reference than fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .weights import DecoderWeights as Llama2cWeights


@dataclass
class ReferenceCache:
    """Per-layer K (after RoPE) and V, each ``[n_kv_heads, length, head_size]``.

    ``length`` is the number of cached positions; :func:`forward` appends to it.
    """

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, weights: Llama2cWeights, dtype=np.float64) -> "ReferenceCache":
        c = weights.config
        z = np.zeros((c.n_kv_heads, 0, c.head_size), dtype=dtype)
        return cls([z] * c.n_layers, [z] * c.n_layers)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


def rope_interleaved(x: np.ndarray, positions: np.ndarray, head_size: int, theta: float = 10000.0) -> np.ndarray:
    """Rotate interleaved pairs as llama2.c does.

    Args:
        x: ``[heads, seq, head_size]``.
        positions: int ``[seq]`` absolute positions.
        theta: RoPE base.
    Returns:
        array of the same shape and dtype.
    """
    half = head_size // 2
    inv = float(theta) ** (-(2.0 * np.arange(half)) / head_size)  # [half]
    ang = positions.astype(np.float64)[:, None] * inv[None, :]  # [seq, half]
    cos, sin = np.cos(ang).astype(x.dtype), np.sin(ang).astype(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(
    weights: Llama2cWeights,
    tokens: list[int] | np.ndarray,
    pos: int,
    cache: ReferenceCache | None = None,
    dtype=np.float64,
) -> np.ndarray:
    """Run ``tokens`` (positions ``pos .. pos+len-1``) through the model.

    Args:
        weights: loaded checkpoint.
        tokens: int token ids ``[seq]`` (batch 1).
        pos: absolute position of ``tokens[0]``; must equal ``cache.length``.
        cache: updated in place (K/V for the new tokens appended); ``None`` = fresh cache.
        dtype: compute dtype (float64 default, float32 allowed).

    Returns:
        logits ``[seq, vocab]`` in ``dtype``.

    Raises:
        ValueError: ``pos`` disagrees with the cache length, or the context would exceed
            ``seq_len``.
    """
    c = weights.config
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = toks.shape[0]
    if cache is None:
        cache = ReferenceCache.empty(weights, dtype)
    if pos != cache.length:
        raise ValueError(f"pos={pos} but the cache holds {cache.length} positions")
    if pos + n > c.seq_len:
        raise ValueError(f"context {pos + n} exceeds the model's seq_len={c.seq_len}")
    hs, H, KV = c.head_size, c.n_heads, c.n_kv_heads
    positions = np.arange(pos, pos + n)
    x = weights.token_embedding[toks].astype(dtype)  # [n, dim]
    total = pos + n
    # causal mask over all total positions: query i (abs pos+i) sees key j iff j <= pos+i
    mask = np.arange(total)[None, :] <= positions[:, None]  # [n, total]
    for layer in range(c.n_layers):
        h = _rmsnorm(x, weights.rms_att[layer].astype(dtype), c.rms_eps)
        q = h @ weights.wq[layer].T.astype(dtype)  # [n, H*hs]
        k = h @ weights.wk[layer].T.astype(dtype)
        v = h @ weights.wv[layer].T.astype(dtype)
        if weights.bq is not None:
            q = q + weights.bq[layer].astype(dtype)
            k = k + weights.bk[layer].astype(dtype)
            v = v + weights.bv[layer].astype(dtype)
        q = q.reshape(n, H, hs).transpose(1, 0, 2)  # [H, n, hs]
        k = k.reshape(n, KV, hs).transpose(1, 0, 2)
        v = v.reshape(n, KV, hs).transpose(1, 0, 2)
        q = rope_interleaved(q, positions, hs, c.rope_theta)
        k = rope_interleaved(k, positions, hs, c.rope_theta)
        K = np.concatenate([cache.keys[layer].astype(dtype), k], axis=1)  # [KV, total, hs]
        V = np.concatenate([cache.values[layer].astype(dtype), v], axis=1)
        cache.keys[layer], cache.values[layer] = K, V
        Kr = np.repeat(K, c.kv_mul, axis=0)  # [H, total, hs]
        Vr = np.repeat(V, c.kv_mul, axis=0)
        s = q @ Kr.transpose(0, 2, 1) / np.sqrt(hs)  # [H, n, total]
        s = np.where(mask[None], s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = (p @ Vr).transpose(1, 0, 2).reshape(n, H * hs)
        x = x + o @ weights.wo[layer].T.astype(dtype)
        h = _rmsnorm(x, weights.rms_ffn[layer].astype(dtype), c.rms_eps)
        a = h @ weights.w1[layer].T.astype(dtype)
        b = h @ weights.w3[layer].T.astype(dtype)
        x = x + ((a / (1.0 + np.exp(-a))) * b) @ weights.w2[layer].T.astype(dtype)
    x = _rmsnorm(x, weights.rms_final.astype(dtype), c.rms_eps)
    return x @ weights.wcls.T.astype(dtype)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, tokens: list[int] | np.ndarray) -> float:
    """Perplexity of ``tokens[1:]`` given ``logits[:-1]``.

    Args:
        logits: ``[seq, vocab]`` where row ``t`` predicts token ``t+1``.
        tokens: ``[seq]`` ids that produced the logits.
    Returns:
        ``exp(mean NLL)`` in nats over ``seq - 1`` predictions.
    """
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    lp = log_softmax(np.asarray(logits, dtype=np.float64)[:-1])
    nll = -lp[np.arange(len(toks) - 1), toks[1:]]
    return float(np.exp(nll.mean()))


def greedy(weights: Llama2cWeights, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation through the cached path; returns the ``steps`` new ids."""
    cache = ReferenceCache.empty(weights)
    logits = forward(weights, prompt, 0, cache)
    out: list[int] = []
    for _ in range(steps):
        t = int(np.argmax(logits[-1]))
        out.append(t)
        logits = forward(weights, [t], cache.length, cache)
    return out
