"""Pydantic models for the agent's HTTP bodies (requests and responses).

``StatsReport`` mirrors :class:`lemonade_inferos.types.RunStats.to_dict()` plus ``instance``
(which plugin process sent it) and ``dropped`` (reports that process lost to queue overflow
since its previous successful post). Bounds keep every sum finite and every integer within
SQLite's 64-bit range; unknown fields are ignored so newer plugins can talk to older agents.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_COUNT = 10**12          # blocks, dropped reports
MAX_TOKENS = 10**8          # tokens of one request (contexts are far below 100 M tokens)
MAX_TPS = 1e6               # tokens/s of one stream: no local LLM decodes a million tokens/s
MAX_BYTES = 2**50           # 1 PiB
MAX_MS = 1e9                # ~11.6 days, in milliseconds
MAX_UNIX_TIME = 1e11        # year ~5138, UNIX seconds

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Ms = Annotated[float, Field(ge=0, le=MAX_MS)]
ShortStr = Annotated[str, Field(max_length=256)]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class KVStatsIn(_In):
    """``RunStats.kv`` (:class:`lemonade_inferos.types.KVStats.to_dict()`); sizes in bytes."""

    tokens: Tokens = 0
    total_bytes: Bytes = Field(0, description="resident KV storage incl. quantization metadata, bytes")
    bytes_by_tier: dict[ShortStr, Bytes] = Field(default_factory=dict, max_length=32)
    level_distribution: dict[ShortStr, Count] = Field(
        default_factory=dict, max_length=32, description="tokens per level {L0..L3}, summed over layers"
    )
    fp16_bytes: Bytes = 0
    fp32_bytes: Bytes = 0
    blocks: Count = 0
    tokens_evicted: Count = 0
    store: str = Field("fp32", max_length=64)
    active: bool = True
    bits_per_element: float | None = Field(None, ge=0, le=1e6)
    compression_vs_fp16: float | None = Field(None, ge=0, le=1e9)
    compression_vs_fp32: float | None = Field(None, ge=0, le=1e9)
    saved_mb_vs_fp16: float | None = Field(None, ge=-1e12, le=1e12)


class PrefixCacheIn(_In):
    """``RunStats.prefix_cache`` (:class:`lemonade_inferos.types.PrefixCacheStats.to_dict()`):
    the sending engine's prefix cache after the request; counters are cumulative."""

    enabled: bool = False
    lookups: Count = 0
    hits: Count = 0
    hit_tokens: Count = 0
    lookup_tokens: Count = 0
    entries: Count = 0
    blocks: Count = 0
    bytes_held: Bytes = Field(0, description="distinct bytes of the cached KV states (shared blocks once)")
    logical_bytes: Bytes = 0
    bytes_saved: Bytes = 0
    max_bytes: Bytes = 0
    evictions: Count = 0
    evicted_bytes: Bytes = 0
    retokenize_mismatches: Count = 0
    quality_rejects: Count = 0
    hit_rate: float | None = Field(None, ge=0, le=1)


class StatsReport(_In):
    """``POST /v1/stats`` body: one PostRun report."""

    instance: str = Field(
        ..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+\-]+$",
        description="sending plugin instance id (letters, digits, _ . : @ / + -)",
    )
    dropped: Count = Field(0, description="reports this instance dropped (queue overflow) since its last post")
    request_id: str = Field("", max_length=128)
    model: str = Field("", max_length=1024)
    start_time: float = Field(..., ge=0, le=MAX_UNIX_TIME, description="request start, UNIX seconds")
    end_time: float = Field(..., ge=0, le=MAX_UNIX_TIME, description="request end, UNIX seconds")
    prompt_tokens: Tokens = 0
    generated_tokens: Tokens = 0
    ttft_ms: Ms | None = Field(None, description="measured time to first token, ms")
    prefill_ms: Ms = 0.0
    decode_ms: Ms = 0.0
    total_ms: Ms = Field(0.0, description="end-to-end request time, ms")
    decode_tps: float = Field(0.0, ge=0, le=MAX_TPS, description="decode tokens/s")
    peak_rss_bytes: Bytes = Field(0, description="process peak resident set size, bytes")
    prompt_nll: float | None = Field(None, ge=0, le=100, description="mean prompt NLL, nats/token")
    prompt_hash: str = Field("", max_length=64, pattern=r"^[0-9a-f]*$",
                             description="fingerprint of the prompt's token ids (pairs reports of the same prompt)")
    finish_reason: str = Field("", max_length=64)
    kv: KVStatsIn = Field(default_factory=KVStatsIn)
    cache_n: Count = Field(0, description="prompt tokens reused from the prefix cache (not prefilled)")
    prefix_cache: PrefixCacheIn = Field(default_factory=PrefixCacheIn)
    baseline: bool = False
    policy_name: str = Field("", max_length=128, description="the policy that ran (no control/format characters)")
    provider: str = Field("", max_length=128)
    backend: str = Field("", max_length=64)
    notes: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=64)
    resources: dict[str, Any] | None = Field(
        None, description="the sending process's resource-manager view (KV budget, memory pool, scheduler, "
        "fallback state, recent events); see lemonade_inferos.resources.manager.ResourceManager.report")

    @field_validator("policy_name")
    @classmethod
    def _policy_name(cls, v: str) -> str:
        from ..policy import check_policy_name

        return check_policy_name(v) if v else v

    @model_validator(mode="after")
    def _plausible_rate(self) -> "StatsReport":
        """Generated tokens over the request time may not exceed MAX_TPS: counts and times
        that are each in range but imply an impossible rate are refused."""
        # tokens over MAX_TPS tokens/s, compared without dividing (total_ms = 5e-324 would
        # underflow to 0 s and divide by zero)
        if self.total_ms > 0 and self.generated_tokens * 1e3 > MAX_TPS * self.total_ms:
            raise ValueError(f"generated_tokens={self.generated_tokens} in total_ms={self.total_ms} is more than "
                             f"{MAX_TPS:g} tokens/s (the most that is plausible)")
        return self

    @field_validator("end_time")
    @classmethod
    def _after_start(cls, v: float, info: ValidationInfo) -> float:
        start = info.data.get("start_time")
        if start is not None and v < start:
            raise ValueError(f"must not be before start_time ({start}); both are UNIX seconds")
        return v


