"""``model_tiered.onnx``: the decoder reading a tiered quantized KV cache, dequantized in-graph.

Built with :func:`lemonade_inferos.model.export.build_decoder` and :class:`TieredKVAdapter`
(no transformer code here). Batch size 1. Notation: L layers, KV kv heads, D head_dim,
E = KV * D, N0/N1/N2 tokens held at L0/L1/L2, P = N0 + N1 + N2, S new tokens, T = P + S,
g the group size of a kind (``GraphLayout.key_group`` / ``value_group``).
Tier decisions are shared by all layers and heads, so every tier stacks the layers.

Inputs (besides ``input_ids``, ``attention_mask`` int64 ``[1, T]`` all ones,
``position_ids`` int64 ``[1, S]`` logical positions):

=====================  ========  =====================  ==================================
name                   dtype     shape                  meaning
=====================  ========  =====================  ==================================
kv.l0.key / .value     float16   [N0, L, E]             L0 tokens, token-major (appending
                                                        a token is one contiguous row)
kv.l1.{kind}           uint8     [L, KV, N1, D]         INT8 codes, head-major
                                 or [L, N1, E]          (token-major: per-token groups
                                                        wider than a head, g > D)
kv.l1.{kind}_scale     float16   [L, KV, N1/g, D]       per-channel keys (KIVI), groups of
                                                        g tokens
                                 or [L, KV, N1, D/g]    per-token groups of g <= D channels
                                 or [L, N1, E/g]        per-token groups of g > D channels
                                                        (whole heads; token-major codes)
kv.l1.{kind}_zero      uint8     as the scale
kv.l2.{kind}           uint8     [n/2]                  INT4 codes, n = L*N2*E, laid out
                                                        like kv.l1.{kind}, flattened, two
                                                        per byte "split-half": byte i
                                                        holds code i (low nibble) and code
                                                        i + n/2 (high nibble)
kv.l2.{kind}_scale     float16   as kv.l1.{kind}_scale (N2 for N1)
kv.l2.{kind}_zero      uint8     [m/2]                  uint4 zero points of the m scales,
                                                        flattened, split-half like codes
=====================  ========  =====================  ==================================

(``kind`` is ``key`` or ``value``; n and m are always even because N2 is a multiple of
the even block length and D is even.) Which grouping a kind uses is
:meth:`GraphLayout.grouping`; the store writes exactly these layouts.

In-graph (per kind), everything stays stacked over layers until one ``Split`` per tier:

* L0: ``Cast`` to float32, ``Reshape``/``Transpose`` to ``[L, KV, N0, D]``;
* L1/L2: ``Cast`` the float16 scales to float32, for L2 unpack the nibbles
  (``BitwiseAnd``/``BitShift``/``Concat`` of the two halves: the split-half packing makes
  the unpacked bytes the codes in order), then one uint8 ``DequantizeLinear`` to float32:
  blocked (axis 2, ``block_size`` g) for per-channel keys, per-axis over ``[n/g, g]`` rows
  for per-token groups (onnxruntime's fast paths: a uint4 or float16-scale or innermost-
  axis blocked ``DequantizeLinear`` is 5-40x slower on CPU);
* ``Split`` every tier into L layers; layer i's past is the tiers in order, and the
  decoder's ``Concat(past, new)`` takes them directly: ``Concat(l0_i, l1_i, l2_i, new_i)``
  (nested Concats are flattened after building, so the float32 past is written once by the
  dequantization and copied once by that Concat, as in the full-precision graph).

Key order does not matter for attention once RoPE is applied, so the tiers need not be in
token order. P is ``attention_mask`` length minus S.

Outputs: ``logits`` float32 ``[1, S, vocab]``; ``kv.new`` float32 ``[2L, KV, S, D]`` this
step's keys (rows 0..L-1, after RoPE) and values (rows L..2L-1) only; ``kv.attn_mass``
float32 ``[T]`` attention probability per key position (graph order: L0 rows, L1, L2, new)
summed over layers, query heads and the S queries (H2O importance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto

from ..model.export import GraphBuilder, build_decoder

FLOAT16 = TensorProto.FLOAT16
FLOAT = TensorProto.FLOAT
UINT8 = TensorProto.UINT8

TIERED_FILE = "model_tiered.onnx"
NEW_KV = "kv.new"
ATTN_MASS = "kv.attn_mass"
#: bits per code of the quantized levels.
LEVEL_BITS = {1: 8, 2: 4}
KINDS = ("key", "value")
#: node-name prefix of everything :meth:`TieredKVAdapter.declare_inputs` builds (the part
#: :func:`ensure_graph` swaps for another layout).
_IN = "kv/in"


def input_names(level: int, kind: str) -> tuple[str, str, str]:
    """(codes, scale, zero) input names of a quantized tier (level 1 or 2) for key/value."""
    p = f"kv.l{level}.{kind}"
    return p, p + "_scale", p + "_zero"


def l0_name(kind: str) -> str:
    return f"kv.l0.{kind}"


def _tier_out(kind: str, level: int) -> str:
    return f"{_IN}/{kind}/l{level}"


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
            tiers do not exist (every tier costs ~8 nodes per run even when empty).
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

    def grouping(self, kind: str, head_dim: int) -> tuple[str, int]:
        """``(mode, g)`` of ``kind``: mode ``"channel"`` (groups of g tokens per channel,
        head-major codes), ``"head"`` (per-token groups of g channels inside a head,
        head-major codes) or ``"row"`` (per-token groups of g > head_dim channels
        spanning g/head_dim whole heads, token-major codes)."""
        if kind == "key" and self.key_axis == "channel":
            return "channel", self.key_group
        g = self.key_group if kind == "key" else self.value_group
        return ("head" if g <= head_dim else "row"), g

    def check(self, kv_heads: int, head_dim: int) -> None:
        """Raises ValueError if a group does not fit the model's heads."""
        E = kv_heads * head_dim
        for kind in KINDS:
            mode, g = self.grouping(kind, head_dim)
            if mode == "head" and head_dim % g:
                raise ValueError(f"{kind} group {g} must divide head_dim {head_dim}")
            if mode == "row" and (g % head_dim or E % g):
                raise ValueError(f"{kind} group {g} must be a multiple of head_dim {head_dim} "
                                 f"dividing kv_heads*head_dim = {E}")

    def file_name(self) -> str:
        """``model_tiered.onnx`` for the default layout, else a tagged variant."""
        if self == GraphLayout():
            return TIERED_FILE
        lv = "".join(str(v) for v in self.levels) or "0"
        return f"model_tiered.k{self.key_axis[0]}{self.key_group}v{self.value_group}l{lv}.onnx"


