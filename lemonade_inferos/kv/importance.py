"""Block importance scores for the tiered KV store.

* **H2O accumulated attention mass** (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
  Efficient Generative Inference of Large Language Models"): the tiered graph outputs,
  for every run, the softmax probability mass each key position received, summed over
  layers, query heads and the run's query tokens (``kv_attn_mass`` float32 ``[T]``). The
  store accumulates it per token; a block's score is the sum over its tokens. Because
  tier decisions are shared across layers and heads (so tiers stack over layers), the
  mass is summed over layers too.
* **Fallback** for decoders whose tiered graph has no attention output (or
  ``StoreConfig.importance == "recency_norm"``): ``0.5 * recency + 0.5 * key norm``,
  recency = block index / number of blocks (newer is more important, as in StreamingLLM's
  recent window) and key norm = the block's mean key L2 norm over layers/heads divided by
  the largest block's (keys with a large norm produce large logits).

All scores are float64 ``[n_blocks]``; larger = more important.
"""

from __future__ import annotations

import numpy as np


def block_mass(token_mass: np.ndarray, first_token: int, n_blocks: int, block_len: int) -> np.ndarray:
    """H2O score per block: the summed accumulated mass of its tokens.

    Args:
        token_mass: float ``[>= first_token + n_blocks * block_len]`` accumulated mass per
            logical token position.
        first_token: logical position where block 0 starts (after the sinks).
        n_blocks, block_len: blocks are consecutive runs of ``block_len`` tokens.

    Raises:
        ValueError: ``token_mass`` is too short or not 1-D.
    """
    token_mass = np.asarray(token_mass)
    end = first_token + n_blocks * block_len
    if token_mass.ndim != 1 or token_mass.shape[0] < end:
        raise ValueError(f"token_mass must be 1-D with at least {end} entries, got shape {token_mass.shape}")
    return token_mass[first_token:end].reshape(n_blocks, block_len).sum(axis=1, dtype=np.float64)


def block_mass_mean(token_mass: np.ndarray, first_token: int, n_blocks: int, block_len: int,
                    seq_len: int) -> np.ndarray:
    """H2O score normalised by exposure: each token's accumulated mass divided by the
    number of queries that could attend it (``seq_len - position``), summed per block.

    Raw accumulated mass (:func:`block_mass`) favours old blocks (seen by more queries),
    so the block that just left the recent window always ranks last and is evicted first;
    measured on stories260K at 512 tokens this normalisation roughly halves the ΔPPL of
    the same eviction budget.

    Raises:
        ValueError: as :func:`block_mass`, or ``seq_len`` smaller than the blocks' end.
    """
    token_mass = np.asarray(token_mass)
    end = first_token + n_blocks * block_len
    if token_mass.ndim != 1 or token_mass.shape[0] < end or seq_len < end:
        raise ValueError(f"token_mass (1-D) and seq_len must cover {end} positions")
    seen = seq_len - np.arange(first_token, end, dtype=np.float64)
    per_tok = token_mass[first_token:end] / seen
    return per_tok.reshape(n_blocks, block_len).sum(axis=1)


def fallback_scores(key_norms: np.ndarray) -> np.ndarray:
    """Recency + key-norm score per block (no attention available).

    Args:
        key_norms: float ``[n_blocks]`` mean key L2 norm of each block (oldest first).

    Returns:
        float64 ``[n_blocks]`` in ``[0, 1)``; larger = more important.
    """
    key_norms = np.asarray(key_norms, dtype=np.float64)
    if key_norms.ndim != 1:
        raise ValueError(f"key_norms must be 1-D, got shape {key_norms.shape}")
    n = key_norms.shape[0]
    if n == 0:
        return key_norms
    recency = np.arange(n, dtype=np.float64) / n
    top = key_norms.max()
    norm = key_norms / top if top > 0 else np.zeros(n)
    return 0.5 * recency + 0.5 * norm * (n - 1) / n
