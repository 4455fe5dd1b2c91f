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
* L1: codes uint8 ``[L, N1, E]``; keys per-channel (KIVI) groups of ``key_group`` tokens:
  scale float16 + zero uint8 ``[L, N1/key_group, E]``; values per-token, groups of
  ``value_group`` channels spanning all KV heads of a layer: scale float16 + zero uint8
  ``[L, N1, E/value_group]``. Bytes/element = 1 + 3/group (8.75 bits at group 32).
* L2: the same with uint4 codes and uint4 zero points, two per byte (ONNX uint4 order,
  low nibble first): 0.5 + 2.5/group bytes (4.625 bits at group 32); held in
  ``OrtValue``s of ONNX type uint4 (numpy has no 4-bit type).

Configurations beyond the policy (baselines for benchmarks) are :class:`StoreConfig`\\ s;
:func:`store_for_scheme` builds the named ones (``fp16``, ``q8_0``, ``q4_0``,
``hf_quantized``, ``tiered``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..model.spec import DecoderSpec
from ..types import KVStats
from .base import KVCache
from .graph import ATTN_MASS, NEW_KV, GraphLayout, ensure_graph, input_names, l0_name
from .importance import block_mass, block_mass_mean, fallback_scores
from .quantize import pack_int4, quantize, stored_nbytes, unpack_int4
from .tiers import MODES, assign_levels

LEVEL_BITS = {1: 8, 2: 4}
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
        GraphLayout(self.key_axis, self.key_group, self.value_group)

    @property
    def layout(self) -> GraphLayout:
        return GraphLayout(self.key_axis, self.key_group, self.value_group)

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


def _ort_uint4(packed: np.ndarray, shape: list[int]):
    """An ``OrtValue`` of ONNX type uint4 and ``shape`` holding ``packed`` bytes, plus a
    uint8 numpy view of its memory (no second copy is kept)."""
    import onnxruntime as ort
    from onnx import TensorProto

    ov = ort.OrtValue.ortvalue_from_shape_and_type(shape, TensorProto.UINT4, "cpu", 0)
    n = packed.size
    if n == 0:
        return ov, np.zeros(packed.shape, np.uint8)
    view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ov.data_ptr())).reshape(packed.shape)
    view[...] = packed
    return ov, view


