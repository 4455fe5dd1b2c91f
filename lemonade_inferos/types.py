"""Plain data types shared by the hooks, the engine, the KV store and the agent client.

They carry no behaviour beyond (de)serialisation, so every layer can import them without
pulling in onnxruntime, FastAPI or the quantization internals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def prompt_fingerprint(ids: list[int]) -> str:
    """16 hex digits identifying a prompt's token ids (sha256 of their decimal list), so
    reports of the same prompt can be compared (the agent's ΔPPL pairs by it) without
    sending the prompt."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


@dataclass
class InferenceContext:
    """What is known about one generation request before it runs.

    Attributes:
        model: model name or folder path as the host knows it.
        prompt_tokens: prompt length in tokens (after the chat template).
        batch_size: number of sequences generated together (the engine runs batch 1).
        max_new_tokens: upper bound on generated tokens.
        target_ttft_ms: the caller's time-to-first-token target in milliseconds, or None.
        quality_budget: largest acceptable perplexity increase (ΔPPL, absolute) or None to
            use the policy's ``quality.max_delta_ppl``.
        deadline_ms: wall-clock budget of the whole request in milliseconds, or None. When
            it runs out the engine sets ``RunOptions.terminate`` (stopping the model run in
            flight) and ends generation with ``finish_reason == "deadline"``, keeping the
            tokens generated so far.
        host: which host runs the request ("cli", "serve", "lemonade", "bench", ...).
        cache_prompt: False = do not start from (nor keep) a cached KV state of an earlier
            request with the same prefix (llama.cpp server's ``cache_prompt``); the
            prompt is prefilled in full.
        request_id: unique id, generated when not given.
        extra: free-form host data (never interpreted by inferos itself).
    """

    model: str
    prompt_tokens: int
    batch_size: int = 1
    max_new_tokens: int = 128
    target_ttft_ms: float | None = None
    quality_budget: float | None = None
    deadline_ms: float | None = None
    host: str = "cli"
    cache_prompt: bool = True
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class KVStats:
    """KV-cache accounting at one moment, all sizes in bytes of resident cache storage.

    ``bytes_by_tier`` maps tier names ("L0_fp16", "L0_fp32", "L1_int8", "L2_int4") to
    bytes including quantization metadata (scales, zero points). ``level_distribution``
    counts tokens per level ``{"L0": n, "L1": n, "L2": n, "L3": n}`` summed over layers
    (L3 = evicted). ``elements`` is the number of K and V scalar elements held
    (evicted tokens excluded); ``tokens`` is the logical sequence length.
    """

    tokens: int = 0
    total_bytes: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    level_distribution: dict[str, int] = field(default_factory=dict)
    fp16_bytes: int = 0
    fp32_bytes: int = 0
    blocks: int = 0
    tokens_evicted: int = 0
    store: str = "fp32"
    active: bool = True

    @property
    def bits_per_element(self) -> float:
        """Mean stored bits per K/V element of the logical sequence (metadata included)."""
        elems = self.fp16_bytes / 2
        return 8.0 * self.total_bytes / elems if elems else 0.0

    @property
    def compression_vs_fp16(self) -> float:
        return self.fp16_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def compression_vs_fp32(self) -> float:
        return self.fp32_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def saved_mb_vs_fp16(self) -> float:
        return (self.fp16_bytes - self.total_bytes) / 1e6

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits_per_element"] = round(self.bits_per_element, 4)
        d["compression_vs_fp16"] = round(self.compression_vs_fp16, 4)
        d["compression_vs_fp32"] = round(self.compression_vs_fp32, 4)
        d["saved_mb_vs_fp16"] = round(self.saved_mb_vs_fp16, 6)
        return d


@dataclass
class PrefixCacheStats:
    """The engine's prefix cache (:mod:`lemonade_inferos.engine.prefix_cache`) after one
    request: cumulative counters since the engine started and what it holds now.

    ``lookups`` = requests that looked for a cached prefix, ``hits`` = those that reused
    one (``hit_tokens`` prompt tokens in total, of ``lookup_tokens`` looked up);
    ``bytes_held`` = distinct bytes of the cached KV states (shared blocks counted once);
    ``logical_bytes`` = what the cached states would take if each held its own copy
    (``bytes_saved`` = the difference); ``evictions`` / ``evicted_bytes`` = entries and
    bytes dropped by the LRU limit (``max_bytes``) or by an external caller;
    ``retokenize_mismatches`` = reuses whose common prefix ended inside the tokens an
    earlier request generated (the chat template re-rendered them differently);
    ``quality_rejects`` = cached quantized states not reused because their measured
    quality cost exceeded the request's ``quality.max_delta_ppl``.
    """

    enabled: bool = False
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    lookup_tokens: int = 0
    entries: int = 0
    blocks: int = 0
    bytes_held: int = 0
    logical_bytes: int = 0
    max_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    retokenize_mismatches: int = 0
    quality_rejects: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / lookups (0 when nothing was looked up)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def bytes_saved(self) -> int:
        return max(0, self.logical_bytes - self.bytes_held)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hit_rate"] = round(self.hit_rate, 6)
        d["bytes_saved"] = self.bytes_saved
        return d


@dataclass
class RunStats:
    """Measured outcome of one generation request (PostRun payload).

    Times are wall-clock: ``start_time``/``end_time`` are UNIX seconds; ``ttft_ms`` is the
    time from request start to the emission of the first generated token (measured, never
    estimated); ``decode_tps`` is generated tokens after the first divided by the decode
    wall time (tokens/s); ``peak_rss_bytes`` is the process peak resident set size.
    ``prompt_nll`` is the mean negative log-likelihood (nats/token) of the prompt tokens
    under the model, computed from the prefill logits (the tokens prefilled in this
    request). ``kv`` is the KV cache at the end. ``prompt_hash`` is
    :func:`prompt_fingerprint` of the prompt ids ("" when unknown; with prefix reuse, of the
    ids and the reused length, since ``prompt_nll`` then scores only the prefilled part).
    ``cache_n`` is the number of prompt tokens whose KV state came from the prefix cache
    (not prefilled); ``prefix_cache`` the cache's counters after this request.
    ``resources`` is the process's resource-manager view at the end of the request, taken
    while the request still holds its KV reservation (KV budget, memory pool, scheduler,
    fallback state and recent events), None without a resource manager.
    """

    request_id: str = ""
    model: str = ""
    start_time: float = field(default_factory=time.time)
    end_time: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms: float | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    decode_tps: float = 0.0
    peak_rss_bytes: int = 0
    prompt_nll: float | None = None
    prompt_hash: str = ""
    finish_reason: str = ""
    kv: KVStats = field(default_factory=KVStats)
    cache_n: int = 0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    baseline: bool = False
    policy_name: str = ""
    provider: str = "CPUExecutionProvider"
    backend: str = "ort"
    notes: list[str] = field(default_factory=list)
    resources: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv"] = self.kv.to_dict()
        d["prefix_cache"] = self.prefix_cache.to_dict()
        return d
