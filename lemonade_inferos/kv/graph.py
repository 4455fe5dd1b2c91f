"""``model_tiered.onnx``: the decoder reading a tiered quantized KV cache, dequantized in-graph.

Built with :func:`lemonade_inferos.model.export.build_decoder` and :class:`TieredKVAdapter`
(no transformer code here). Batch size 1. Notation: L layers, KV kv heads, D head_dim,
E = KV * D (channel ``e = head*D + d``), N0/N1/N2 tokens held at L0/L1/L2, C >= N0 the
L0 capacity, P = C + N1 + N2 key positions presented, S new tokens, T = P + S, g the group size of a kind
(``GraphLayout.key_group`` / ``value_group``). Tier decisions are shared by all layers
and heads, so every tier stacks the layers.

Inputs (besides ``input_ids``, ``attention_mask`` int64 ``[1, T]``: 0 for the spare L0
columns, else 1, ``position_ids`` int64 ``[1, S]`` logical positions):

=====================  ========  =====================  ==================================
name                   dtype     shape                  meaning
=====================  ========  =====================  ==================================
kv.l0                  float16   [2L, E, C]             L0 tokens, channel-major: keys of
                                                        layers 0..L-1 then values; token
                                                        j < N0 in column j, columns
                                                        N0..C-1 spare capacity (masked by
                                                        attention_mask), 2 bytes/element
kv.l2.codes            uint8     [L, E, N2]             INT4 codes, channel-major (tokens
                                                        innermost): low nibble = key code,
                                                        high nibble = value code of the
                                                        same (layer, channel, token);
                                                        1 byte per K+V pair of elements
kv.l{1,2}.{kind}_scale float16   [L*E*N/g]              per-channel groups (KIVI keys):
                                                        rows of g consecutive tokens of
                                                        one channel, order (l, e, n/g)
                                 or [L, E/g, N]         per-token groups of g consecutive
                                                        channels
kv.l2.zero             uint8     [L*E*N2/g]             uint4 zero points when key_group ==
                                                        value_group: low nibble key zero
                                                        i, high nibble value zero i (both
                                                        kinds in their scale's flat order)
kv.l2.{kind}_zero      uint8     [L, m/2]               otherwise, per kind: the m zero
                                                        points of a layer (scale order)
                                                        split-half packed: byte j holds
                                                        zero j (low) and j + m/2 (high)
kv.l1.{kind}           uint8     [L, E, N1]             INT8 codes, channel-major
kv.l1.{kind}_zero      uint8     as the scale           INT8 zero points
=====================  ========  =====================  ==================================

(``kind`` is ``key`` or ``value``.) Which grouping a kind uses is
:meth:`GraphLayout.grouping`; the store writes exactly these layouts. For models with
``kv_heads*head_dim >= 128`` (:func:`split_before_dequant`) the graph splits the unpacked
uint8 codes and the metadata into layers and dequantizes per layer (no float32 Split).

In-graph: past keys *and* values are channel-major ``[1, E, P]`` per layer
(``keys_transposed`` / ``values_transposed`` of the adapter protocol), which is the
layout the score MatMul reads (K^T) and lets every tier dequantize with onnxruntime's
fast uint8 ``DequantizeLinear`` paths without any float32 Transpose:

* L0: ``Cast`` to float32, ``Split`` into the 2L layer/kind slices (no Transpose: the
  store appends a token as one column);
* L1/L2: ``Cast`` the float16 scales to float32; for L2 the nibbles of the
  shared code bytes: a uint8 ``DequantizeLinear`` + ``QuantizeLinear`` pair that yields the
  value codes ``byte >> 4`` exactly and ``byte - 16*(byte >> 4)`` for the key codes
  (uint8 ``Mul``/``Sub``: 2x faster than ``BitwiseAnd``/``BitShift``, which onnxruntime
  runs as scalar loops; see ``TieredKVAdapter._nibbles``); ``BitwiseAnd`` / ``BitShift``
  for paired zero points; then
  per kind one uint8 ``DequantizeLinear`` to float32: per-axis over ``[rows, g]`` for
  per-channel groups, blocked on axis 1 (block g) of ``[L, E, N]`` for per-token groups
  (a uint4, float16-scale or innermost-axis blocked ``DequantizeLinear`` is 5-40x slower
  on CPU); stacked tiers are ``Split`` into layers (before dequantizing for wide models);
* the decoder's ``Concat(past, new)`` takes the tiers directly:
  ``Concat(l0_i, l1_i, l2_i, new_i)`` on the token axis (nested Concats are flattened
  after building, so the float32 past is written once by the dequantization and copied
  once by that Concat).

Key order does not matter for attention once RoPE is applied, so the tiers need not be in
token order. P is ``attention_mask`` length minus S.

Outputs: ``logits`` float32 ``[1, S, vocab]``; ``kv.new`` float32 ``[1, 2L*E, S]`` this
step's keys (after RoPE) and values in the L0 layout (``[2L, E, S]``: keys of layers
0..L-1, then values; S columns); ``kv.attn_mass`` float32 ``[T]`` attention probability per key position (graph
order: L0 columns, L1, L2, new) summed over layers, query heads and the S queries (H2O
importance); each layer reduces its probabilities to ``[T]`` inside the layer (a
``ReduceSum`` over heads and queries next to its softmax), then the L vectors are added,
so a prefill holds at most one layer's ``[H, S, T]`` probabilities at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from ..model.export import GraphBuilder, build_decoder

FLOAT16 = TensorProto.FLOAT16
FLOAT = TensorProto.FLOAT
UINT8 = TensorProto.UINT8

TIERED_FILE = "model_tiered.onnx"
L0 = "kv.l0"
#: model metadata key holding "L,KV,D" of a tiered graph (read by ensure_graph).
DIMS_KEY = "inferos.kv_dims"
L2_CODES = "kv.l2.codes"
L2_ZERO = "kv.l2.zero"
NEW_KV = "kv.new"
ATTN_MASS = "kv.attn_mass"
#: bits per code of the quantized levels.
LEVEL_BITS = {1: 8, 2: 4}
KINDS = ("key", "value")
#: node-name prefix of everything :meth:`TieredKVAdapter.declare_inputs` builds (the part
#: :func:`ensure_graph` swaps for another layout).
_IN = "kv/in"


def input_names(level: int, kind: str) -> tuple[str, str, str]:
    """(codes, scale, zero) input names of a quantized tier (level 1 or 2) for key/value
    (level 2 with :meth:`GraphLayout.paired_zero`: both kinds share ``kv.l2.codes`` and
    ``kv.l2.zero``; level 2 codes are always shared)."""
    p = f"kv.l{level}.{kind}"
    if level == 2:
        return L2_CODES, p + "_scale", p + "_zero"
    return p, p + "_scale", p + "_zero"


def l0_name(kind: str | None = None) -> str:
    """The L0 input (one for both kinds: ``kv.l0``)."""
    return L0


def _tier_out(kind: str, level: int) -> str:
    return f"{_IN}/{kind}/l{level}"


def split_before_dequant(kv_heads: int, head_dim: int) -> bool:
    """Whether a model's tiered graph splits the quantized tiers into layers before
    dequantizing (uint8 codes and small metadata are copied, ~2 extra nodes per layer and
    kind) rather than after (one float32 Split copy of each dequantized tier). Before when
    ``kv_heads*head_dim >= 128``, where the float32 copy costs more than the nodes."""
    return kv_heads * head_dim >= 128


@dataclass
class GraphLayout:
    """The group sizes baked into a tiered graph.

    Attributes:
        key_axis: ``"channel"`` (KIVI: per-channel groups of ``key_group`` tokens) or
            ``"token"`` (per-token groups of ``key_group`` channels, llama.cpp-like).
        key_group: tokens per key group (channel) or channels per key group (token).
        value_group: channels per value group (values are always per-token).
        levels: the quantized tiers the graph reads: ``(2,)`` (INT4 only, what the
            ``default`` preset uses), ``(1,)``, ``(1, 2)`` or ``()``; inputs of absent
            tiers do not exist (every tier costs nodes per run even when empty).
    """

    key_axis: str = "channel"
    key_group: int = 32
    value_group: int = 32
    levels: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        self.levels = tuple(sorted(set(int(v) for v in self.levels)))
        if not set(self.levels) <= {1, 2}:
            raise ValueError(f"levels must be a subset of (1, 2), got {self.levels}")
        if self.key_axis not in ("channel", "token"):
            raise ValueError(f"key_axis must be 'channel' or 'token', got {self.key_axis!r}")
        if self.key_group < 1 or self.value_group < 1:
            raise ValueError("key_group and value_group must be >= 1")

    def grouping(self, kind: str, head_dim: int | None = None) -> tuple[str, int]:
        """``(mode, g)`` of ``kind``: mode ``"channel"`` (groups of g consecutive tokens of
        one channel: rows of the ``[L, E, N]`` codes) or ``"token"`` (per-token groups of
        g consecutive channels ``e = head*D + d``: blocks along axis 1 of ``[L, E, N]``)."""
        if kind == "key" and self.key_axis == "channel":
            return "channel", self.key_group
        return "token", (self.key_group if kind == "key" else self.value_group)

    def paired_zero(self) -> bool:
        """True when key and value tiers have as many groups (the INT4 zero points of
        both kinds then share bytes, key low nibble / value high nibble)."""
        return self.key_group == self.value_group

    def check(self, kv_heads: int, head_dim: int) -> None:
        """Raises ValueError if a group does not fit the model's heads (a per-token group
        lies inside one head or spans whole heads)."""
        E = kv_heads * head_dim
        for kind in KINDS:
            mode, g = self.grouping(kind)
            if mode == "token" and not ((g <= head_dim and head_dim % g == 0)
                                        or (g % head_dim == 0 and E % g == 0)):
                raise ValueError(f"{kind} group {g} must divide head_dim {head_dim} or be a "
                                 f"multiple of it dividing kv_heads*head_dim = {E}")

    def file_name(self) -> str:
        """``model_tiered.onnx`` for the default layout, else a tagged variant."""
        if self == GraphLayout():
            return TIERED_FILE
        lv = "".join(str(v) for v in self.levels) or "0"
        return f"model_tiered.k{self.key_axis[0]}{self.key_group}v{self.value_group}l{lv}.onnx"


@dataclass
class TieredKVAdapter:
    """:class:`~lemonade_inferos.model.export.KVGraphAdapter` for the tiered store (batch 1).

    Past keys *and* values are presented channel-major ``[1, KV, D, P]``
    (``keys_transposed``): the score MatMul reads K^T directly and the context is computed
    as ``V^T @ probs^T``, so no float32 Transpose of the past is made per layer.
    """

    layout: GraphLayout = field(default_factory=GraphLayout)
    keys_transposed: bool = field(default=True, init=False)
    values_transposed: bool = field(default=True, init=False)
    _past: dict[str, list[list[str]]] = field(default_factory=dict, init=False, repr=False)
    _rows: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    _probs: list[str] = field(default_factory=list, init=False, repr=False)
    _past_len: str = field(default="", init=False, repr=False)
    _nib: tuple = field(default=(), init=False, repr=False)
    _dep_idx: str = field(default="", init=False, repr=False)

    def declare_inputs(self, b: GraphBuilder) -> None:
        c = b.config
        L, KV, D = c.n_layers, c.n_kv_heads, c.head_size
        E = KV * D
        lay = self.layout
        lay.check(KV, D)
        self._past, self._rows, self._probs, self._dep_idx = {}, {k: [] for k in KINDS}, [], ""
        i64 = b.const_i64
        self._nib = (b.initializer("kv_nibble_mask", np.array(15, np.uint8)),
                     b.initializer("kv_nibble_shift", np.array(4, np.uint8)))
        # L0: [2L, E, C] float16 -> float32 -> K^T / V^T [1, E, C] per layer
        x = b.node("Cast", [b.add_input(L0, FLOAT16, [2 * L, E, "kv_l0_len"])], f"{_IN}/l0_f32", to=FLOAT)
        l0 = b.node("Split", [x, i64([1] * (2 * L), "kv_split_l0")], f"{_IN}/kv/l0",
                    num_outputs=2 * L, axis=0)
        l0 = l0 if isinstance(l0, list) else [l0]
        tiers: dict[str, list[list[str]]] = {"key": [l0[:L]], "value": [l0[L:]]}
        split_first = split_before_dequant(KV, D)
        for level in lay.levels:
            x = self._tier(b, level, L, E, split_first)
            for kind in KINDS:
                if split_first:  # already one float32 [1, E, N] per layer
                    tiers[kind].append(x[kind])
                    continue
                o = b.node("Split", [x[kind], i64([1] * L, "kv_split_layers")], _tier_out(kind, level),
                           num_outputs=L, axis=0)
                tiers[kind].append(o if isinstance(o, list) else [o])
        for kind in KINDS:
            self._past[kind] = [[t[i] for t in tiers[kind]] for i in range(L)]
        mlen = b.node("Shape", ["attention_mask"], f"{_IN}/total_len", start=1, end=2)
        slen = b.node("Shape", ["input_ids"], f"{_IN}/new_len", start=1, end=2)
        self._past_len = b.node("Sub", [mlen, slen], f"{_IN}/past_len_1d")

    def _tier(self, b: GraphBuilder, level: int, L: int, E: int, split_first: bool) -> dict[str, object]:
        """Dequantize one quantized tier: float32 ``[L, E, N]`` per kind, or with
        ``split_first`` a list of L ``[1, E, N]`` per kind (codes, scales and zero points
        are split into layers before the per-layer ``DequantizeLinear``: uint8/metadata
        copies instead of a float32 Split of the result)."""
        lay, i64 = self.layout, b.const_i64
        p = f"{_IN}/l{level}"
        n = f"kv_l{level}_len"
        codes: dict[str, str] = {}
        zeros: dict[str, str] = {}

        sizes: dict[str, str] = {}

        def layers(x: str, hint: str, flat: bool) -> list[str]:
            """L equal parts along axis 0 (a flat array may be empty: explicit sizes)."""
            if flat:
                if "flat" not in sizes:  # [m/L] * L from the (flat, layer-major) key scale
                    per = b.node("Div", [b.node("Shape", [s_key], f"{p}/meta_len"),
                                         i64([L], "kv_n_layers")], f"{p}/meta_per_layer")
                    sizes["flat"] = b.node("Expand", [per, i64([L], "kv_n_layers")], f"{p}/meta_sizes")
                sp = sizes["flat"]
            else:
                sp = i64([1] * L, "kv_split_layers")
            o = b.node("Split", [x, sp], hint, num_outputs=L, axis=0)
            return o if isinstance(o, list) else [o]

        if level == 2:  # K codes in the low nibble, V codes in the high nibble
            codes = self._nibbles(b, b.add_input(L2_CODES, UINT8, [L, E, n]), f"{p}/codes", fast=True)
            if lay.paired_zero():
                zeros = self._nibbles(b, b.add_input(L2_ZERO, UINT8, ["kv_l2_groups"]), f"{p}/zero")
        out: dict[str, object] = {}
        for kind in KINDS:
            mode, g = lay.grouping(kind)
            qn, sn, zn = input_names(level, kind)
            pk = f"{p}/{kind}"
            meta = [f"kv_l{level}_{kind}_groups"] if mode == "channel" else [L, E // g, n]
            s = b.node("Cast", [b.add_input(sn, FLOAT16, meta)], f"{pk}/scale_f32", to=FLOAT)
            if kind == "key":
                s_key = s
            if level == 1:
                q = b.add_input(qn, UINT8, [L, E, n])
                z = b.add_input(zn, UINT8, meta)
            else:
                q = codes[kind]
                if zeros:
                    z = zeros[kind]
                else:  # uint4 zero points of this kind, split-half packed per layer
                    zp = self._nibbles(b, b.add_input(zn, UINT8, [L, f"kv_l2_{kind}_zero_bytes"]), f"{pk}/zero")
                    z = b.node("Concat", [zp["key"], zp["value"]], f"{pk}/zero_u8", axis=1)
                    if mode == "channel":
                        z = b.node("Reshape", [z, i64([-1], "kv_flat")], f"{pk}/zero_flat")
                if mode == "token":
                    z = b.node("Reshape", [z, i64([L, E // g, -1], f"kv_meta{g}")], f"{pk}/zero_3d")
            if not split_first:
                if mode == "channel":  # per-axis over rows of g tokens (onnxruntime fast path)
                    q = b.node("Reshape", [q, i64([-1, g], f"kv_rows{g}")], f"{pk}/codes_rows")
                    x = b.node("DequantizeLinear", [q, s, z], f"{pk}/dq", axis=0)
                    out[kind] = b.node("Reshape", [x, i64([L, E, -1], "kv_len")], f"{pk}/len")
                else:  # blocked along channels (axis 1, not innermost: fast path)
                    out[kind] = b.node("DequantizeLinear", [q, s, z], f"{pk}/dq", axis=1, block_size=g)
                continue
            flat = mode == "channel"  # only per-channel keys have flat metadata
            qs, ss, zs = layers(q, f"{pk}/codes_l", False), layers(s, f"{pk}/scale_l", flat), layers(z, f"{pk}/zero_l", flat)
            res = []
            for i in range(L):
                if mode == "channel":
                    qi = b.node("Reshape", [qs[i], i64([-1, g], f"kv_rows{g}")], f"{pk}/codes_rows_{i}")
                    x = b.node("DequantizeLinear", [qi, ss[i], zs[i]], f"{pk}/dq_{i}", axis=0)
                    res.append(b.node("Reshape", [x, i64([1, E, -1], "kv_len1")], f"{pk}/len_{i}"))
                else:
                    res.append(b.node("DequantizeLinear", [qs[i], ss[i], zs[i]], f"{pk}/dq_{i}",
                                      axis=1, block_size=g))
            out[kind] = res
        return out

    def _nibbles(self, b: GraphBuilder, packed: str, hint: str, fast: bool = False) -> dict[str, str]:
        """low nibble -> key, high nibble -> value (uint8, shape of ``packed``).

        With ``fast`` (the code bytes) the high nibble is
        ``QuantizeLinear(DequantizeLinear(byte, (1 - 2^-10)/16, 7), 1, 0)``: ``(byte - 7)/16``
        scaled down by 2^-10 lies strictly within 0.5 of ``byte >> 4`` for every byte
        (low nibble 0 -> -7/16, 15 -> just below +1/2; negatives saturate to 0), so the
        rounding gives the high nibble exactly; the low nibble is then
        ``byte - 16 * high`` (uint8 ``Mul`` and ``Sub``, no wrap-around: ``16*high <= byte``).
        All four are onnxruntime's vectorized uint8 paths: measured on 66 560 bytes
        (stories260K at 448 tokens, one thread) 13.6 us for both nibbles against 31.6 us for
        ``BitwiseAnd`` + the high nibble (``BitwiseAnd`` and ``BitShift`` on uint8 are
        scalar loops, ~22 us each). Small arrays (zero points) keep ``BitwiseAnd`` /
        ``BitShift``, one node each."""
        if not fast:
            return {"key": b.node("BitwiseAnd", [packed, self._nib[0]], f"{hint}_key"),
                    "value": b.node("BitShift", [packed, self._nib[1]], f"{hint}_value", direction="RIGHT")}
        if len(self._nib) == 2:
            self._nib = self._nib + (
                b.initializer("kv_nibble_hi_scale", np.array((1 - 2.0 ** -10) / 16, np.float32)),
                b.initializer("kv_nibble_hi_zero", np.array(7, np.uint8)),
                b.initializer("kv_nibble_one", np.array(1, np.float32)),
                b.initializer("kv_nibble_zero", np.array(0, np.uint8)),
                b.initializer("kv_nibble_sixteen", np.array(16, np.uint8)))
        _, _, s, z, one, z0, sixteen = self._nib
        f = b.node("DequantizeLinear", [packed, s, z], f"{hint}_value_f")
        high = b.node("QuantizeLinear", [f, one, z0], f"{hint}_value")
        high16 = b.node("Mul", [high, sixteen], f"{hint}_value_x16")
        return {"key": b.node("Sub", [packed, high16], f"{hint}_key"), "value": high}

    def past_kv(self, b: GraphBuilder, layer: int) -> tuple[str, str]:
        # [1, E, P] each; flattened into the decoder's Concat(past, new) by _flatten_concats
        keys = list(self._past["key"][layer])
        if layer > 0 and len(self._probs) == layer:
            # an empty [1, E, 0] Gather of the previous layer's attention mass joins this
            # layer's key Concat: a data dependency (no copy) that makes onnxruntime run that
            # layer's ReduceSum before this layer's attention, so its [.., S, T]
            # probabilities are freed (its default order would otherwise run all the
            # ReduceSums after the last layer and keep every layer's probabilities alive)
            if not self._dep_idx:
                E = b.config.n_kv_heads * b.config.head_size
                self._dep_idx = b.initializer("kv_mass_dep_idx", np.zeros((1, E, 0), np.int64))
            keys.append(b.node("Gather", [self._probs[layer - 1], self._dep_idx], f"kv/mass_dep_{layer}", axis=0))
        return (b.node("Concat", keys, f"{_IN}/past_key_{layer}", axis=2),
                b.node("Concat", self._past["value"][layer], f"{_IN}/past_value_{layer}", axis=2))

    def past_length(self, b: GraphBuilder) -> str:
        return self._past_len

    def emit_outputs(self, b: GraphBuilder, layer: int, k_new: str, v_new: str,
                     k_all: str, v_all: str, attn_probs: str) -> None:
        c = b.config
        self._rows["key"].append(k_new)  # [1, E, S] (keys_transposed / values_transposed)
        self._rows["value"].append(v_new)
        # use the [B, KV, G, S, T] softmax output feeding the [B, H, S, T] Reshape when present
        src = attn_probs
        for n in b.nodes:
            if attn_probs in n.output and n.op_type == "Reshape":
                src = n.input[0]
        # reduce this layer's probabilities to a per-key vector [T] right away (over batch,
        # heads and queries), so no layer's [.., S, T] probabilities outlive the layer
        # (summing the full tensors at the end kept every layer's copy alive at prefill)
        rank = 5 if src != attn_probs else 4
        self._probs.append(b.node("ReduceSum", [src, b.const_i64(list(range(rank - 1)), f"mass_axes{rank}")],
                                  f"kv/mass_{layer}", keepdims=0))
        if layer != c.n_layers - 1:
            return
        # [1, 2L*E, S] == [2L, E, S]: the channel-major L0 layout (S new columns)
        new = b.node("Concat", self._rows["key"] + self._rows["value"], "kv_new_tmp", axis=1)
        b.add_output(b.rename(new, NEW_KV), FLOAT, [1, 2 * c.n_layers * c.n_kv_heads * c.head_size, "sequence_length"])
        mass = b.node("Sum", self._probs, "kv_mass_tmp") if len(self._probs) > 1 else self._probs[0]
        b.add_output(b.rename(mass, ATTN_MASS), FLOAT, ["total_sequence_length"])


def _flatten_concats(graph: onnx.GraphProto) -> None:
    """``Concat(Concat(a, b, ..), x)`` -> ``Concat(a, b, .., x)`` when the inner Concat has
    the same axis and no other consumer (one float32 copy instead of two)."""
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in graph.output}

    def axis(n):
        return next(a.i for a in n.attribute if a.name == "axis")

    drop = set()
    for n in graph.node:
        if n.op_type != "Concat":
            continue
        new_inputs, changed = [], False
        for i in n.input:
            m = producer.get(i)
            if (m is not None and m.op_type == "Concat" and axis(m) == axis(n) and uses.get(i) == 1
                    and i not in outputs):
                new_inputs.extend(m.input)
                drop.add(id(m))
                changed = True
            else:
                new_inputs.append(i)
        if changed:
            del n.input[:]
            n.input.extend(new_inputs)
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)


def build_tiered_decoder(weights, layout: GraphLayout | None = None, **kw) -> onnx.ModelProto:
    """The tiered decoder ``ModelProto`` for ``weights`` (:class:`DecoderWeights`; see module docstring)."""
    check = kw.pop("check", True)
    m = build_decoder(weights, TieredKVAdapter(layout or GraphLayout()), name="decoder_tiered",
                      check=False, **kw)
    _flatten_concats(m.graph)
    c = (layout or GraphLayout(), weights.config)
    onnx.helper.set_model_props(m, {DIMS_KEY: f"{c[1].n_layers},{c[1].n_kv_heads},{c[1].head_size}"})
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


def write_tiered_graph(weights_or_checkpoint, out_dir: str | Path,
                       layouts: list[GraphLayout] | None = None,
                       transform: "Callable[[onnx.ModelProto], onnx.ModelProto] | None" = None,
                       fold_norms: bool = True) -> list[Path]:
    """Write ``model_tiered.onnx`` (and the baseline-scheme variants) into ``out_dir``.

    The converter calls ``write_tiered_graph(weights, folder)`` after writing
    ``model.onnx``. Variants needed by :func:`lemonade_inferos.kv.store.store_for_scheme`
    are derived from ``model_tiered.onnx`` on first use (:func:`ensure_graph`), so they
    need not be written here.

    Args:
        weights_or_checkpoint: :class:`~lemonade_inferos.model.llama2c.Llama2cWeights` or
            the path of a llama2.c ``.bin`` checkpoint.
        out_dir: the model folder (must exist).
        layouts: graph layouts to write; default ``[GraphLayout()]``.
        transform: applied to each built graph before saving (e.g. the converter's weight
            precision, :func:`lemonade_inferos.model.precision.apply_weight_precision`).

    Returns:
        paths written.

    Raises:
        FileNotFoundError: ``out_dir`` or the checkpoint does not exist.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"model folder {out} does not exist")
    w = weights_or_checkpoint
    if isinstance(w, (str, Path)):
        from ..model.llama2c import load_llama2c

        w = load_llama2c(w)
    paths = []
    for lay in layouts or [GraphLayout()]:
        p = out / lay.file_name()
        tmp = p.with_suffix(".onnx.tmp")
        m = build_tiered_decoder(w, lay, fold_norms=fold_norms)
        if transform is not None:
            m = transform(m)
        _save(m, tmp)
        tmp.replace(p)
        paths.append(p)
    return paths