class _Tier:
    """One quantized tier: per-kind stacked arrays whose axis 1 is block-major.

    ``codes[kind]`` uint8 ``[L, N*E*bits/8]``, ``scale[kind]`` float16 ``[L, G]``,
    ``zero[kind]`` uint8 ``[L, G*bits/8]`` (packed for INT4); ``blocks`` the block ids in
    slot order.
    """

    def __init__(self, level: int, L: int):
        self.level, self.bits, self.L = level, LEVEL_BITS[level], L
        self.blocks: list[int] = []
        e = np.zeros((L, 0), np.uint8)
        self.codes = {k: e for k in ("key", "value")}
        self.scale = {k: np.zeros((L, 0), np.float16) for k in ("key", "value")}
        self.zero = {k: e for k in ("key", "value")}
        self.ort: dict[str, object] = {}

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
        self._tiers = {1: _Tier(1, self.L), 2: _Tier(2, self.L)}
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

    def _quantize_block(self, rows: dict[str, np.ndarray], bits: int) -> dict[str, tuple]:
        """rows[kind]: float ``[bl, L, E]`` -> packed (codes [L, x], scale [L, g], zero [L, z])."""
        c, L = self.config, self.L
        out = {}
        for kind, r in rows.items():
            x = np.ascontiguousarray(r.transpose(1, 0, 2), dtype=np.float32)  # [L, bl, E]
            if kind == "key" and c.key_axis == "channel":
                qt = quantize(x, bits, axis=1, group=c.key_group)
            elif kind == "key":
                qt = quantize(x, bits, axis=2, group=c.key_group)
            else:
                qt = quantize(x, bits, axis=2, group=c.value_group)
            codes, zero = qt.q.reshape(L, -1), qt.zero.reshape(L, -1)
            if bits == 4:
                codes = pack_int4(codes).reshape(L, -1)
                zero = pack_int4(zero).reshape(L, -1)
            out[kind] = (codes, qt.scale.reshape(L, -1), zero)
        return out

    def _dequant_block(self, tier: _Tier, slot: int) -> dict[str, np.ndarray]:
        """float32 ``[bl, L, E]`` per kind of the block in ``slot`` of ``tier``."""
        c, L, E, bl = self.config, self.L, self.E, self.config.block_len
        res = {}
        for kind in ("key", "value"):
            codes, scale, zero = tier.codes[kind], tier.scale[kind], tier.zero[kind]
            nc, ng = codes.shape[1] // max(len(tier.blocks), 1), scale.shape[1] // max(len(tier.blocks), 1)
            nz = zero.shape[1] // max(len(tier.blocks), 1)
            cq = codes[:, slot * nc:(slot + 1) * nc]
            sq = scale[:, slot * ng:(slot + 1) * ng]
            zq = zero[:, slot * nz:(slot + 1) * nz]
            if tier.bits == 4:
                cq = unpack_int4(np.ascontiguousarray(cq), L * bl * E).reshape(L, -1)
                zq = unpack_int4(np.ascontiguousarray(zq), L * ng).reshape(L, -1)
            cq = cq.reshape(L, bl, E)
            if kind == "key" and c.key_axis == "channel":
                s, z, ax, g = sq.reshape(L, bl // c.key_group, E), zq.reshape(L, bl // c.key_group, E), 1, c.key_group
            else:
                grp = c.key_group if kind == "key" else c.value_group
                s, z, ax, g = sq.reshape(L, bl, E // grp), zq.reshape(L, bl, E // grp), 2, grp
            from .quantize import dequantize

            res[kind] = dequantize(cq, s, z, axis=ax, group=g).transpose(1, 0, 2)
        return res

    def _apply(self, target: np.ndarray) -> None:
        c, bl = self.config, self.config.block_len
        old = self._levels
        n0 = self._n0
        blk = self._block_of(self._l0_tok[:n0])
        new_pieces: dict[int, list[tuple[int, dict]]] = {1: [], 2: []}
        # blocks leaving L0
        for b in np.nonzero((old == 0) & (target > 0))[0]:
            if target[b] == 3:
                continue
            sel = blk == b
            rows = {k: self._l0[k][:n0][sel] for k in ("key", "value")}
            new_pieces[int(target[b])].append((int(b), self._quantize_block(rows, LEVEL_BITS[int(target[b])])))
        # INT8 -> INT4 re-quantization
        t1 = self._tiers[1]
        for slot, b in enumerate(t1.blocks):
            if target[b] == 2:
                new_pieces[2].append((b, self._quantize_block(self._dequant_block(t1, slot), 4)))
        # rebuild the quantized tiers: kept blocks in slot order, then new ones
        for level in (1, 2):
            tier = self._tiers[level]
            nbk = max(len(tier.blocks), 1)
            keep = [(slot, b) for slot, b in enumerate(tier.blocks) if target[b] == level]
            if len(keep) == len(tier.blocks) and not new_pieces[level]:
                continue
            blocks = [b for _, b in keep] + [b for b, _ in new_pieces[level]]
            for kind in ("key", "value"):
                parts = {}
                for nm, arr in (("codes", tier.codes[kind]), ("scale", tier.scale[kind]), ("zero", tier.zero[kind])):
                    w = arr.shape[1] // nbk
                    parts[nm] = [arr[:, s * w:(s + 1) * w] for s, _ in keep]
                for _, piece in new_pieces[level]:
                    for nm, a in zip(("codes", "scale", "zero"), piece[kind]):
                        parts[nm].append(a)
                dt = {"codes": np.uint8, "scale": np.float16, "zero": np.uint8}
                for nm in ("codes", "scale", "zero"):
                    arr = np.concatenate(parts[nm], axis=1) if parts[nm] else np.zeros((self.L, 0), dt[nm])
                    getattr(tier, nm)[kind] = arr
            tier.blocks = blocks
        self._evicted_tokens += int(((target == 3) & (old != 3)).sum()) * bl
        self._levels = target.astype(np.int8)
        # compact L0: keep sinks, recent tokens and blocks still at level 0
        lv = np.where(blk >= 0, self._levels[np.maximum(blk, 0)], 0)
        keep_idx = np.nonzero(lv == 0)[0]
        k = keep_idx.size
        if k != n0:
            for kind in ("key", "value"):
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
        c, L, E = self.config, self.L, self.E
        d: dict[str, object] = {}
        for level, tier in self._tiers.items():
            N = len(tier.blocks) * c.block_len
            for kind in ("key", "value"):
                qn, sn, zn = input_names(level, kind)
                if kind == "key" and c.key_axis == "channel":
                    meta = [L, N // c.key_group, E]
                else:
                    meta = [L, N, E // (c.key_group if kind == "key" else c.value_group)]
                if tier.bits == 8:
                    d[qn] = tier.codes[kind].reshape(L, N, E)
                    d[zn] = tier.zero[kind].reshape(meta)
                else:
                    ov, view = _ort_uint4(tier.codes[kind], [L, N, E])
                    tier.codes[kind] = view  # the OrtValue's memory is the only copy
                    d[qn] = ov
                    zv, zview = _ort_uint4(tier.zero[kind], meta)
                    tier.zero[kind] = zview
                    d[zn] = zv
                    tier.ort[kind] = (ov, zv)
                d[sn] = tier.scale[kind].reshape(meta)
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
