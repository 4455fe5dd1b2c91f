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
as presented to the graph — the L0 buffer has up to ``block_len`` spare rows of capacity
not counted; the per-token importance array, 8 bytes/token, is bookkeeping, not counted):

* L0: ``kv.l0.key`` / ``kv.l0.value`` float16 ``[N0, L, E]`` (E = kv_heads*head_dim),
  2 bytes/element.
* L1: codes uint8; keys per-channel (KIVI) groups of ``key_group`` tokens, values
  per-token groups of ``value_group`` channels; one float16 scale + one uint8 zero point
  per group. Bytes/element = 1 + 3/group (8.75 bits at group 32).
* L2: the same with 4-bit codes and 4-bit zero points, two per byte: 0.5 + 2.5/group
  bytes (4.625 bits at group 32).

Array layouts (head-major ``[L, KV, N, D]`` codes, split-half INT4 packing) are those of
the graph inputs, documented in :mod:`lemonade_inferos.kv.graph`; the store holds exactly
those numpy arrays (no other copy) and binds them as they are. Only the levels a
configuration can assign (:attr:`StoreConfig.levels`) exist as graph inputs.

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
from .base import KVCache
from .graph import ATTN_MASS, LEVEL_BITS, NEW_KV, GraphLayout, ensure_graph, input_names, l0_name
from .importance import block_mass, block_mass_mean, fallback_scores
from .quantize import dequantize, quantize, stored_nbytes
from .tiers import MODES, assign_levels

IMPORTANCE = ("h2o_mean", "h2o", "recency_norm", "none")
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
}


def store_for_scheme(name: str, spec: DecoderSpec, policy=None) -> "TieredKVCache":
    """A store for a named scheme: ``fp16``, ``q8_0``, ``q4_0``, ``hf_quantized`` or
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
    graph unpacks with one ``BitwiseAnd``, one ``BitShift`` and a ``Concat`` of the halves.
    Returns a 1-D uint8 array of ``n/2`` bytes."""
    f = np.ascontiguousarray(x, dtype=np.uint8).reshape(-1)
    h = f.size // 2
    return f[:h] | (f[h:] << 4)