def _dims(m: onnx.ModelProto) -> tuple[int, int, int]:
    """(L, KV, D) of a tiered graph, from its metadata."""
    for p in m.metadata_props:
        if p.key == DIMS_KEY:
            L, KV, D = (int(x) for x in p.value.split(","))
            return L, KV, D
    raise ValueError("tiered graph of an older converter (no kv dims metadata); re-convert the model")


def ensure_graph(folder: str | Path, layout: GraphLayout) -> Path:
    """Path of the tiered graph for ``layout`` in ``folder``; a missing variant is derived
    from ``model_tiered.onnx`` by rebuilding only the adapter's input stage (the nodes
    named ``kv/in/...``) and cached next to it.

    Raises:
        FileNotFoundError: ``folder`` has no ``model_tiered.onnx``.
        ValueError: the layout's groups do not fit the model's heads, or the base graph
            is of an older converter.
    """
    folder = Path(folder)
    p = folder / layout.file_name()
    if p.is_file():
        return p
    base = folder / TIERED_FILE
    if not base.is_file():
        raise FileNotFoundError(f"{folder} has no {TIERED_FILE}")
    m = onnx.load(str(base))
    L, KV, D = _dims(m)
    g = m.graph
    stage = [n for n in g.node if n.name.startswith(f"/{_IN}/")]
    stage_out = {o for n in stage for o in n.output}
    keep = [n for n in g.node if not n.name.startswith(f"/{_IN}/")]
    used = {x for n in keep for x in n.input}
    b = GraphBuilder(SimpleNamespace(n_layers=L, n_kv_heads=KV, head_size=D), "adapter")
    b._names.update(n.name for n in keep)
    b._names.update(o for n in keep for o in n.output)
    b._names.update(t.name for t in g.initializer if t.name in used)
    b._names.update(i.name for i in g.input if not i.name.startswith("kv."))
    ad = TieredKVAdapter(layout)
    ad.declare_inputs(b)
    concat_out = re.compile(r"^layers\.(\d+)/(k|v)_all")
    for n in keep:  # the decoder's Concat(past tiers..., new): swap in the new tiers
        if n.op_type != "Concat" or not any(x in stage_out for x in n.input):
            continue
        hit = concat_out.match(n.output[0])
        if hit is None:  # e.g. past_len: the rebuilt stage gives it the same name
            continue
        kind, layer = ("key" if hit.group(2) == "k" else "value"), int(hit.group(1))
        rest = [x for x in n.input if x not in stage_out]
        del n.input[:]
        n.input.extend(ad._past[kind][layer] + rest)
    del g.node[:]
    g.node.extend(b.nodes + keep)  # the adapter stage only reads graph inputs
    inputs = [i for i in g.input if not i.name.startswith("kv.")]
    pos = [k for k, i in enumerate(g.input) if i.name.startswith("kv.")][0]
    del g.input[:]
    g.input.extend(inputs[:pos] + b.inputs + inputs[pos:])
    inits = [t for t in g.initializer if t.name in used] + b.initializers
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.checker.check_model(m, full_check=True)
    tmp = p.with_suffix(".onnx.tmp")
    _save(m, tmp)
    tmp.replace(p)
    return p


def _save(m: onnx.ModelProto, path: Path) -> None:
    from ..model.export import save_model

    save_model(m, path)


__all__ = [
    "ATTN_MASS", "L0", "L2_CODES", "L2_ZERO", "LEVEL_BITS", "NEW_KV", "TIERED_FILE", "GraphLayout",
    "TieredKVAdapter", "build_tiered_decoder", "ensure_graph", "input_names", "l0_name",
    "split_before_dequant", "write_tiered_graph",
]
