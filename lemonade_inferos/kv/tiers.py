"""Level assignment for the tiered KV store: thresholds, modes and the memory budget.

Levels: 0 = float16 (L0), 1 = INT8 (L1), 2 = INT4 (L2), 3 = evicted (L3). Only *demotable*
blocks are assigned here; attention-sink tokens (StreamingLLM, Xiao et al. 2023) and the
recent window never are, so they can never be demoted or evicted.

Semantics are those of :mod:`lemonade_inferos.policy` (the one definition): the demotable
blocks are ranked by importance (largest first, ties broken towards the newer block);
block of rank ``r`` out of ``n`` gets demotion rank ``d = r / n`` in ``[0, 1)`` and the
deepest level whose threshold ``d`` reaches::

    d >= L3_evict -> 3,  d >= L2_int4 -> 2,  d >= L1_int8 -> 1,  else 0.

Modes: ``disabled`` -> all 0; ``quality_optimized`` -> at most 1 (never below INT8, never
evicted, whatever the budget); ``dynamic`` / ``latency_optimized`` /
``throughput_optimized`` -> as the thresholds, then, when ``budget_bytes`` is set and the
store would exceed it, blocks are demoted further, least important first, one level
at a time (all over-budget candidates to INT8 first, then INT4, then evicted) until
the total fits. Because eviction costs 0 bytes, the budget is always met once it is
*reachable* (``budget >= fixed_bytes``, the bytes of sinks + recent tokens).

Levels only ever deepen (``current`` levels are a floor): information dropped by
quantization or eviction cannot come back.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("dynamic", "latency_optimized", "throughput_optimized", "quality_optimized", "disabled")


def demotion_ranks(importance: np.ndarray) -> np.ndarray:
    """Demotion rank ``d = r / n`` per block (float64 ``[n]``), r = 0 for the most important.

    Ties go to the newer block (higher index counts as more important).
    """
    imp = np.asarray(importance, dtype=np.float64)
    if imp.ndim != 1:
        raise ValueError(f"importance must be 1-D, got shape {imp.shape}")
    n = imp.shape[0]
    if n == 0:
        return np.zeros(0)
    # sort by (-importance, -index)
    order = np.lexsort((-np.arange(n), -imp))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n) / n
    return ranks


def threshold_levels(importance: np.ndarray, thresholds: Sequence[float], mode: str = "dynamic") -> np.ndarray:
    """Levels (int8 ``[n]``) from the thresholds ``(L1_int8, L2_int4, L3_evict)`` and mode,
    before the budget.

    Raises:
        ValueError: unknown mode, or thresholds not ordered within ``[0, 1]``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown kv mode {mode!r}; known: {', '.join(MODES)}")
    t1, t2, t3 = (float(t) for t in thresholds)
    if not (0.0 <= t1 <= t2 <= t3 <= 1.0):
        raise ValueError(f"thresholds must satisfy 0 <= L1_int8 <= L2_int4 <= L3_evict <= 1, got {thresholds}")
    d = demotion_ranks(importance)
    lv = np.zeros(d.shape[0], dtype=np.int8)
    if mode == "disabled":
        return lv
    lv[d >= t1] = 1
    lv[d >= t2] = 2
    lv[d >= t3] = 3
    if mode == "quality_optimized":
        np.minimum(lv, 1, out=lv)
    return lv


def assign_levels(
    importance: np.ndarray,
    thresholds: Sequence[float],
    mode: str = "dynamic",
    *,
    level_bytes: Sequence[int] | None = None,
    fixed_bytes: int = 0,
    budget_bytes: int | None = None,
    current: np.ndarray | None = None,
) -> np.ndarray:
    """Final level per demotable block (int8 ``[n]``, 0..3).

    Args:
        importance: float ``[n]`` block scores, larger = more important.
        thresholds: ``(L1_int8, L2_int4, L3_evict)``.
        mode: a :data:`MODES` entry.
        level_bytes: bytes one block costs at levels 0..3 (4 ints, level 3 = 0);
            required when ``budget_bytes`` is set.
        fixed_bytes: bytes of everything that is not a demotable block (sinks, recent
            window), counted against the budget.
        budget_bytes: KV memory budget in bytes, or None.
        current: int ``[n]`` levels already applied (a floor), or None.

    Raises:
        ValueError: bad shapes, mode or thresholds.
    """
    imp = np.asarray(importance, dtype=np.float64)
    lv = threshold_levels(imp, thresholds, mode)
    n = lv.shape[0]
    if current is not None:
        cur = np.asarray(current)
        if cur.shape != (n,):
            raise ValueError(f"current levels must have shape ({n},), got {cur.shape}")
        if mode != "disabled":
            lv = np.maximum(lv, cur.astype(np.int8))
        else:
            lv = cur.astype(np.int8).copy()
    if budget_bytes is None or mode == "disabled" or n == 0:
        return lv
    if level_bytes is None or len(level_bytes) != 4:
        raise ValueError("level_bytes (4 ints, bytes per block at L0..L3) is required with a budget")
    cost = np.asarray(level_bytes, dtype=np.int64)
    deepest = 1 if mode == "quality_optimized" else 3
    total = int(fixed_bytes + cost[lv].sum())
    if total <= budget_bytes:
        return lv
    order = np.lexsort((np.arange(n), imp))  # least important first (older first on ties)
    for target in range(1, deepest + 1):
        for b in order:
            if lv[b] < target:
                total += int(cost[target] - cost[lv[b]])
                lv[b] = target
                if total <= budget_bytes:
                    return lv
    return lv
