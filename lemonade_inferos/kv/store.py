"""The tiered quantized KV store (issue #3): L0 float16 / L1 INT8 / L2 INT4 / L3 evicted.

:class:`TieredKVCache` feeds ``model_tiered.onnx`` (:mod:`lemonade_inferos.kv.graph`),
which dequantizes in-graph; Python touches the cache only to append each step's K/V rows
(one contiguous float16 row per token) and, once every ``block_len`` tokens, to quantize
the block leaving the recent window and re-tier (``_rebalance``).

Tokens (batch 1): the first ``sink_tokens`` (attention sinks, StreamingLLM, Xiao et al.
2023) and the tokens not yet in a full block older than the ``recent_window`` stay at L0.
Every other token belongs to a *block* of ``block_len`` consecutive tokens (block ``b``
covers positions ``sink_tokens + b*block_len ...``), the unit of level decisions, shared by
all layers and heads. Levels follow :mod:`lemonade_inferos.kv.tiers` (policy semantics,
budget) with H2O accumulated attention mass as importance
(:mod:`lemonade_inferos.kv.importance`); levels only deepen.

Storage (all resident KV bytes; ``stats()`` sums the ``nbytes`` of exactly these arrays
as presented to the graph, except the L0 buffer's spare capacity: its unused columns
(up to ``block_len`` beyond ``sink_tokens + recent_window`` in steady state, presented to
the graph but masked out by :meth:`TieredKVCache.attention_mask`) are not counted; the
per-token importance arrays, 12 bytes/token of L0 capacity, are bookkeeping, not counted):

* L0: ``kv.l0`` float16 ``[2L, E, C]`` (E = kv_heads*head_dim; channel-major: the keys of
  every layer then the values, token j in column j, so a new token is one column and the
  graph needs no Transpose), 2 bytes/element for the N0 used columns.
* L1: codes uint8 (1 byte/element); keys per-channel (KIVI) groups of ``key_group``
  tokens, values per-token groups of ``value_group`` channels; one float16 scale + one
  uint8 zero point per group. Bytes/element = 1 + 3/group (8.75 bits at group 32).
* L2: 4-bit codes, the key code and the value code of the same (layer, channel, token)
  sharing one byte (0.5 byte/element); one float16 scale + one 4-bit zero point per group,
  zero points two per byte (key/value pairs when the group sizes match, else split-half
  per layer): 0.5 + 2.5/group bytes/element (4.625 bits at group 32).

Array layouts (channel-major ``[L, E, N]`` codes, tokens innermost, so a block of tokens
is a slice of the last axis) are those of the graph inputs, documented in
:mod:`lemonade_inferos.kv.graph`; the store holds exactly those numpy arrays (no other
copy) and binds them as they are. Only the
levels a configuration can assign (:attr:`StoreConfig.levels`) exist as graph inputs.
Re-tiering rebuilds a tier's arrays block-wise in that layout (kept blocks are slices,
new blocks are appended; packed INT4 zero points are unpacked to the same graph order,
rebuilt the same way and packed again). A block leaving L0 is quantized straight from its
(contiguous) columns of the channel-major L0 buffer, which already is the graph layout
(:meth:`TieredKVCache._quantize_l0_block`: keys and values in one pass when their groups
have the same size, arithmetic identical to :func:`~lemonade_inferos.kv.quantize.quantize`);
only INT8->INT4 re-quantized blocks go
through the unpacked "canonical" form. Tier arrays are allocated at exactly their size (no
spare capacity), so the memory accounting above is unchanged.

The engine keeps one IOBinding per request and binds only :meth:`TieredKVCache.step_inputs`
each step: ``kv.l0`` plus the tier arrays when re-tiering replaced them. Decode steps write
``kv.new`` and ``kv.attn_mass`` into two small buffers the store reuses
(:meth:`TieredKVCache.output_buffers`), so no output is allocated or copied per step.

Configurations beyond the policy (baselines for benchmarks) are :class:`StoreConfig`\\ s;
:func:`store_for_scheme` builds the named ones (``fp16``, ``q8_0``, ``q4_0``,
``hf_quantized``, ``tiered``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..model.spec import DecoderSpec
from ..types import KVStats
from .base import KVCache, KVCacheReuseError, KVSnapshot
from .graph import ATTN_MASS, KINDS, L0, L2_CODES, L2_ZERO, LEVEL_BITS, NEW_KV, GraphLayout, ensure_graph, input_names
from .importance import block_mass, block_mass_mean, fallback_scores
from .quantize import dequantize, quantize, quantize_groups, stored_nbytes
from .tiers import MODES, assign_levels

IMPORTANCE = ("h2o_mean", "h2o", "recency_norm", "none")
_buffer_zeros = np.zeros


def set_buffer_allocator(zeros=None) -> None:
    """Allocate the stores' L0 float16 buffers (the largest KV arrays) with ``zeros(shape,
    dtype)`` -- e.g. :meth:`lemonade_inferos.resources.pool.HostPool.zeros` (page-locked
    pool); None restores ``numpy.zeros``. Process-wide; stores created afterwards use it."""
    global _buffer_zeros
    _buffer_zeros = np.zeros if zeros is None else zeros
TIER_NAMES = {0: "L0_fp16", 1: "L1_int8", 2: "L2_int4"}


@dataclass(frozen=True)
class StoreConfig:
    """Everything that shapes a tiered store; :meth:`from_policy` maps a policy onto it.

    Attributes:
        block_len: tokens per block (level-decision unit; even). Default 32.
        key_axis: ``"channel"`` (KIVI per-channel keys, groups along tokens) or ``"token"``.
        key_group: tokens per key group (channel axis; divides ``block_len``) or channels
            per key group (token axis; divides kv_heads*head_dim).
        value_group: channels per value group (per-token values; divides E).
        sink_tokens, recent_window: tokens always kept at L0 (float16).
        thresholds: ``(L1_int8, L2_int4, L3_evict)`` demotion-rank thresholds (policy).
        mode: a kv mode of the policy (``dynamic`` ... ``disabled``).
        budget_bytes: KV budget in bytes or None.
        importance: ``"h2o_mean"`` (default: accumulated attention mass per query that
            could attend the token, see :func:`~lemonade_inferos.kv.importance.block_mass_mean`),
            ``"h2o"`` (raw accumulated attention mass), ``"recency_norm"`` (fallback
            score) or ``"none"`` (all equal: the oldest blocks are demoted first).
        uniform_level: if set (1 or 2), every demotable block goes to this level
            regardless of thresholds (uniform baselines).
        name: label reported in ``KVStats.store``.
    """

    block_len: int = 32
    key_axis: str = "channel"
    key_group: int = 32
    value_group: int = 32
    sink_tokens: int = 4
    recent_window: int = 64
    thresholds: tuple[float, float, float] = (0.0, 0.0, 0.75)
    mode: str = "dynamic"
    budget_bytes: int | None = None
    importance: str = "h2o_mean"
    uniform_level: int | None = None
    name: str = "tiered"

    def validate(self, spec: DecoderSpec) -> None:
        """Raises ValueError naming the bad field."""
        E = spec.num_kv_heads * spec.head_dim
        if self.block_len < 2 or self.block_len % 2:
            raise ValueError(f"block_len must be an even integer >= 2, got {self.block_len}")
        if E % 2:
            raise ValueError(f"kv_heads*head_dim must be even for INT4 packing, got {E}")
        if self.key_axis == "channel" and self.block_len % self.key_group:
            raise ValueError(f"key_group {self.key_group} must divide block_len {self.block_len}")
        if self.key_axis == "token" and E % self.key_group:
            raise ValueError(f"key_group {self.key_group} must divide kv_heads*head_dim {E}")
        if E % self.value_group:
            raise ValueError(f"value_group {self.value_group} must divide kv_heads*head_dim {E}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.uniform_level not in (None, 1, 2):
            raise ValueError(f"uniform_level must be None, 1 or 2, got {self.uniform_level}")
        if self.sink_tokens < 0 or self.recent_window < 0:
            raise ValueError("sink_tokens and recent_window must be >= 0")
        GraphLayout(self.key_axis, self.key_group, self.value_group).check(spec.num_kv_heads, spec.head_dim)
        need = self.min_budget_bytes(spec)
        if self.budget_bytes is not None and self.mode != "disabled" and self.budget_bytes < need:
            from ..policy import PolicyError  # the budget is a policy field: report it as one

            row = int(spec.kv_bytes_per_token(2))
            raise PolicyError([{
                "field": "kv.budget_bytes", "value": self.budget_bytes,
                "message": f"below this model's minimum of {need} bytes: the {self.sink_tokens} sink tokens, "
                f"the {self.recent_window}-token recent window and a forming block of {self.block_len - 1} tokens "
                f"always stay at float16 ({row} bytes per token); raise kv.budget_bytes to at least {need} "
                "or lower kv.recent_window"}])

    def min_budget_bytes(self, spec: DecoderSpec) -> int:
        """The smallest ``budget_bytes`` this store can always meet on ``spec``'s model:
        sink tokens + recent window + one not-yet-formed block (``block_len - 1`` tokens)
        at float16 (``2 * layers * kv_heads * head_dim * 2`` bytes per token), capped at
        the context length. Demoted blocks can always be evicted, so nothing else counts."""
        row = int(spec.kv_bytes_per_token(2))
        tokens = min(self.sink_tokens + self.recent_window + self.block_len - 1, int(spec.context_length))
        return tokens * row

    @property
    def levels(self) -> tuple[int, ...]:
        """The quantized levels (1 INT8, 2 INT4) this configuration can ever assign
        (conservative: with a budget, both); the graph has inputs for these only."""
        if self.mode == "disabled":
            return ()
        t1, t2, t3 = self.thresholds
        budget = self.budget_bytes is not None
        if self.uniform_level is not None:
            return (1, 2) if budget else (self.uniform_level,)
        q = self.mode == "quality_optimized"
        l1 = q or budget or t1 < t2
        l2 = not q and (budget or t2 < t3)
        return tuple(v for v, on in ((1, l1), (2, l2)) if on)

    @property
    def layout(self) -> GraphLayout:
        return GraphLayout(self.key_axis, self.key_group, self.value_group, self.levels)

    @classmethod
    def from_policy(cls, policy, **overrides) -> "StoreConfig":
        """The store configuration a :class:`~lemonade_inferos.policy.Policy` asks for."""
        kv = policy.kv
        t = kv.level_thresholds
        mode = kv.mode.value if hasattr(kv.mode, "value") else str(kv.mode)
        cfg = cls(
            sink_tokens=kv.sink_tokens,
            recent_window=kv.recent_window,
            thresholds=(t.L1_int8, t.L2_int4, t.L3_evict),
            mode=mode,
            budget_bytes=kv.budget_bytes,
            name=f"tiered:{getattr(policy, 'name', 'policy')}",
        )
        return replace(cfg, **overrides)


#: named configurations for baseline comparisons (see :func:`store_for_scheme`).
SCHEMES: dict[str, StoreConfig] = {
    # everything float16 through the same tiered graph
    "fp16": StoreConfig(mode="disabled", sink_tokens=0, recent_window=0, name="fp16"),
    # llama.cpp -ctk/-ctv q8_0: per-token groups of 32, one fp16 scale (+ our uint8 zero);
    # tokens are quantized in blocks of 16, so the newest < 16 tokens are float16
    "q8_0": StoreConfig(block_len=16, key_axis="token", key_group=32, value_group=32, sink_tokens=0,
                        recent_window=0, uniform_level=1, importance="none", name="q8_0"),
    # llama.cpp q4_0 (without its Hadamard rotation): per-token groups of 32 at 4 bits
    "q4_0": StoreConfig(block_len=16, key_axis="token", key_group=32, value_group=32, sink_tokens=0,
                        recent_window=0, uniform_level=2, importance="none", name="q4_0"),
    # HF transformers QuantizedCache (quanto, int4, q_group_size 64, residual_length 128):
    # keys grouped 64 along tokens (per channel); values per token over all 32 channels of
    # a layer (E = 32 < 64 on stories260K); 128 float16 residual tokens.
    "hf_quantized": StoreConfig(block_len=64, key_axis="channel", key_group=64, value_group=32,
                                sink_tokens=0, recent_window=128, uniform_level=2,
                                importance="none", name="hf_quantized"),
    # KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
    # Cache"): keys per channel in groups of 32 tokens, values per token in groups of 32
    # channels, a 128-token full-precision residual; at 4 bits (the store has no 2-bit level)
    "kivi4": StoreConfig(block_len=32, key_axis="channel", key_group=32, value_group=32,
                         sink_tokens=0, recent_window=128, uniform_level=2,
                         importance="none", name="kivi4"),
}


def block_level_bytes(c: StoreConfig, spec: DecoderSpec) -> list[int]:
    """Resident bytes of one block of ``c.block_len`` tokens (all layers, K and V) at each
    level ``[L0 float16, L1 INT8, L2 INT4, L3 evicted]``, quantization metadata included."""
    L, E, bl = spec.num_layers, spec.num_kv_heads * spec.head_dim, c.block_len
    out = [bl * 2 * L * E * 2]
    for level in (1, 2):
        bits = LEVEL_BITS[level]
        kg = (bl // c.key_group) * E if c.key_axis == "channel" else bl * (E // c.key_group)
        vg = bl * (E // c.value_group)
        out.append(L * (stored_nbytes(bl * E, kg, bits) + stored_nbytes(bl * E, vg, bits)))
    out.append(0)
    return out


def store_for_scheme(name: str, spec: DecoderSpec, policy=None) -> "TieredKVCache":
    """A store for a named scheme: ``fp16``, ``q8_0``, ``q4_0``, ``hf_quantized``, ``kivi4`` or
    ``tiered`` (the policy's tiered store; ``policy`` defaults to the ``default`` preset).

    Raises:
        ValueError: unknown scheme name.
        FileNotFoundError: the model folder has no ``model_tiered.onnx``.
    """
    if name == "tiered":
        from ..policy import load_policy

        return TieredKVCache(spec, policy or load_policy("default"))
    if name not in SCHEMES:
        raise ValueError(f"unknown KV scheme {name!r}; known: tiered, {', '.join(SCHEMES)}")
    return TieredKVCache(spec, None, config=SCHEMES[name])


def _as_array(v: object) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else v.numpy()


def pack_half(x: np.ndarray) -> np.ndarray:
    """Split-half INT4 packing of uint8 values in ``[0, 16)`` (even count): flat byte ``i``
    holds value ``i`` in the low nibble and value ``i + n/2`` in the high nibble, so the
    graph unpacks with one ``BitwiseAnd``, one ``BitShift`` and a ``Concat`` of the halves
    (used per layer for INT4 zero points when key and value group sizes differ).
    Returns a 1-D uint8 array of ``n/2`` bytes."""
    f = np.ascontiguousarray(x, dtype=np.uint8).reshape(-1)
    h = f.size // 2
    return f[:h] | (f[h:] << 4)


def unpack_half(p: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_half` (1-D uint8, twice as many values)."""
    p = np.asarray(p, dtype=np.uint8).reshape(-1)
    return np.concatenate([p & 0x0F, p >> 4])


def _quantize_rows(r: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~lemonade_inferos.kv.quantize.quantize_groups` of every column of ``r``
    (float32 ``[g, R]``, one group per column): codes uint8 ``[g, R]``, scale float16
    ``[R]``, zero point uint8 ``[R]``.

    Raises:
        ValueError: ``r`` contains NaN or infinity.
    """
    if not np.isfinite(r).all():
        raise ValueError("x contains NaN or infinity")
    q, s16, zero = quantize_groups(r, bits, 0)
    return q, s16[0], zero[0]


class _Tier:
    """One quantized tier (level 1 INT8 or 2 INT4): ``arrays`` holds its graph inputs by
    name, in the layout of :mod:`lemonade_inferos.kv.graph` (nothing else is kept);
    ``blocks`` the block ids in slot order (slot ``s`` = tier tokens
    ``s*block_len ... (s+1)*block_len - 1``)."""

    def __init__(self, level: int):
        self.level, self.bits = level, LEVEL_BITS[level]
        self.blocks: list[int] = []
        self.arrays: dict[str, np.ndarray] = {}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


class TieredKVCache(KVCache):
    """Tiered quantized KV store for ``model_tiered.onnx`` (batch 1).

    Args:
        spec: the decoder's :class:`~lemonade_inferos.model.spec.DecoderSpec`.
        policy: a :class:`~lemonade_inferos.policy.Policy` (its ``kv`` section), or None
            when ``config`` is given.
        config: a :class:`StoreConfig` overriding the policy mapping (benchmark baselines).

    Raises:
        ValueError: invalid configuration (message names the field).
        FileNotFoundError: ``spec.folder`` has no ``model_tiered.onnx``.
    """

    def __init__(self, spec: DecoderSpec, policy=None, config: StoreConfig | None = None):
        super().__init__(spec)
        if config is None:
            if policy is None:
                raise ValueError("TieredKVCache needs a policy or a StoreConfig")
            config = StoreConfig.from_policy(policy)
        config.validate(spec)
        self.config = c = config
        self.graph_file = ensure_graph(spec.folder, c.layout).name if spec.folder else c.layout.file_name()
        self.L, self.KV, self.D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.E = self.KV * self.D
        self.row_bytes = 2 * self.L * self.E * 2  # one token at L0: K + V float16
        self._seq = 0
        self._n0 = 0
        self._formed = 0  # blocks formed so far
        ctx = max(int(spec.context_length), 1)
        self._tok_mass = np.zeros(ctx, np.float64)
        self._levels = np.zeros(0, np.int8)
        self._knorm = np.zeros(0, np.float64)
        self._evicted_tokens = 0
        self._alloc_l0(self._l0_cap(0))
        self._mask = np.ones((1, self._cap + 1), np.int64)
        self._mask_state: tuple[int, int] | None = None  # (cap, n0) the mask was written for
        self._modes = {k: c.layout.grouping(k, self.D) for k in ("key", "value")}
        self._tiers = {1: _Tier(1), 2: _Tier(2)}
        for t in self._tiers.values():
            t.arrays = self._to_graph(t.level, {k: self._empty_canonical(k) for k in ("key", "value")})
        self._q_tok = np.zeros(0, np.int64)  # logical position per quantized slot (L1 then L2)
        self._acc_q = np.zeros(0, np.float32)
        self._tier_inputs: dict[str, object] = {}
        self._tier_dirty = True
        self._refresh_tier_inputs()
        self._level_bytes = self._block_level_bytes()
        self._outs = [NEW_KV, ATTN_MASS]
        self._new_buf = np.empty((1, 2 * self.L * self.E, 1), np.float32)
        self._mass_buf = np.empty(0, np.float32)

    # ------------------------------------------------------------------ buffers
    def _alloc_l0(self, cap: int) -> None:
        """(Re)allocate the channel-major L0 buffer ``[2L, E, cap]`` float16 (the graph
        input ``kv.l0``; columns ``n0..cap-1`` are spare, masked out by
        :meth:`attention_mask`)."""
        old = getattr(self, "_l0", None)
        n = self._n0
        buf = _buffer_zeros((2 * self.L, self.E, cap), np.float16)
        acc = np.zeros(cap, np.float32)
        tok = np.zeros(cap, np.int64)
        if old is not None and n:
            buf[:, :, :n] = self._l0buf[:, :, :n]
            acc[:n] = self._acc0[:n]
            tok[:n] = self._l0_tok[:n]
        self._l0buf, self._acc0, self._l0_tok = buf, acc, tok
        # [cap, L, E] (token, layer, channel) views of the keys / values
        self._l0 = {"key": buf[: self.L].transpose(2, 0, 1), "value": buf[self.L:].transpose(2, 0, 1)}
        self._cap = cap

    def _l0_cap(self, n0: int) -> int:
        """L0 capacity for ``n0`` resident tokens: room for the tokens that accumulate
        until the next block forms (then re-tiering compacts L0)."""
        c = self.config
        return max(n0, c.sink_tokens + c.recent_window) + c.block_len

    def _block_level_bytes(self) -> list[int]:
        return block_level_bytes(self.config, self.spec)

    # ------------------------------------------------------------------ KVCache API
    @property
    def past_length(self) -> int:
        """Key positions presented: the L0 capacity (``n0`` tokens + masked spare
        columns) + the quantized tiers' tokens."""
        return self._cap + self._nq()

    def _nq(self) -> int:
        """Tokens held by the quantized tiers."""
        return self._q_tok.size

    def attention_mask(self, new_tokens: int) -> np.ndarray:
        """int64 ``[1, past_length + new_tokens]``: 0 for the spare L0 columns, else 1.

        One buffer, updated incrementally: a decode step only sets the column of the token
        appended since the last call."""
        cap, n0 = self._cap, self._n0
        total = self.past_length + int(new_tokens)
        if self._mask.shape[1] < total:
            self._mask = np.ones((1, total + self.config.block_len), np.int64)
            self._mask_state = None
        m, st = self._mask, self._mask_state
        if st is not None and st[0] == cap and st[1] <= n0:
            m[0, st[1]:n0] = 1
        else:
            m[0, :n0] = 1
            m[0, n0:cap] = 0
            m[0, cap:] = 1
        self._mask_state = (cap, n0)
        return m[:, :total]

    @property
    def seq_length(self) -> int:
        return self._seq

    def past_inputs(self) -> Mapping[str, object]:
        self._tier_dirty = False
        d = dict(self._tier_inputs)
        d[L0] = self._l0buf
        return d

    def step_inputs(self) -> Mapping[str, object]:
        """``kv.l0`` (every step) plus the tier arrays when re-tiering replaced them since
        the last :meth:`past_inputs` / :meth:`step_inputs`."""
        if self._tier_dirty:
            return self.past_inputs()
        return {L0: self._l0buf}

    def output_names(self) -> list[str]:
        return self._outs

    def output_buffers(self, new_tokens: int) -> Mapping[str, np.ndarray] | None:
        """For decode steps (``new_tokens == 1``): ``kv.new`` ``[1, 2L*E, 1]`` and
        ``kv.attn_mass`` ``[past_length + 1]`` float32 buffers reused every step (prefill
        outputs are left to onnxruntime)."""
        if new_tokens != 1:
            return None
        T = self.past_length + 1
        if self._mass_buf.size < T:
            self._mass_buf = np.empty(T + 2 * self.config.block_len, np.float32)
        return {NEW_KV: self._new_buf, ATTN_MASS: self._mass_buf[:T]}

    def update(self, outputs: Mapping[str, object], new_tokens: int) -> None:
        """Append the run's K/V rows at L0, accumulate attention mass, re-tier when a block
        leaves the recent window.

        Raises:
            ValueError: ``kv.new`` does not hold ``new_tokens`` tokens.
        """
        S = int(new_tokens)
        new = _as_array(outputs[NEW_KV])
        L, E = self.L, self.E
        if new.shape != (1, 2 * L * E, S):
            raise ValueError(f"{NEW_KV} has shape {new.shape}, expected {(1, 2 * L * E, S)}")
        n0, cap = self._n0, self._cap  # as presented to the run
        P = self.past_length
        mass = outputs.get(ATTN_MASS) if hasattr(outputs, "get") else None
        if mass is not None:  # graph order: L0 columns (n0 used of cap), quantized, new
            mass = _as_array(mass)
            self._acc0[:n0] += mass[:n0]
            if P > cap:
                self._acc_q += mass[cap:P]
        if n0 + S > cap:
            self._alloc_l0(self._l0_cap(n0 + S))
        if mass is not None:
            self._acc0[n0:n0 + S] = mass[P:P + S]
        seq = self._seq
        if S == 1:  # decode: one column, no temporaries
            self._l0buf[:, :, n0] = new[0, :, 0].reshape(2 * L, E)
            self._l0_tok[n0] = seq
        else:
            self._l0buf[:, :, n0:n0 + S] = new.reshape(2 * L, E, S)
            self._l0_tok[n0:n0 + S] = np.arange(seq, seq + S)
        self._n0 = n0 + S
        self._seq = seq = seq + S
        c = self.config
        ready = (seq - c.recent_window - c.sink_tokens) // c.block_len
        if ready > self._formed or (c.budget_bytes is not None and self.total_bytes() > c.budget_bytes):
            self._rebalance(max(ready, self._formed))

    # ------------------------------------------------------------------ reuse (prefix cache)
    def reuse_key(self) -> str:
        """``tiered:`` + the graph file + every :class:`StoreConfig` field."""
        return f"tiered:{self.graph_file}:{self.config!r}"

    def lossy_tokens(self) -> int:
        """Tokens held quantized (L1/L2) or evicted (L3): what a fresh prefill would still
        hold at full precision while its prompt runs."""
        return int(self._nq() + self._evicted_tokens)

    def snapshot(self) -> KVSnapshot:
        """The state: the used L0 columns (a copy, float16 ``[2L, E, n0]``) and the quantized
        tiers' arrays *by reference* (re-tiering replaces tier arrays, it never writes into
        them, so snapshots and every cache restored from them share those bytes); plus the
        importance and position bookkeeping (copies)."""
        n0, seq = self._n0, self._seq
        arrays: dict[str, np.ndarray] = {L0: self._l0buf[:, :, :n0].copy()}
        for level, tier in self._tiers.items():
            for name, a in tier.arrays.items():
                arrays[f"tier{level}/{name}"] = a
        state = {
            "seq": seq, "n0": n0, "formed": self._formed, "evicted": self._evicted_tokens,
            "levels": self._levels.copy(), "knorm": self._knorm.copy(),
            "tok_mass": self._tok_mass[:seq].copy(), "acc0": self._acc0[:n0].copy(),
            "l0_tok": self._l0_tok[:n0].copy(), "q_tok": self._q_tok.copy(), "acc_q": self._acc_q.copy(),
            "tier_blocks": {level: list(t.blocks) for level, t in self._tiers.items()},
        }
        return KVSnapshot(self.reuse_key(), seq, arrays, lossy_tokens=self.lossy_tokens(), state=state)

    def restore(self, snap: KVSnapshot) -> None:
        """Load ``snap``: L0 columns copied into this cache's own buffer, tier arrays bound
        as they are (shared, never written)."""
        self._check_restore(snap)
        st = snap.state
        n0, seq = int(st["n0"]), int(st["seq"])
        self._n0 = 0
        self._alloc_l0(self._l0_cap(n0))
        self._l0buf[:, :, :n0] = snap.arrays[L0]
        self._acc0[:n0] = st["acc0"]
        self._l0_tok[:n0] = st["l0_tok"]
        self._n0, self._seq = n0, seq
        self._formed, self._evicted_tokens = int(st["formed"]), int(st["evicted"])
        self._levels, self._knorm = st["levels"].copy(), st["knorm"].copy()
        self._tok_mass[:] = 0
        self._tok_mass[:seq] = st["tok_mass"]
        self._q_tok, self._acc_q = st["q_tok"].copy(), st["acc_q"].copy()
        for level, tier in self._tiers.items():
            prefix = f"tier{level}/"
            tier.arrays = {k[len(prefix):]: a for k, a in snap.arrays.items() if k.startswith(prefix)}
            tier.blocks = list(st["tier_blocks"][level])
        self._mask_state = None
        self._refresh_tier_inputs()

    def truncate_floor(self) -> int:
        """Tokens after the last quantized or evicted block can be dropped: the state can
        be cut anywhere from the end of that block (or 0 when there is none)."""
        lossy = np.nonzero(self._levels > 0)[0]
        if lossy.size == 0:
            return 0
        return int(self.config.sink_tokens + (int(lossy[-1]) + 1) * self.config.block_len)

    def truncate(self, tokens: int) -> None:
        """Drop the tokens at positions ``>= tokens`` (all at L0, see
        :meth:`truncate_floor`); formed blocks reaching past the cut go back to the recent
        window. Importance accumulated from the dropped tokens' queries onto earlier
        tokens is kept (it only steers later re-tiering)."""
        n = self._check_truncate(tokens)
        if n == self._seq:
            return
        c = self.config
        formed = max(0, min(self._formed, (n - c.sink_tokens) // c.block_len))
        keep = int(np.count_nonzero(self._l0_tok[: self._n0] < n))
        self._acc0[keep:self._n0] = 0
        self._n0 = keep
        self._tok_mass[n:] = 0
        self._formed = formed
        self._levels, self._knorm = self._levels[:formed].copy(), self._knorm[:formed].copy()
        self._seq = n
        self._mask_state = None

    # ------------------------------------------------------------------ re-tiering
    def _flush_mass(self) -> None:
        n0 = self._n0
        # positions are unique within L0 and within the quantized tiers: plain fancy +=
        self._tok_mass[self._l0_tok[:n0]] += self._acc0[:n0]
        self._acc0[:n0] = 0
        if self._q_tok.size:
            self._tok_mass[self._q_tok] += self._acc_q
            self._acc_q[:] = 0

    def _importance(self, nb: int) -> np.ndarray:
        c = self.config
        if c.importance == "h2o":
            return block_mass(self._tok_mass, c.sink_tokens, nb, c.block_len)
        if c.importance == "h2o_mean":
            return block_mass_mean(self._tok_mass, c.sink_tokens, nb, c.block_len, self._seq)
        if c.importance == "recency_norm":
            return fallback_scores(self._knorm[:nb])
        return np.arange(nb, dtype=np.float64) * 1e-9  # oldest least important

    def _block_of(self, tok: np.ndarray) -> np.ndarray:
        c = self.config
        b = (tok - c.sink_tokens) // c.block_len
        b[tok < c.sink_tokens] = -1
        b[b >= self._formed] = -1
        return b

    def _rebalance(self, nb: int) -> None:
        c = self.config
        self._flush_mass()
        # form the blocks that left the window (they sit at L0 until assigned)
        if nb > self._formed:
            first = self._formed
            self._formed = nb
            self._levels = np.concatenate([self._levels, np.zeros(nb - first, np.int8)])
            kn = np.zeros(nb - first)
            if c.importance == "recency_norm":  # mean key norm per block (fallback score)
                blk = self._block_of(self._l0_tok[: self._n0])
                for j in range(first, nb):
                    rows = self._l0["key"][: self._n0][blk == j].astype(np.float32)
                    kn[j - first] = np.sqrt((rows.reshape(len(rows), -1, self.D) ** 2).sum(-1)).mean() if len(rows) else 0
            self._knorm = np.concatenate([self._knorm, kn])
        imp = self._importance(nb)
        if c.uniform_level is not None and c.mode != "disabled":
            target = np.maximum(self._levels, np.int8(c.uniform_level))
            if c.budget_bytes is not None:
                target = assign_levels(imp, (0.0, 0.0, 1.0), c.mode, level_bytes=self._level_bytes,
                                       fixed_bytes=self._fixed_bytes(), budget_bytes=c.budget_bytes,
                                       current=target)
        else:
            target = assign_levels(imp, c.thresholds, c.mode, level_bytes=self._level_bytes,
                                   fixed_bytes=self._fixed_bytes(), budget_bytes=c.budget_bytes,
                                   current=self._levels)
        changed = np.nonzero(target != self._levels)[0]
        if changed.size == 0:
            return
        self._apply(target)

    def _fixed_bytes(self) -> int:
        """Bytes that are never demoted: sinks + tokens not in a formed block."""
        c = self.config
        fixed_tokens = min(self._seq, c.sink_tokens) + max(0, self._seq - c.sink_tokens - self._formed * c.block_len)
        return fixed_tokens * self.row_bytes

    # Canonical (unpacked) form of a tier, used only while re-tiering: codes uint8
    # [L, N, E]; scale float16 / zero uint8 [L, N/key_group, E] (per-channel keys) or
    # [L, N, E/g] (per-token groups) -- what quantize() returns for x = [L, N, E].
    def _meta_rows(self, kind: str) -> int:
        """Rows of the canonical scale per block (axis 1)."""
        mode, g = self._modes[kind]
        return self.config.block_len // g if mode == "channel" else self.config.block_len

    def _empty_canonical(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mode, g = self._modes[kind]
        w = self.E if mode == "channel" else self.E // g
        return (np.zeros((self.L, 0, self.E), np.uint8), np.zeros((self.L, 0, w), np.float16),
                np.zeros((self.L, 0, w), np.uint8))

    def _meta_graph_shape(self, kind: str, N: int) -> tuple[int, ...]:
        """Graph shape of a tier's scale/zero for ``N`` tokens: flat ``[L*E*N/g]`` rows
        ``(l, e, n/g)`` (per-channel keys) or ``[L, E/g, N]`` (per-token groups)."""
        mode, g = self._modes[kind]
        if mode == "channel":
            return (self.L * self.E * (N // g),)
        return (self.L, self.E // g, N)

    def _to_graph(self, level: int, canon: dict[str, tuple]) -> dict[str, np.ndarray]:
        """Canonical (per kind) -> the tier's graph inputs by name: codes ``[L, E, N]``
        (INT4: key codes in the low nibble, value codes in the high nibble of one byte),
        scales/zero points transposed the same way (see :meth:`_meta_graph_shape`)."""
        out: dict[str, np.ndarray] = {}
        g_codes, g_zero = {}, {}
        for kind, (codes, scale, zero) in canon.items():
            qn, sn, zn = input_names(level, kind)
            N = codes.shape[1]
            shape = self._meta_graph_shape(kind, N)
            g_codes[kind] = np.ascontiguousarray(codes.transpose(0, 2, 1))
            out[sn] = np.ascontiguousarray(scale.transpose(0, 2, 1)).reshape(shape)
            g_zero[kind] = np.ascontiguousarray(zero.transpose(0, 2, 1)).reshape(shape)
        if level == 1:
            for kind in canon:
                qn, sn, zn = input_names(level, kind)
                out[qn], out[zn] = g_codes[kind], g_zero[kind]
            return out
        out[L2_CODES] = g_codes["key"] | (g_codes["value"] << 4)
        out.update(self._pack_zeros(g_zero))
        return out

    def _pack_zeros(self, g_zero: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """INT4 zero points in graph order (per kind) -> the level-2 zero input(s)."""
        if self.config.layout.paired_zero():
            return {L2_ZERO: g_zero["key"].reshape(-1) | (g_zero["value"].reshape(-1) << 4)}
        return {input_names(2, kind)[2]: np.stack([pack_half(r) for r in z.reshape(self.L, -1)])
                for kind, z in g_zero.items()}

    def _block_view(self, level: int, name: str, arr: np.ndarray, nb: int) -> np.ndarray | None:
        """``arr`` (a tier input holding ``nb`` blocks) viewed as ``[a, b, nb, units]`` with
        one block per index of axis 2, or None for level-2 zero points (packed across
        blocks; rebuilt from canonical form)."""
        L, E, bl = self.L, self.E, self.config.block_len
        if name == L2_CODES:
            return arr.reshape(L, E, nb, bl)
        for kind in ("key", "value"):
            qn, sn, zn = input_names(level, kind)
            if name == qn:
                return arr.reshape(L, E, nb, bl)
            if name == sn or (name == zn and level == 1):
                mode, g = self._modes[kind]
                return arr.reshape(L, E, nb, bl // g) if mode == "channel" else arr.reshape(L, E // g, nb, bl)
        return None

    def _graph_shape(self, level: int, name: str, N: int) -> tuple[int, ...]:
        if name == L2_CODES:
            return (self.L, self.E, N)
        for kind in ("key", "value"):
            qn, sn, zn = input_names(level, kind)
            if name == qn:
                return (self.L, self.E, N)
            if name in (sn, zn):
                return self._meta_graph_shape(kind, N)
        raise KeyError(name)

    def _canonical(self, tier: _Tier, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Graph layout of ``tier`` -> canonical (unpacked) arrays of ``kind``."""
        mode, g = self._modes[kind]
        L, E = self.L, self.E
        N = len(tier.blocks) * self.config.block_len
        a = tier.arrays
        qn, sn, zn = input_names(tier.level, kind)
        shape = (L, E, N // g) if mode == "channel" else (L, E // g, N)
        scale = a[sn].reshape(shape)
        if tier.bits == 8:
            codes, zero = a[qn], a[zn].reshape(shape)
        else:
            nib = (lambda x: x & 0x0F) if kind == "key" else (lambda x: x >> 4)
            codes = nib(a[L2_CODES])
            zero = nib(a[L2_ZERO]) if L2_ZERO in a else np.stack([unpack_half(r) for r in a[zn]])
            zero = zero.reshape(shape)
        t = (0, 2, 1)
        return codes.transpose(t), scale.transpose(t), zero.transpose(t)

    def _quantize_block(self, rows: dict[str, np.ndarray], bits: int) -> dict[str, tuple]:
        """rows[kind]: float ``[bl, L, E]`` -> canonical (codes [L, bl, E], scale, zero)."""
        out = {}
        for kind, r in rows.items():
            x = np.ascontiguousarray(r.transpose(1, 0, 2), dtype=np.float32)  # [L, bl, E]
            mode, g = self._modes[kind]
            qt = quantize(x, bits, axis=1 if mode == "channel" else 2, group=g)
            out[kind] = (qt.q, qt.scale, qt.zero)
        return out

    def _dequant_block(self, canon: dict[str, tuple], slot: int) -> dict[str, np.ndarray]:
        """float32 ``[bl, L, E]`` per kind of the block in ``slot`` of a canonical tier."""
        bl = self.config.block_len
        res = {}
        for kind, (codes, scale, zero) in canon.items():
            mode, g = self._modes[kind]
            m = self._meta_rows(kind)
            cq = codes[:, slot * bl:(slot + 1) * bl]
            sq, zq = scale[:, slot * m:(slot + 1) * m], zero[:, slot * m:(slot + 1) * m]
            x = dequantize(cq, sq, zq, axis=1 if mode == "channel" else 2, group=g)
            res[kind] = x.transpose(1, 0, 2)
        return res

    def _rows(self, x: np.ndarray, kind: str) -> np.ndarray:
        """float32 ``[g, R]``: the quantization groups of ``x`` (``[L, E, n]``,
        channel-major, any strides) for ``kind``, one group per column (numpy reduces a
        leading axis ~10x faster than short rows): columns ``(l, e, n/g)`` for per-channel
        groups of g tokens, ``(l, e/g, n)`` for per-token groups of g channels."""
        mode, g = self._modes[kind]
        L, E, n = x.shape
        if mode == "channel":
            gx = x.reshape(L, E, n // g, g).transpose(3, 0, 1, 2)
        else:
            gx = x.reshape(L, E // g, g, n).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(gx, dtype=np.float32).reshape(g, -1)

    def _from_rows(self, kind: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_rows` order back to graph layout: codes ``[L, E, n]``, scale/zero
        ``[L, E, n/g]`` (per-channel groups) or ``[L, E/g, n]`` (per-token groups)."""
        mode, g = self._modes[kind]
        L, E = self.L, self.E
        if mode == "channel":
            codes = np.ascontiguousarray(q.reshape(g, L, E, n // g).transpose(1, 2, 3, 0)).reshape(L, E, n)
            return codes, scale.reshape(L, E, n // g), zero.reshape(L, E, n // g)
        codes = np.ascontiguousarray(q.reshape(g, L, E // g, n).transpose(1, 2, 0, 3)).reshape(L, E, n)
        return codes, scale.reshape(L, E // g, n), zero.reshape(L, E // g, n)

    def _quantize_cm(self, x: np.ndarray, kind: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize one kind of a block straight from the channel-major L0 layout.

        ``x``: float16/float32 ``[L, E, n]`` (``n`` a multiple of ``block_len``). Returns
        graph-layout ``(codes [L, E, n], scale, zero)`` with scale/zero ``[L, E, n/g]``
        (per-channel groups) or ``[L, E/g, n]`` (per-token groups), i.e. the graph's
        metadata order before flattening. The arithmetic is exactly that of
        :func:`~lemonade_inferos.kv.quantize.quantize` (same codes, scales and zero
        points), without its transposes to and from the canonical form.

        Raises:
            ValueError: ``x`` contains NaN or infinity.
        """
        return self._from_rows(kind, *_quantize_rows(self._rows(x, kind), bits), x.shape[2])

    def _quantize_l0_block(self, x: np.ndarray, bits: int) -> dict[str, tuple]:
        """Both kinds of a block of L0 columns ``x`` (``[2L, E, n]``: keys then values) ->
        ``{kind: (codes, scale, zero)}`` as :meth:`_quantize_cm` returns them; when both
        kinds have groups of the same size their rows are quantized in one pass (the
        re-tiering cost on small models is numpy call overhead, not arithmetic)."""
        L, n = self.L, x.shape[2]
        rows = {"key": self._rows(x[:L], "key"), "value": self._rows(x[L:], "value")}
        if rows["key"].shape[0] != rows["value"].shape[0]:
            return {k: self._from_rows(k, *_quantize_rows(r, bits), n) for k, r in rows.items()}
        nk = rows["key"].shape[1]
        q, sc, z = _quantize_rows(np.concatenate([rows["key"], rows["value"]], axis=1), bits)
        return {"key": self._from_rows("key", q[:, :nk], sc[:nk], z[:nk], n),
                "value": self._from_rows("value", q[:, nk:], sc[nk:], z[nk:], n)}

    def _graph_piece(self, level: int, cm: dict[str, tuple]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Graph-layout block(s) from :meth:`_quantize_cm` output per kind -> (the tier
        inputs except the INT4 zero points, unpacked zero points per kind in graph order)."""
        out: dict[str, np.ndarray] = {}
        zeros: dict[str, np.ndarray] = {}
        for kind, (q, sc, z) in cm.items():
            qn, sn, zn = input_names(level, kind)
            n = q.shape[2]
            shape = self._meta_graph_shape(kind, n)
            out[sn] = sc.reshape(shape)
            zeros[kind] = z.reshape(shape)
            if level == 1:
                out[qn], out[zn] = q, zeros[kind]
        if level == 2:
            out[L2_CODES] = cm["key"][0] | (cm["value"][0] << 4)
        return out, zeros

    def _meta_block_view(self, kind: str, arr: np.ndarray, nb: int) -> np.ndarray:
        """A kind's scale/zero in graph order (``nb`` blocks) as ``[a, b, nb, units]``."""
        L, E, bl = self.L, self.E, self.config.block_len
        mode, g = self._modes[kind]
        return arr.reshape(L, E, nb, bl // g) if mode == "channel" else arr.reshape(L, E // g, nb, bl)

    def _l2_zeros(self, tier: _Tier) -> dict[str, np.ndarray]:
        """Unpacked INT4 zero points per kind of a level-2 tier, in graph (scale) order."""
        a = tier.arrays
        if L2_ZERO in a:
            return {"key": a[L2_ZERO] & 0x0F, "value": a[L2_ZERO] >> 4}
        return {k: np.stack([unpack_half(r) for r in a[input_names(2, k)[2]]]).reshape(-1) for k in KINDS}

    def _apply(self, target: np.ndarray) -> None:
        c, bl = self.config, self.config.block_len
        for v in (1, 2):  # StoreConfig.levels must foresee every level assign_levels can give
            if v not in c.levels and (target == v).any():
                raise RuntimeError(f"level(s) [{v}] assigned but the graph has only {c.levels}")
        old = self._levels
        n0 = self._n0
        blk = self._block_of(self._l0_tok[:n0])
        kinds = KINDS
        L = self.L
        # new blocks per level: (block id, graph inputs of the block (INT4 zero points
        # excluded), unpacked zero points per kind in graph order)
        new_pieces: dict[int, list[tuple[int, dict, dict]]] = {1: [], 2: []}
        # blocks leaving L0: quantized straight from the channel-major L0 buffer (a block's
        # columns are contiguous, L0 being kept in token order)
        for b in np.nonzero((old == 0) & (target > 0))[0]:
            lv = int(target[b])
            if lv == 3:
                continue
            idx = np.flatnonzero(blk == b)
            if idx.size and idx[-1] - idx[0] == idx.size - 1:
                x = self._l0buf[:, :, idx[0]:idx[-1] + 1]
            else:
                x = self._l0buf[:, :, idx]
            cm = self._quantize_l0_block(x, LEVEL_BITS[lv])
            new_pieces[lv].append((int(b),) + self._graph_piece(lv, cm))
        # INT8 -> INT4 re-quantization (through the canonical form)
        t1 = self._tiers[1]
        if any(target[b] == 2 for b in t1.blocks):
            canon1 = {k: self._canonical(t1, k) for k in kinds}
            for slot, b in enumerate(t1.blocks):
                if target[b] == 2:
                    piece = self._quantize_block(self._dequant_block(canon1, slot), 4)
                    g = self._to_graph(2, piece)
                    zeros = {k: np.ascontiguousarray(piece[k][2].transpose(0, 2, 1)).reshape(
                        self._meta_graph_shape(k, bl)) for k in kinds}
                    new_pieces[2].append((b, g, zeros))
        # rebuild the quantized tiers in graph layout: kept blocks in slot order, then new
        # ones, block-wise along the token axis of every input (INT4 zero points unpacked
        # to graph order, rebuilt the same way, packed again)
        for level in (1, 2):
            tier = self._tiers[level]
            nb = len(tier.blocks)
            keep = [(slot, b) for slot, b in enumerate(tier.blocks) if target[b] == level]
            if len(keep) == nb and not new_pieces[level]:
                continue
            slots = [slot for slot, _ in keep]
            all_kept = len(keep) == nb
            n_new = (len(keep) + len(new_pieces[level])) * bl
            arrays: dict[str, np.ndarray] = {}
            for name, arr in tier.arrays.items():
                v = self._block_view(level, name, arr, nb)
                if v is None:
                    continue
                chunks = [v if all_kept else v[:, :, slots]] if keep else []
                chunks += [self._block_view(level, name, pg[name], 1) for _, pg, _ in new_pieces[level]]
                cat = np.concatenate(chunks, axis=2) if len(chunks) > 1 else (
                    np.ascontiguousarray(chunks[0]) if chunks else v[:, :, :0])
                arrays[name] = cat.reshape(self._graph_shape(level, name, n_new))
            if level == 2:
                old_z = self._l2_zeros(tier) if keep else None
                g_zero = {}
                for kind in kinds:
                    chunks = []
                    if keep:
                        zv = self._meta_block_view(kind, old_z[kind], nb)
                        chunks.append(zv if all_kept else zv[:, :, slots])
                    chunks += [self._meta_block_view(kind, z[kind], 1) for _, _, z in new_pieces[level]]
                    if chunks:
                        zc = np.concatenate(chunks, axis=2)
                    else:
                        zc = np.zeros(0, np.uint8)
                    g_zero[kind] = zc.reshape(self._meta_graph_shape(kind, n_new))
                arrays.update(self._pack_zeros(g_zero))
            tier.arrays = arrays
            tier.blocks = [b for _, b in keep] + [b for b, _, _ in new_pieces[level]]
        self._evicted_tokens += int(((target == 3) & (old != 3)).sum()) * bl
        self._levels = target.astype(np.int8)
        # compact L0: keep sinks, recent tokens and blocks still at level 0
        lv = np.where(blk >= 0, self._levels[np.maximum(blk, 0)], 0)
        keep_idx = np.nonzero(lv == 0)[0]
        k = keep_idx.size
        if k != n0:
            self._l0buf[:, :, :k] = self._l0buf[:, :, keep_idx]
            self._acc0[:k] = self._acc0[keep_idx]
            self._l0_tok[:k] = self._l0_tok[keep_idx]
            self._n0 = k
            if self._cap > self._l0_cap(k) + bl:
                self._alloc_l0(self._l0_cap(k))
        qb = np.array(self._tiers[1].blocks + self._tiers[2].blocks, np.int64)
        self._q_tok = (c.sink_tokens + qb[:, None] * bl + np.arange(bl, dtype=np.int64)).reshape(-1)
        self._acc_q = np.zeros(self._q_tok.size, np.float32)
        self._refresh_tier_inputs()

    def _refresh_tier_inputs(self) -> None:
        d: dict[str, object] = {}
        for level, tier in self._tiers.items():
            if level in self.config.levels:
                d.update(tier.arrays)
        self._tier_inputs = d
        self._tier_dirty = True

    # ------------------------------------------------------------------ statistics
    def total_bytes(self) -> int:
        """Resident KV bytes now: L0 rows in use + every quantized tier array (codes,
        float16 scales, zero points)."""
        return self._n0 * self.row_bytes + sum(t.nbytes() for t in self._tiers.values())

    def stats(self) -> KVStats:
        by = {TIER_NAMES[0]: self._n0 * self.row_bytes}
        for level, t in self._tiers.items():
            by[TIER_NAMES[level]] = t.nbytes()
        bl = self.config.block_len
        dist = {"L0": self._n0 * self.L,
                "L1": len(self._tiers[1].blocks) * bl * self.L,
                "L2": len(self._tiers[2].blocks) * bl * self.L,
                "L3": self._evicted_tokens * self.L}
        return KVStats(
            tokens=self._seq,
            total_bytes=int(sum(by.values())),
            bytes_by_tier=by,
            level_distribution=dist,
            fp16_bytes=self.fp_bytes(2),
            fp32_bytes=self.fp_bytes(4),
            blocks=int(self._formed),
            tokens_evicted=int(self._evicted_tokens),
            store=self.config.name,
        )
