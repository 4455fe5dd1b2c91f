"""Quality measurement through the real cached decode path: perplexity, ΔPPL, KL divergence.

Protocol (the one llama.cpp's ``perplexity --kl-divergence`` uses, applied to KV caches):

1. tokenize the text (with BOS) and split it into consecutive chunks of at most the model's
   context length;
2. decode each chunk token by token from an empty cache, once with the full-precision cache
   (baseline) and once with the policy's store (compressed); a single teacher-forced pass
   would never read the quantized cache, so every token goes through ``past_key_values``;
3. score every token after the first of each chunk: NLL under each run, KL divergence
   ``KL(P_baseline || P_compressed)`` of the next-token distributions, top-1 agreement;
4. measure KV bytes at the end of the longest chunk.

``ppl = exp(mean NLL)``; ``delta_ppl = ppl - ppl_baseline``; ``delta_ppl_pct`` in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .engine.sampling import log_softmax
from .kv.base import FullPrecisionKVCache, KVCache
from .policy import Policy
from .types import InferenceContext, KVStats


class EvalInputError(ValueError):
    """The evaluation text cannot be scored (empty, or fewer than 2 tokens)."""


@dataclass
class ChunkScores:
    """Per-token scores of one chunk: arrays of length ``len(chunk) - 1`` (float64)."""

    nll: np.ndarray
    kld: np.ndarray | None
    top1: np.ndarray | None


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL in nats of ``targets`` [n] under ``logits`` [n, vocab]; float64 [n]."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref) || softmax(logits))`` per row, nats; inputs [n, vocab]; float64 [n]."""
    lp_ref = log_softmax(ref_logits)
    lp = log_softmax(logits)
    return np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)


def perplexity(nll: np.ndarray) -> float:
    """``exp(mean NLL)``."""
    return float(math.exp(float(np.mean(nll))))


def chunk_ids(ids: list[int], context_length: int) -> list[list[int]]:
    """Consecutive chunks of at most ``context_length`` tokens (the last may be shorter);
    chunks shorter than 2 tokens are dropped (nothing to score)."""
    chunks = [ids[i : i + context_length] for i in range(0, len(ids), context_length)]
    return [c for c in chunks if len(c) >= 2]


def evaluate_ids(
    engine: Any,
    ids: list[int],
    policy: Policy,
    *,
    cache_factory: Callable[[], KVCache] | None = None,
    progress: Callable[[int, int], None] | None = None,
    context_length: int | None = None,
    tf_chunk: int = 1,
    baseline_memo: dict | None = None,
) -> dict[str, Any]:
    """Run the protocol on token ids with ``engine`` (a :class:`~lemonade_inferos.engine.Engine`).

    Args:
        policy: selects the compressed store through the engine's ``kv_cache`` hook.
        cache_factory: overrides the compressed store (used by benchmarks for reference
            schemes such as q4_0-like); called once per chunk.
        progress: called as ``progress(done_chunks, total_chunks)``.
        context_length: chunk length in tokens (default: the model's context).
        tf_chunk: tokens per run through the caches (1 = the exact decode path; see
            :meth:`~lemonade_inferos.engine.Engine.teacher_forced_logits`).
        baseline_memo: a dict reused across calls with the same ids and chunking: the
            baseline run's log-probabilities per chunk are computed once (float32
            ``[n, vocab]`` each; ~400 MB per 2,048-token chunk at a 49K vocabulary).

    Returns:
        a dict with ``tokens``, ``ppl_baseline``, ``ppl``, ``delta_ppl``, ``delta_ppl_pct``,
        ``kld_mean``, ``top1_agreement``, ``kv_bytes_fp16``, ``kv_bytes``,
        ``compression_vs_fp16``, ``bits_per_element``, ``level_distribution`` and more
        (``kv_bytes_fp32``, ``chunks``, ``scored_tokens``, ``kld_p99``, ``store``).

    Raises:
        EvalInputError: fewer than 2 tokens.
    """
    if len(ids) < 2:
        raise EvalInputError(f"the text has {len(ids)} token(s); at least 2 are needed to score anything")
    spec = engine.spec
    chunks = chunk_ids(ids, min(context_length or spec.context_length, spec.context_length))
    if not chunks:
        raise EvalInputError("no chunk of at least 2 tokens to score")
    nll_b, nll_c, klds, top1 = [], [], [], []
    longest_stats: KVStats | None = None
    longest = -1
    for k, chunk in enumerate(chunks):
        targets = np.asarray(chunk[1:])
        key = (k, len(chunk), tf_chunk)
        if baseline_memo is not None and key in baseline_memo:
            ref = baseline_memo[key]
        else:
            ref = log_softmax(engine.teacher_forced_logits(chunk, FullPrecisionKVCache(spec), policy, tf_chunk)[:-1])
            ref = ref.astype(np.float32)
            if baseline_memo is not None:
                baseline_memo[key] = ref
        if cache_factory is not None:
            cache = cache_factory()
        else:
            ctx = InferenceContext(model=spec.name, prompt_tokens=len(chunk), max_new_tokens=0, host="eval")
            cache = engine.pm.kv_cache(policy, spec, ctx)
        # both runs go through the same log-softmax -> float32 rounding, so identical logits
        # score exactly alike (the baseline's log-probabilities may come from the memo)
        comp = log_softmax(engine.teacher_forced_logits(chunk, cache, policy, tf_chunk)[:-1]).astype(np.float32)
        nll_b.append(token_nll(ref, targets))
        nll_c.append(token_nll(comp, targets))
        klds.append(kl_divergence(ref, comp))
        top1.append(np.argmax(ref, -1) == np.argmax(comp, -1))
        if len(chunk) > longest:
            longest = len(chunk)
            longest_stats = cache.stats()
        if progress:
            progress(k + 1, len(chunks))
    nb, nc = np.concatenate(nll_b), np.concatenate(nll_c)
    kld = np.concatenate(klds)
    ppl_b, ppl = perplexity(nb), perplexity(nc)
    st = longest_stats or KVStats()
    return {
        "tokens": len(ids),
        "scored_tokens": int(nb.size),
        "chunks": len(chunks),
        "ppl_baseline": ppl_b,
        "ppl": ppl,
        "delta_ppl": ppl - ppl_b,
        "delta_ppl_pct": 100.0 * (ppl - ppl_b) / ppl_b,
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "kv_bytes_fp16": int(st.fp16_bytes),
        "kv_bytes_fp32": int(st.fp32_bytes),
        "kv_bytes": int(st.total_bytes),
        "compression_vs_fp16": float(st.compression_vs_fp16),
        "bits_per_element": float(st.bits_per_element),
        "level_distribution": dict(st.level_distribution),
        "kv_tokens": int(st.tokens),
        "store": st.store,
        "policy": policy.name,
    }


def evaluate_text(engine: Any, text: str, policy: Policy, **kw: Any) -> dict[str, Any]:
    """:func:`evaluate_ids` on ``text`` tokenized with BOS.

    Raises:
        EvalInputError: the text is empty or shorter than 2 tokens.
    """
    if not text.strip():
        raise EvalInputError("the evaluation text is empty")
    return evaluate_ids(engine, engine.codec.encode(text), policy, **kw)