def unpack_half(p: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_half` (1-D uint8, twice as many values)."""
    p = np.asarray(p, dtype=np.uint8).reshape(-1)
    return np.concatenate([p & 0x0F, p >> 4])


class _Tier:
    """One quantized tier (level 1 INT8 or 2 INT4): per kind, the three graph inputs in
    the layout of :mod:`lemonade_inferos.kv.graph` (``codes``, ``scale``, ``zero``; codes
    and zero points split-half packed at INT4); ``blocks`` the block ids in slot order
    (slot ``s`` = tier tokens ``s*block_len ... (s+1)*block_len - 1``)."""

    def __init__(self, level: int):
        self.level, self.bits = level, LEVEL_BITS[level]
        self.blocks: list[int] = []
        self.codes: dict[str, np.ndarray] = {}
        self.scale: dict[str, np.ndarray] = {}
        self.zero: dict[str, np.ndarray] = {}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for d in (self.codes, self.scale, self.zero) for a in d.values()))


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
        self._alloc_l0(c.sink_tokens + c.recent_window + 2 * c.block_len)
        self._modes = {k: c.layout.grouping(k, self.D) for k in ("key", "value")}
        self._tiers = {1: _Tier(1), 2: _Tier(2)}
        for t in self._tiers.values():
            for k in ("key", "value"):
                t.codes[k], t.scale[k], t.zero[k] = self._to_graph(k, *self._empty_canonical(k), t.bits)
        self._q_tok = np.zeros(0, np.int64)  # logical position per quantized slot (L1 then L2)
        self._acc_q = np.zeros(0, np.float32)
        self._tier_inputs: dict[str, object] = {}
        self._refresh_tier_inputs()
        self._level_bytes = self._block_level_bytes()
        self._outs = [NEW_KV, ATTN_MASS]

    # ------------------------------------------------------------------ buffers
    def _alloc_l0(self, cap: int) -> None:
        old = getattr(self, "_l0", None)
        n = self._n0
        new = {k: np.zeros((cap, self.L, self.E), np.float16) for k in ("key", "value")}
        acc = np.zeros(cap, np.float32)
        tok = np.zeros(cap, np.int64)
        if old is not None and n:
            for k in new:
                new[k][:n] = old[k][:n]
            acc[:n] = self._acc0[:n]
            tok[:n] = self._l0_tok[:n]
        self._l0, self._acc0, self._l0_tok = new, acc, tok
        self._l0_4d = {k: v.reshape(cap, self.L, self.KV, self.D) for k, v in new.items()}
        self._cap = cap

    def _block_level_bytes(self) -> list[int]:
        c, L, E, bl = self.config, self.L, self.E, self.config.block_len
        out = [bl * self.row_bytes]
        for level in (1, 2):
            bits = LEVEL_BITS[level]
            kg = (bl // c.key_group) * E if c.key_axis == "channel" else bl * (E // c.key_group)
            vg = bl * (E // c.value_group)
            out.append(L * (stored_nbytes(bl * E, kg, bits) + stored_nbytes(bl * E, vg, bits)))
        out.append(0)
        return out

    # ------------------------------------------------------------------ KVCache API
    @property
    def past_length(self) -> int:
        return self._n0 + sum(len(t.blocks) for t in self._tiers.values()) * self.config.block_len

    @property
    def seq_length(self) -> int:
        return self._seq

    def past_inputs(self) -> Mapping[str, object]:
        n = self._n0
        d = dict(self._tier_inputs)
        d[l0_name("key")] = self._l0["key"][:n]
        d[l0_name("value")] = self._l0["value"][:n]
        return d

    def output_names(self) -> list[str]:
        return self._outs

    def update(self, outputs: Mapping[str, object], new_tokens: int) -> None:
        """Append the run's K/V rows at L0, accumulate attention mass, re-tier when a block
        leaves the recent window.

        Raises:
            ValueError: ``kv.new`` does not hold ``new_tokens`` tokens.
        """
        S = int(new_tokens)
        new = _as_array(outputs[NEW_KV])
        if new.shape != (2 * self.L, self.KV, S, self.D):
            raise ValueError(f"{NEW_KV} has shape {new.shape}, expected {(2 * self.L, self.KV, S, self.D)}")
        n0 = self._n0
        if n0 + S > self._cap:
            self._alloc_l0(n0 + S + self.config.block_len)
        P = self.past_length
        self._l0_4d["key"][n0:n0 + S] = new[: self.L].transpose(2, 0, 1, 3)
        self._l0_4d["value"][n0:n0 + S] = new[self.L:].transpose(2, 0, 1, 3)
        mass = outputs.get(ATTN_MASS) if hasattr(outputs, "get") else None
        if mass is not None:
            mass = _as_array(mass)
            self._acc0[:n0] += mass[:n0]
            self._acc0[n0:n0 + S] = mass[P:P + S]
            if P > n0:
                self._acc_q += mass[n0:P]
        self._l0_tok[n0:n0 + S] = np.arange(self._seq, self._seq + S)
        self._n0 = n0 + S
        self._seq += S
        c = self.config
        ready = (self._seq - c.recent_window - c.sink_tokens) // c.block_len
        if ready > self._formed or (c.budget_bytes is not None and self.total_bytes() > c.budget_bytes):
            self._rebalance(max(ready, self._formed))

    # ------------------------------------------------------------------ re-tiering
    def _flush_mass(self) -> None:
        n0 = self._n0
        np.add.at(self._tok_mass, self._l0_tok[:n0], self._acc0[:n0])
        self._acc0[:n0] = 0
        if self._q_tok.size:
            np.add.at(self._tok_mass, self._q_tok, self._acc_q)
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
        c, bl = self.config, self.config.block_len
        self._flush_mass()
        # form the blocks that left the window (they sit at L0 until assigned)
        if nb > self._formed:
            first = self._formed
            self._formed = nb
            self._levels = np.concatenate([self._levels, np.zeros(nb - first, np.int8)])
            kn = np.zeros(nb - first)
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

    def _to_graph(self, kind: str, codes, scale, zero, bits: int):
        """Canonical -> graph layout (head-major unless per-token groups span heads)."""
        mode, _ = self._modes[kind]
        L, N, KV, D = self.L, codes.shape[1], self.KV, self.D
        if mode != "row":
            codes = codes.reshape(L, N, KV, D).transpose(0, 2, 1, 3)
            w = scale.shape[2] // KV
            scale = scale.reshape(L, scale.shape[1], KV, w).transpose(0, 2, 1, 3)
            zero = zero.reshape(L, zero.shape[1], KV, w).transpose(0, 2, 1, 3)
        codes, scale, zero = (np.ascontiguousarray(a) for a in (codes, scale, zero))
        if bits == 4:
            codes, zero = pack_half(codes), pack_half(zero)
        return codes, scale, zero

    def _canonical(self, tier: _Tier, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Graph layout of ``tier`` -> canonical (unpacked) arrays."""
        mode, _ = self._modes[kind]
        L, KV, D, E = self.L, self.KV, self.D, self.E
        N = len(tier.blocks) * self.config.block_len
        codes, scale, zero = tier.codes[kind], tier.scale[kind], tier.zero[kind]
        if tier.bits == 4:
            codes, zero = unpack_half(codes), unpack_half(zero).reshape(scale.shape)
        if mode == "row":
            return codes.reshape(L, N, E), scale, zero
        codes = codes.reshape(L, KV, N, D).transpose(0, 2, 1, 3).reshape(L, N, E)
        w = KV * scale.shape[3]
        scale = scale.transpose(0, 2, 1, 3).reshape(L, scale.shape[2], w)
        zero = zero.transpose(0, 2, 1, 3).reshape(L, zero.shape[2], w)
        return codes, scale, zero

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

    def _apply(self, target: np.ndarray) -> None:
        c, bl = self.config, self.config.block_len
        bad = set(np.unique(target[(target == 1) | (target == 2)]).tolist()) - set(c.levels)
        if bad:  # StoreConfig.levels must foresee every level assign_levels can give
            raise RuntimeError(f"level(s) {sorted(bad)} assigned but the graph has only {c.levels}")
        old = self._levels
        n0 = self._n0
        blk = self._block_of(self._l0_tok[:n0])
        kinds = ("key", "value")
        canon = {lv: {k: self._canonical(t, k) for k in kinds} for lv, t in self._tiers.items() if t.blocks}
        new_pieces: dict[int, list[tuple[int, dict]]] = {1: [], 2: []}
        # blocks leaving L0
        for b in np.nonzero((old == 0) & (target > 0))[0]:
            if target[b] == 3:
                continue
            sel = blk == b
            rows = {k: self._l0[k][:n0][sel] for k in kinds}
            new_pieces[int(target[b])].append((int(b), self._quantize_block(rows, LEVEL_BITS[int(target[b])])))
        # INT8 -> INT4 re-quantization
        t1 = self._tiers[1]
        for slot, b in enumerate(t1.blocks):
            if target[b] == 2:
                new_pieces[2].append((b, self._quantize_block(self._dequant_block(canon[1], slot), 4)))
        # rebuild the quantized tiers: kept blocks in slot order, then new ones
        for level in (1, 2):
            tier = self._tiers[level]
            keep = [(slot, b) for slot, b in enumerate(tier.blocks) if target[b] == level]
            if len(keep) == len(tier.blocks) and not new_pieces[level]:
                continue
            for kind in kinds:
                m = self._meta_rows(kind)
                parts: list[list[np.ndarray]] = [[], [], []]
                if keep:
                    codes, scale, zero = canon[level][kind]
                    for slot, _ in keep:
                        parts[0].append(codes[:, slot * bl:(slot + 1) * bl])
                        parts[1].append(scale[:, slot * m:(slot + 1) * m])
                        parts[2].append(zero[:, slot * m:(slot + 1) * m])
                for _, piece in new_pieces[level]:
                    for lst, a in zip(parts, piece[kind]):
                        lst.append(a)
                empty = self._empty_canonical(kind)
                arrs = [np.concatenate(p, axis=1) if p else e for p, e in zip(parts, empty)]
                tier.codes[kind], tier.scale[kind], tier.zero[kind] = self._to_graph(kind, *arrs, tier.bits)
            tier.blocks = [b for _, b in keep] + [b for b, _ in new_pieces[level]]
        self._evicted_tokens += int(((target == 3) & (old != 3)).sum()) * bl
        self._levels = target.astype(np.int8)
        # compact L0: keep sinks, recent tokens and blocks still at level 0
        lv = np.where(blk >= 0, self._levels[np.maximum(blk, 0)], 0)
        keep_idx = np.nonzero(lv == 0)[0]
        k = keep_idx.size
        if k != n0:
            for kind in kinds:
                self._l0[kind][:k] = self._l0[kind][keep_idx]
            self._acc0[:k] = self._acc0[keep_idx]
            self._l0_tok[:k] = self._l0_tok[keep_idx]
            self._n0 = k
            want = k + c.recent_window + 2 * bl
            if self._cap > 2 * want:
                self._alloc_l0(want)
        self._q_tok = np.concatenate(
            [np.arange(c.sink_tokens + b * bl, c.sink_tokens + (b + 1) * bl) for t in (1, 2) for b in self._tiers[t].blocks]
            or [np.zeros(0, np.int64)]).astype(np.int64)
        self._acc_q = np.zeros(self._q_tok.size, np.float32)
        self._refresh_tier_inputs()

    def _refresh_tier_inputs(self) -> None:
        d: dict[str, object] = {}
        for level, tier in self._tiers.items():
            if level not in self.config.levels:
                continue
            for kind in ("key", "value"):
                qn, sn, zn = input_names(level, kind)
                d[qn], d[sn], d[zn] = tier.codes[kind], tier.scale[kind], tier.zero[kind]
        self._tier_inputs = d

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
