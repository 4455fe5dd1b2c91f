"""``model_tiered.onnx``: the decoder reading a tiered quantized KV cache, dequantized in-graph.

Built with :func:`lemonade_inferos.model.export.build_decoder` and :class:`TieredKVAdapter`
(no transformer code here). Batch size 1. Notation: L layers, KV kv heads, D head_dim,
E = KV * D, N0/N1/N2 tokens held at L0/L1/L2, P = N0 + N1 + N2, S new tokens, T = P + S.
Tier decisions are shared by all layers and heads, so every tier stacks the layers.

Inputs (besides ``input_ids``, ``attention_mask`` int64 ``[1, T]`` all ones,
``position_ids`` int64 ``[1, S]`` logical positions):

=====================  ========  ==================  =====================================
name                   dtype     shape               meaning
=====================  ========  ==================  =====================================
kv.l0.key / .value     float16   [N0, L, E]          L0 tokens, token-major (so appending
                                                     a token is one contiguous row)
kv.l1.key / .value     uint8     [L, N1, E]          INT8 codes
kv.l1.key_scale        float16   [L, N1/kg, E]       per-channel keys, groups of kg tokens
                                 or [L, N1, E/kg]    (per-token keys, ``key_axis="token"``)
kv.l1.key_zero         uint8     as key_scale
kv.l1.value_scale      float16   [L, N1, E/vg]       per-token values, groups of vg channels
kv.l1.value_zero       uint8     as value_scale
kv.l2.*                uint4     as kv.l1.* (codes and zero points two per byte; scales fp16)
=====================  ========  ==================  =====================================

In-graph, per K and V: ``Transpose`` the L0 rows to ``[L, N0, E]``, ``DequantizeLinear``
(opset 21, blocked, fp16 scales -> fp16) each quantized tier, ``Concat`` the tiers on the
token axis, ``Cast`` to float32, ``Reshape``/``Transpose`` to ``[L, KV, P, D]``, ``Split``
into the per-layer past the builder concatenates with the step's K/V. Key order does not
matter for attention once RoPE is applied, so the tiers need not be in token order. That is
8 nodes per K/V and 3 for the outputs, whatever the number of layers.

Outputs: ``logits`` float32 ``[1, S, vocab]``; ``kv.new`` float32 ``[2L, KV, S, D]`` this
step's keys (rows 0..L-1, after RoPE) and values (rows L..2L-1) only; ``kv.attn_mass``
float32 ``[T]`` attention probability per key position (graph order: L0 rows, L1, L2, new)
summed over layers, query heads and the S queries (H2O importance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..model.export import GraphBuilder, build_decoder

FLOAT16 = TensorProto.FLOAT16
FLOAT = TensorProto.FLOAT
UINT8 = TensorProto.UINT8
UINT4 = TensorProto.UINT4

TIERED_FILE = "model_tiered.onnx"
NEW_KV = "kv.new"
ATTN_MASS = "kv.attn_mass"
TIER_DTYPES = {1: UINT8, 2: UINT4}
KINDS = ("key", "value")


def input_names(level: int, kind: str) -> tuple[str, str, str]:
    """(codes, scale, zero) input names of a quantized tier (level 1 or 2) for key/value."""
    p = f"kv.l{level}.{kind}"
    return p, p + "_scale", p + "_zero"


def l0_name(kind: str) -> str:
    return f"kv.l0.{kind}"


@dataclass
class GraphLayout:
    """The block sizes baked into a tiered graph (``DequantizeLinear`` attributes).

    Attributes:
        key_axis: ``"channel"`` (KIVI: per-channel groups along tokens, blocked axis 1) or
            ``"token"`` (groups along channels, blocked axis 2, llama.cpp-like).
        key_group: tokens per key group (channel) or channels per key group (token).
        value_group: channels per value group (values are always per-token).
    """

    key_axis: str = "channel"
    key_group: int = 32
    value_group: int = 32

    def __post_init__(self) -> None:
        if self.key_axis not in ("channel", "token"):
            raise ValueError(f"key_axis must be 'channel' or 'token', got {self.key_axis!r}")
        if self.key_group < 1 or self.value_group < 1:
            raise ValueError("key_group and value_group must be >= 1")

    def dq(self, kind: str) -> tuple[int, int]:
        """(axis, block_size) of the DequantizeLinear over ``[L, N, E]`` codes."""
        if kind == "key" and self.key_axis == "channel":
            return 1, self.key_group
        return 2, (self.key_group if kind == "key" else self.value_group)

    def file_name(self) -> str:
        """``model_tiered.onnx`` for the default layout, else a tagged variant."""
        if self == GraphLayout():
            return TIERED_FILE
        return f"model_tiered.k{self.key_axis[0]}{self.key_group}v{self.value_group}.onnx"


@dataclass
class TieredKVAdapter:
    """:class:`~lemonade_inferos.model.export.KVGraphAdapter` for the tiered store (batch 1)."""

    layout: GraphLayout = field(default_factory=GraphLayout)
    _past: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    _new: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    _probs: list[str] = field(default_factory=list, init=False, repr=False)
    _past_len: str = field(default="", init=False, repr=False)

    def declare_inputs(self, b: GraphBuilder) -> None:
        c = b.config
        L, KV, D = c.n_layers, c.n_kv_heads, c.head_size
        E = KV * D
        for kind in KINDS:
            axis, block = self.layout.dq(kind)
            if E % (block if axis == 2 else 1):
                raise ValueError(f"{kind} group {block} does not divide kv_heads*head_dim = {E}")
        self._past, self._new, self._probs = {}, {k: [] for k in KINDS}, []
        for kind in KINDS:
            l0 = b.add_input(l0_name(kind), FLOAT16, ["kv_l0_len", L, E])
            parts = [b.node("Transpose", [l0], f"kv/l0/{kind}_lne", perm=[1, 0, 2])]
            axis, block = self.layout.dq(kind)
            for level, dt in TIER_DTYPES.items():
                qn, sn, zn = input_names(level, kind)
                n = f"kv_l{level}_len"
                meta = [L, f"kv_l{level}_groups" if axis == 1 else n,
                        E if axis == 1 else E // block]
                b.add_input(qn, dt, [L, n, E])
                b.add_input(sn, FLOAT16, meta)
                b.add_input(zn, dt, meta)
                parts.append(b.node("DequantizeLinear", [qn, sn, zn], f"kv/l{level}/{kind}_dq",
                                    axis=axis, block_size=block))
            cat = b.node("Concat", parts, f"kv/{kind}_lpe16", axis=1)  # [L, P, E] fp16
            if kind == "key":
                self._past_len = b.node("Shape", [cat], "past_len_1d", start=1, end=2)
            f32 = b.node("Cast", [cat], f"kv/{kind}_lpe", to=FLOAT)
            r = b.node("Reshape", [f32, b.const_i64([L, -1, KV, D], "kv_lpkd_shape")], f"kv/{kind}_lpkd")
            t = b.node("Transpose", [r], f"kv/{kind}_lkpd", perm=[0, 2, 1, 3])
            outs = b.node("Split", [t, b.const_i64([1] * L, "kv_split_layers")], f"kv/{kind}_past",
                          num_outputs=L, axis=0)
            self._past[kind] = outs if isinstance(outs, list) else [outs]

    def past_kv(self, b: GraphBuilder, layer: int) -> tuple[str, str]:
        return self._past["key"][layer], self._past["value"][layer]

    def past_length(self, b: GraphBuilder) -> str:
        return self._past_len

    def emit_outputs(self, b: GraphBuilder, layer: int, k_new: str, v_new: str,
                     k_all: str, v_all: str, attn_probs: str) -> None:
        c = b.config
        self._new["key"].append(k_new)
        self._new["value"].append(v_new)
        # use the [B, KV, G, S, T] softmax output feeding the [B, H, S, T] Reshape when present
        src = attn_probs
        for n in b.nodes:
            if attn_probs in n.output and n.op_type == "Reshape":
                src = n.input[0]
        self._probs.append(src)
        if layer != c.n_layers - 1:
            return
        new = b.node("Concat", self._new["key"] + self._new["value"], "kv_new_tmp", axis=0)
        b.add_output(b.rename(new, NEW_KV), FLOAT, [2 * c.n_layers, c.n_kv_heads, "sequence_length", c.head_size])
        total = b.node("Sum", self._probs, "kv/probs_sum") if len(self._probs) > 1 else self._probs[0]
        rank = 5 if src != attn_probs else 4
        mass = b.node("ReduceSum", [total, b.const_i64(list(range(rank - 1)), "mass_axes")],
                      "kv_mass_tmp", keepdims=0)
        b.add_output(b.rename(mass, ATTN_MASS), FLOAT, ["total_sequence_length"])


def build_tiered_decoder(weights, layout: GraphLayout | None = None, **kw) -> onnx.ModelProto:
    """The tiered decoder ``ModelProto`` for llama2.c ``weights`` (see module docstring)."""
    return build_decoder(weights, TieredKVAdapter(layout or GraphLayout()), name="llama2c_decoder_tiered", **kw)


def write_tiered_graph(weights_or_checkpoint, out_dir: str | Path,
                       layouts: list[GraphLayout] | None = None) -> list[Path]:
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
        onnx.save_model(build_tiered_decoder(w, lay), str(tmp))
        tmp.replace(p)
        paths.append(p)
    return paths


def ensure_graph(folder: str | Path, layout: GraphLayout) -> Path:
    """Path of the tiered graph for ``layout`` in ``folder``; a missing variant is derived
    from ``model_tiered.onnx`` by rewriting the ``DequantizeLinear`` axis/block_size
    attributes (the only thing that differs) and cached next to it.

    Raises:
        FileNotFoundError: ``folder`` has no ``model_tiered.onnx``.
    """
    folder = Path(folder)
    p = folder / layout.file_name()
    if p.is_file():
        return p
    base = folder / TIERED_FILE
    if not base.is_file():
        raise FileNotFoundError(f"{folder} has no {TIERED_FILE}")
    m = onnx.load(str(base))
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or not n.output[0].startswith("kv/l"):
            continue
        kind = "key" if "/key_dq" in n.output[0] else "value"
        axis, block = layout.dq(kind)
        for a in n.attribute:
            if a.name == "axis":
                a.i = axis
            elif a.name == "block_size":
                a.i = block
    for inp in m.graph.input:  # metadata dims of the rewritten tiers
        if inp.name.startswith("kv.l") and inp.name.endswith(("_scale", "_zero")):
            kind = "key" if ".key_" in inp.name else "value"
            axis, block = layout.dq(kind)
            dims = inp.type.tensor_type.shape.dim
            level = inp.name[4]
            if axis == 1:
                dims[1].dim_param, dims[2].dim_value = f"kv_l{level}_groups", dims[2].dim_value or 0
                dims[2].ClearField("dim_param")
                e = _e_from(m)
                dims[2].dim_value = e
            else:
                dims[1].dim_param = f"kv_l{level}_len"
                dims[2].dim_value = _e_from(m) // block
    tmp = p.with_suffix(".onnx.tmp")
    onnx.save_model(m, str(tmp))
    tmp.replace(p)
    return p


def _e_from(m: onnx.ModelProto) -> int:
    for inp in m.graph.input:
        if inp.name == "kv.l0.key":
            return int(inp.type.tensor_type.shape.dim[2].dim_value)
    raise ValueError("not a tiered graph: no kv.l0.key input")  # pragma: no cover


def np_dtype_size(level: int) -> float:
    """Bytes per stored code at a level (0: fp16 = 2, 1: INT8 = 1, 2: INT4 = 0.5)."""
    return {0: 2.0, 1: 1.0, 2: 0.5}[level]


__all__ = [
    "ATTN_MASS", "NEW_KV", "TIERED_FILE", "GraphLayout", "TieredKVAdapter",
    "build_tiered_decoder", "ensure_graph", "input_names", "l0_name", "write_tiered_graph",
]

_ = np  # numpy kept for callers doing dtype math alongside this module