class BaselineRequest(BaseModel):
    """``POST /v1/baseline`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enable: bool = Field(..., description="true: plugins pass requests through untouched (baseline policy)")


class ErrorDetail(BaseModel):
    code: int
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    timestamp: str
    version: str
    uptime_seconds: float
    policy_version: int
    baseline: bool


class PolicyView(BaseModel):
    version: int = Field(..., description="increases whenever the effective policy changes")
    baseline: bool = Field(..., description="baseline mode: plugins use the pass-through policy")
    policy: dict[str, Any] = Field(..., description="the policy in force (kept while baseline mode is on)")
    effective: dict[str, Any] = Field(..., description="what plugins should apply: baseline policy or `policy`")


class ConfigView(BaseModel):
    config: dict[str, Any]
    state_dir: str


class StatsAccepted(BaseModel):
    id: int = Field(..., description="history row id")
    accepted: bool = True
    duplicate: bool = Field(False, description="this (instance, request_id) was already stored; not counted again")


class HistoryItem(BaseModel):
    id: int
    received_at: float
    stats: dict[str, Any]


class HistoryPoint(BaseModel):
    """The guide's compact history entry (``history[]``)."""

    timestamp: str = Field(..., description="request end, ISO 8601 UTC")
    tps: float = Field(..., description="decode tokens/s of that request")
    ftl_ms: float | None = Field(None, description="measured time to first token, ms")
    kv_bytes: int = 0
    policy: str = ""


class HistoryView(BaseModel):
    count: int
    total_stored: int
    items: list[HistoryItem]
    history: list[HistoryPoint] = Field(default_factory=list, description="the same reports in the guide's "
                                        "compact form (timestamp, tps), oldest first")


class EventIn(_In):
    """``POST /v1/events`` body: one runtime event of a plugin instance (a fallback of the
    guide's §4.1 table, a notification, a recovery, the critical state)."""

    instance: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+\-]+$")
    timestamp: float = Field(..., ge=0, le=MAX_UNIX_TIME, description="UNIX seconds")
    kind: str = Field(..., min_length=1, max_length=64, description="fallback | notification | recovered | critical | ...")
    reason: str = Field(..., max_length=64, description="the table row, e.g. npu_unavailable")
    detail: str = Field("", max_length=1000)
    severity: str | None = Field(None, max_length=32)
    level: int | None = Field(None, ge=0, le=1000)
    action: str | None = Field(None, max_length=1000)


class QuotaIn(BaseModel):
    """``POST /v1/quotas`` body: one client's limits (null = no limit)."""

    model_config = ConfigDict(extra="forbid")
    client: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$",
                        description="the X-Inferos-Client value, key:<sha256 prefix> for an API key, or default")
    max_kv_bytes: int | None = Field(None, ge=0, le=MAX_BYTES, description="KV bytes the client may hold at once")
    max_concurrent: int | None = Field(None, ge=1, le=100000, description="requests the client may run at once")

    @field_validator("client", "max_kv_bytes", "max_concurrent", mode="before")
    @classmethod
    def _json_types(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "client":
            if not isinstance(v, str):
                raise ValueError("must be a string")
            return v
        if v is None or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ValueError("must be an integer or null")