@dataclass
class TieredKVAdapter:
    """:class:`~lemonade_inferos.model.export.KVGraphAdapter` for the tiered store (batch 1)."""

    layout: GraphLayout = field(default_factory=GraphLayout)
    _past: dict[str, list[list[str]]] = field(default_factory=dict, init=False, repr=False)
    _new: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    _probs: list[str] = field(default_factory=list, init=False, repr=False)
    _past_len: str = field(default="", init=False, repr=False)
    _nib: tuple = field(default=(), init=False, repr=False)

    def declare_inputs(self, b: GraphBuilder) -> None:
        c = b.config
        L, KV, D = c.n_layers, c.n_kv_heads, c.head_size
        E = KV * D
        self.layout.check(KV, D)
        self._past, self._new, self._probs = {}, {k: [] for k in KINDS}, []
        i64 = b.const_i64
        self._nib = (b.initializer("kv_nibble_mask", np.array(15, np.uint8)),
                     b.initializer("kv_nibble_shift", np.array(4, np.uint8)))
        for kind in KINDS:
            mode, g = self.layout.grouping(kind, D)
            pre = f"{_IN}/{kind}"
            l0 = b.add_input(l0_name(kind), FLOAT16, ["kv_l0_len", L, E])
            x = b.node("Cast", [l0], f"{pre}/l0_f32", to=FLOAT)
            x = b.node("Reshape", [x, i64([0, L, KV, D], "kv_l0_4d")], f"{pre}/l0_nlkd")
            tiers = [b.node("Transpose", [x], f"{pre}/l0_lknd", perm=[1, 2, 0, 3])]
            for level in self.layout.levels:
                qn, sn, zn = input_names(level, kind)
                n = f"kv_l{level}_len"
                if mode == "channel":
                    shape, meta = [L, KV, n, D], [L, KV, f"kv_l{level}_groups", D]
                elif mode == "head":
                    shape, meta = [L, KV, n, D], [L, KV, n, D // g]
                else:
                    shape, meta = [L, n, E], [L, n, E // g]
                p = f"{pre}/l{level}"
                s = b.node("Cast", [b.add_input(sn, FLOAT16, meta)], f"{p}/scale_f32", to=FLOAT)
                if level == 1:
                    q = b.add_input(qn, UINT8, shape)
                    z = b.add_input(zn, UINT8, meta)
                else:  # split-half packed nibbles -> the codes in order (flat)
                    q = self._unpack(b, b.add_input(qn, UINT8, [f"kv_l2_{kind}_bytes"]), f"{p}/codes")
                    z = self._unpack(b, b.add_input(zn, UINT8, [f"kv_l2_{kind}_zero_bytes"]), f"{p}/zero")
                if mode == "channel":
                    if level == 2:
                        q = b.node("Reshape", [q, i64([L, KV, -1, D], "kv_lknd")], f"{p}/codes_lknd")
                        z = b.node("Reshape", [z, i64([L, KV, -1, D], "kv_lknd")], f"{p}/zero_lknd")
                    x = b.node("DequantizeLinear", [q, s, z], f"{p}/dq", axis=2, block_size=g)
                else:
                    q = b.node("Reshape", [q, i64([-1, g], f"kv_rows{g}")], f"{p}/codes_rows")
                    s = b.node("Reshape", [s, i64([-1], "kv_flat")], f"{p}/scale_flat")
                    if level == 1:
                        z = b.node("Reshape", [z, i64([-1], "kv_flat")], f"{p}/zero_flat")
                    x = b.node("DequantizeLinear", [q, s, z], f"{p}/dq", axis=0)
                    if mode == "head":
                        x = b.node("Reshape", [x, i64([L, KV, -1, D], "kv_lknd")], f"{p}/lknd")
                    else:
                        x = b.node("Reshape", [x, i64([L, -1, KV, D], "kv_lnkd")], f"{p}/lnkd")
                        x = b.node("Transpose", [x], f"{p}/lknd", perm=[0, 2, 1, 3])
                tiers.append(x)
            outs = []
            for level, t in zip((0,) + self.layout.levels, tiers):
                o = b.node("Split", [t, i64([1] * L, "kv_split_layers")], _tier_out(kind, level),
                           num_outputs=L, axis=0)
                outs.append(o if isinstance(o, list) else [o])
            self._past[kind] = [[o[i] for o in outs] for i in range(L)]
        mlen = b.node("Shape", ["attention_mask"], f"{_IN}/total_len", start=1, end=2)
        slen = b.node("Shape", ["input_ids"], f"{_IN}/new_len", start=1, end=2)
        self._past_len = b.node("Sub", [mlen, slen], f"{_IN}/past_len_1d")

    def _unpack(self, b: GraphBuilder, packed: str, hint: str) -> str:
        lo = b.node("BitwiseAnd", [packed, self._nib[0]], f"{hint}_lo")
        hi = b.node("BitShift", [packed, self._nib[1]], f"{hint}_hi", direction="RIGHT")
        return b.node("Concat", [lo, hi], f"{hint}_u8", axis=0)

    def past_kv(self, b: GraphBuilder, layer: int) -> tuple[str, str]:
        # flattened into the decoder's Concat(past, new) by _flatten_concats
        return tuple(b.node("Concat", self._past[kind][layer], f"{_IN}/past_{kind}_{layer}", axis=2)
                     for kind in KINDS)

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
    """The tiered decoder ``ModelProto`` for llama2.c ``weights`` (see module docstring)."""
    check = kw.pop("check", True)
    m = build_decoder(weights, TieredKVAdapter(layout or GraphLayout()), name="llama2c_decoder_tiered",
                      check=False, **kw)
    _flatten_concats(m.graph)
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


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


def _dims(m: onnx.ModelProto) -> tuple[int, int, int]:
    """(L, KV, D) of a tiered graph, read from its kv.l0.key input and a Reshape constant."""
    for inp in m.graph.input:
        if inp.name == l0_name("key"):
            d = inp.type.tensor_type.shape.dim
            L, E = int(d[1].dim_value), int(d[2].dim_value)
            break
    else:
        raise ValueError("not a tiered graph: no kv.l0.key input")
    for t in m.graph.initializer:
        if t.name.startswith("kv_l0_4d"):
            v = onnx.numpy_helper.to_array(t).tolist()
            return L, int(v[2]), int(v[3])
    raise ValueError("tiered graph of an older converter (no kv_l0_4d); re-convert the model")


def ensure_graph(folder: str | Path, layout: GraphLayout) -> Path:
    """Path of the tiered graph for ``layout`` in ``folder``; a missing variant is derived
    from ``model_tiered.onnx`` by rebuilding only the adapter's input stage (the nodes
    named ``kv/in/...``, whose per-layer outputs keep their names) and cached next to it.

    Raises:
        FileNotFoundError: ``folder`` has no ``model_tiered.onnx``.
        ValueError: the layout's groups do not fit the model's heads.
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
    keep = [n for n in g.node if not n.name.startswith(f"/{_IN}/")]
    used = {x for n in keep for x in n.input}
    b = GraphBuilder(SimpleNamespace(n_layers=L, n_kv_heads=KV, head_size=D), "adapter")
    b._names.update(n.name for n in keep)
    b._names.update(o for n in keep for o in n.output)
    b._names.update(t.name for t in g.initializer if t.name in used)
    b._names.update(i.name for i in g.input if not i.name.startswith("kv.l"))
    ad = TieredKVAdapter(layout)
    ad.declare_inputs(b)
    tier_out = re.compile(rf"^{_IN}/(key|value)/l\d(?:_(\d+))?$")
    for n in keep:  # the decoder's Concat(past tiers..., new): swap in the new tiers
        hits = [tier_out.match(x) for x in n.input]
        if not any(hits):
            continue
        first = next(h for h in hits if h)
        kind, layer = first.group(1), int(first.group(2) or 0)
        k = hits.index(first)
        rest = [x for x, h in zip(n.input, hits) if not h]
        del n.input[:]
        n.input.extend(rest[:k] + ad._past[kind][layer] + rest[k:])
    del g.node[:]
    g.node.extend(b.nodes + keep)  # the adapter stage only reads graph inputs
    inputs = [i for i in g.input if not i.name.startswith("kv.l")]
    pos = [k for k, i in enumerate(g.input) if i.name.startswith("kv.l")][0]
    del g.input[:]
    g.input.extend(inputs[:pos] + b.inputs + inputs[pos:])
    inits = [t for t in g.initializer if t.name in used] + b.initializers
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.checker.check_model(m, full_check=True)
    tmp = p.with_suffix(".onnx.tmp")
    onnx.save_model(m, str(tmp))
    tmp.replace(p)
    return p


__all__ = [
    "ATTN_MASS", "LEVEL_BITS", "NEW_KV", "TIERED_FILE", "GraphLayout", "TieredKVAdapter",
    "build_tiered_decoder", "ensure_graph", "input_names", "l0_name", "write_tiered_graph",
]
