"""Build an ONNX decoder graph (opset 21, standard ops only) from :class:`DecoderWeights`.

The graph computes exactly :func:`lemonade_inferos.model.reference.forward` (llama2.c
``run.c`` semantics, generalised to any Llama-family config: RoPE base, RMSNorm epsilon,
head size, QKV biases, tied classifier) for a batch of sequences with an explicit KV cache.
Weights may afterwards be stored as int4/int8 ``MatMulNBits`` or float16
(:mod:`lemonade_inferos.model.precision`). Where the past
K/V come from, and which cache tensors the graph returns, is delegated to a
:class:`KVGraphAdapter`, so the same transformer code builds

* ``model.onnx`` with :class:`StandardKVAdapter` – inputs ``past_key_values.{i}.key|value``
  float32 ``[batch, kv_heads, past_len, head_dim]``, outputs ``present.{i}.key|value``
  float32 ``[batch, kv_heads, past_len + seq, head_dim]`` (the layout documented in
  :mod:`lemonade_inferos.model.spec`, as onnxruntime-genai expects it), and
* other variants (e.g. a tiered quantized cache) with a different adapter.

Common graph inputs: ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64
``[batch, past_len + seq]`` (1 = attend), ``position_ids`` int64 ``[batch, seq]`` (RoPE
positions, ``0 <= p < context_length``). Output ``logits`` float32 ``[batch, seq, vocab]``.

Attention rule: new token ``i`` attends key position ``j`` iff ``attention_mask[b, j] == 1``
and ``j <= past_len + i``. Keys are cached *after* RoPE, in llama2.c's interleaved-pair
layout (head_dim element ``2m``/``2m+1`` form pair ``m``), so cached K equals the numpy
reference's cache bit-for-bit up to float rounding.

Design for low per-op overhead at batch 1 (each layer is ~40 small ops):

* RMSNorm weights, the ``1/sqrt(head_dim)`` attention scale and the ``sqrt(dim)`` of
  the RMS are folded into the following MatMul weights; RMSNorm is ``ReduceSumSquare``,
  ``Add``, ``Sqrt``, ``Div``.
* RoPE is linear: ``rope(x) = x * cos + swap(x) * sin_signed`` where ``swap`` exchanges the
  two elements of every pair (one ``Gather`` along the last axis) and the pair sign
  ``(-1, +1)`` is folded into the sin table; one MatMul (plus bias) yields ``[q | k | v]``.
  cos/sin tables are initializers gathered once by ``position_ids`` and shared by all
  layers. Small models use *wide* tables ``[context, (H+2KV)*D]`` (v columns cos 1, sin 0)
  applied to the whole projection (fewest nodes); when the wide tables would pass
  :data:`WIDE_ROPE_TABLE_BYTES` (SmolLM2 at 8K context: 63 MB) the tables are
  ``[context, D]`` and q|k is viewed as ``[B, S, H+KV, D]`` for the rotation.
* Grouped-query attention without copying K/V: queries are reshaped to
  ``[batch, kv_heads, group, seq, head_dim]`` and broadcast-MatMul'd against
  ``[batch, kv_heads, 1, head_dim, total]`` keys (query head ``h`` reads KV head
  ``h // group``, as llama2.c).
* The additive mask ``[batch, 1, 1, seq, total]`` is built once and shared.
* Nodes whose results nothing consumes are pruned (:meth:`GraphBuilder.make_model`).

Sources: karpathy/llama2.c ``run.c`` (``forward``, ``rmsnorm``, RoPE loop);
onnxruntime-genai's model builder (I/O names, dim names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import DecoderConfig as Llama2cConfig, DecoderWeights as Llama2cWeights

OPSET = 21
#: IR 10 is what opset 21 introduced; readable by onnxruntime >= 1.18 (so also by the ORT
#: bundled with onnxruntime-genai 0.9.x) and by onnxruntime 1.31.
IR_VERSION = 10

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

# symbolic dimension names (as onnxruntime-genai's builder names them)
BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"

#: additive mask value for blocked key positions (finite, so a fully masked row of a
#: padded query gives a uniform softmax instead of NaN).
MASK_VALUE = float(np.finfo(np.float32).min)


# --------------------------------------------------------------------------- builder
class GraphBuilder:
    """Small helper around ``onnx.helper`` collecting nodes, initializers and I/O.

    Every method returns the *name* of the tensor(s) it created. Names are made unique
    with :meth:`unique`. The model facts the graph needs are in :attr:`config`, and
    :attr:`shared` lets builder stages publish tensors (e.g. ``"seq_len_1d"``) to
    adapters.

    Attributes:
        config: the :class:`Llama2cConfig` of the model being built.
        nodes, initializers, inputs, outputs: the graph under construction.
        shared: named tensors other stages may reuse. The decoder builder publishes
            ``"seq_len_1d"`` (int64 [1], new tokens S), ``"total_len_1d"`` (int64 [1],
            past_len + S), ``"past_len_1d"`` (int64 [1]), ``"batch_1d"`` (int64 [1]).
    """

    def __init__(self, config: Llama2cConfig, name: str = "decoder"):
        self.config = config
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shared: dict[str, str] = {}
        self._names: set[str] = set()
        self._const_cache: dict[tuple, str] = {}

    # names ------------------------------------------------------------------
    def unique(self, hint: str) -> str:
        """A tensor/node name not used before, based on ``hint``."""
        name, k = hint, 1
        while name in self._names:
            name = f"{hint}_{k}"
            k += 1
        self._names.add(name)
        return name

    # I/O ----------------------------------------------------------------------
    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        """Declare graph input ``name`` (exact, must be unused) of ``elem_type``/``shape``.

        Raises:
            ValueError: the name is already taken.
        """
        if name in self._names:
            raise ValueError(f"graph input name {name!r} already used")
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        """Declare graph output ``name`` (a tensor produced by some node)."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def rename(self, old: str, new: str) -> str:
        """Rename tensor ``old`` to ``new`` everywhere (producer and consumers so far).

        Used to give an internal tensor an exact graph-output name without an Identity.

        Raises:
            ValueError: ``new`` is already used, or ``old`` is a graph input/initializer.
        """
        if new in self._names:
            raise ValueError(f"cannot rename {old!r}: {new!r} already used")
        if any(v.name == old for v in self.inputs) or any(t.name == old for t in self.initializers):
            raise ValueError(f"cannot rename graph input/initializer {old!r}")
        for n in self.nodes:
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new
            for i, x in enumerate(n.output):
                if x == old:
                    n.output[i] = new
        self._names.add(new)
        for k, v in self.shared.items():
            if v == old:
                self.shared[k] = new
        return new

    # constants ------------------------------------------------------------------
    def initializer(self, hint: str, array: np.ndarray) -> str:
        """Add ``array`` (dtype kept) as an initializer; returns its unique name."""
        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, values: Sequence[int] | int, hint: str = "const") -> str:
        """An int64 initializer (scalar if ``values`` is an int, else 1-D); deduplicated."""
        arr = np.array(values, dtype=np.int64)
        key = ("i64", arr.shape, tuple(arr.reshape(-1).tolist()))
        if key not in self._const_cache:
            self._const_cache[key] = self.initializer(hint, arr)
        return self._const_cache[key]

    def const_f32(self, values: Sequence[float] | float, hint: str = "constf") -> str:
        """A float32 initializer (scalar or 1-D); deduplicated."""
        arr = np.array(values, dtype=np.float32)
        key = ("f32", arr.shape, tuple(arr.reshape(-1).tolist()))
        if key not in self._const_cache:
            self._const_cache[key] = self.initializer(hint, arr)
        return self._const_cache[key]

    # nodes ----------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], hint: str | None = None,
             num_outputs: int = 1, **attrs) -> str | list[str]:
        """Append node ``op``; returns its output name (or list if ``num_outputs > 1``).

        ``inputs`` may contain ``""`` for omitted optional inputs. ``attrs`` are ONNX
        attributes (``helper.make_node`` conventions).
        """
        base = hint or op.lower()
        outs = [self.unique(base if num_outputs == 1 else f"{base}_{k}") for k in range(num_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.unique(f"/{base}/{op}"), **attrs))
        return outs[0] if num_outputs == 1 else outs

    # model ----------------------------------------------------------------------
    def prune(self) -> None:
        """Drop nodes none of whose outputs reach a graph output, and unused initializers."""
        needed = {o.name for o in self.outputs}
        keep: list[onnx.NodeProto] = []
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output):
                keep.append(n)
                needed.update(x for x in n.input if x)
        self.nodes = keep[::-1]
        self.initializers = [t for t in self.initializers if t.name in needed]

    def make_model(self, *, prune: bool = True, check: bool = True,
                   producer: str = "lemonade-inferos") -> onnx.ModelProto:
        """Assemble the ``ModelProto`` (opset :data:`OPSET`, IR :data:`IR_VERSION`).

        Raises:
            onnx.checker.ValidationError: ``check`` is set and the graph is invalid.
        """
        if prune:
            self.prune()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name=producer)
        model.ir_version = IR_VERSION
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------- adapters
@runtime_checkable
class KVGraphAdapter(Protocol):
    """Where a decoder graph reads past K/V from and what cache tensors it returns.

    :func:`build_decoder` calls, in order: :meth:`declare_inputs` once (after the common
    inputs ``input_ids``, ``attention_mask``, ``position_ids``), :meth:`past_length` once,
    then per layer :meth:`past_kv` and, at the end of that layer's attention,
    :meth:`emit_outputs` (after ``logits`` is declared the adapter's outputs follow in
    layer order; ``logits`` is always the first graph output).

    Shapes below use B = batch, KV = ``b.config.n_kv_heads``, H = ``b.config.n_heads``,
    D = ``b.config.head_size``, P = past_len (key positions presented by the cache),
    S = new tokens, T = P + S. All K are *after* RoPE, interleaved-pair layout.
    """

    def declare_inputs(self, b: GraphBuilder) -> None:
        """Add the graph inputs the adapter needs (``b.add_input``) and any shared nodes."""

    def past_kv(self, b: GraphBuilder, layer: int) -> tuple[str, str]:
        """Names of float32 ``[B, KV, P, D]`` tensors: past K (after RoPE) and past V.

        An adapter with a true attribute ``keys_transposed`` returns past K channel-major
        as ``[B, KV*D, P]`` instead (channel ``e = head*D + d``; what the score MatMul
        reads): the decoder then concatenates keys on axis 2 and skips the per-layer
        Transpose of all keys. With a true ``values_transposed`` past V is
        ``[B, KV*D, P]`` too and the context is computed as ``V^T @ probs^T`` (a
        Transpose of the small probabilities instead).
        """

    def past_length(self, b: GraphBuilder) -> str:
        """Name of an int64 1-D tensor of shape ``[1]`` holding P (may be 0)."""

    def emit_outputs(self, b: GraphBuilder, layer: int, k_new: str, v_new: str,
                     k_all: str, v_all: str, attn_probs: str) -> None:
        """Declare this layer's cache outputs (``b.add_output``, ``b.rename``).

        Args:
            k_new, v_new: float32 ``[B, KV, S, D]`` this step's K (after RoPE) / V
                (``[B, KV*D, S]`` for an adapter with ``keys_transposed`` /
                ``values_transposed``).
            k_all, v_all: float32 ``[B, KV, T, D]`` past then new (Concat on axis 2);
                ``[B, KV*D, T]`` with ``keys_transposed`` / ``values_transposed``.
            attn_probs: float32 ``[B, H, S, T]`` softmax probabilities of this layer
                (masked positions ~0). Computed lazily: the nodes producing it are pruned
                unless the adapter makes it (or something derived) a graph output.
        """


@dataclass
class StandardKVAdapter:
    """Explicit past/present KV I/O, the onnxruntime-genai layout (``model.onnx``).

    Inputs ``past_key_values.{i}.key|value`` float32 ``[batch_size, kv_heads,
    past_sequence_length, head_dim]``; outputs ``present.{i}.key|value`` float32
    ``[batch_size, kv_heads, total_sequence_length, head_dim]``. The name patterns are
    configurable (``%d`` = layer index) and must match ``genai_config.json``.
    """

    past_key_name: str = "past_key_values.%d.key"
    past_value_name: str = "past_key_values.%d.value"
    present_key_name: str = "present.%d.key"
    present_value_name: str = "present.%d.value"
    _past: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)

    def declare_inputs(self, b: GraphBuilder) -> None:
        c = b.config
        self._past = []
        for i in range(c.n_layers):
            shape = [BATCH, c.n_kv_heads, PAST, c.head_size]
            k = b.add_input(self.past_key_name % i, FLOAT, shape)
            v = b.add_input(self.past_value_name % i, FLOAT, shape)
            self._past.append((k, v))

    def past_kv(self, b: GraphBuilder, layer: int) -> tuple[str, str]:
        return self._past[layer]

    def past_length(self, b: GraphBuilder) -> str:
        return b.node("Shape", [self._past[0][0]], "past_len_1d", start=2, end=3)

    def emit_outputs(self, b: GraphBuilder, layer: int, k_new: str, v_new: str,
                     k_all: str, v_all: str, attn_probs: str) -> None:
        c = b.config
        shape = [BATCH, c.n_kv_heads, TOTAL, c.head_size]
        b.add_output(b.rename(k_all, self.present_key_name % layer), FLOAT, shape)
        b.add_output(b.rename(v_all, self.present_value_name % layer), FLOAT, shape)


# --------------------------------------------------------------------------- weights
def rope_tables(config: Llama2cConfig, context_length: int | None = None,
                v_columns: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed-sin tables ``[context, width]`` float32 for the fused q|k|v projection.

    Column ``c`` of a head of size D belongs to pair ``m = (c % D) // 2`` with angle
    ``pos * theta^(-2m/D)`` (llama2.c; ``theta = config.rope_theta``). The sin table carries
    the pair's sign: ``-sin`` on even columns, ``+sin`` on odd ones, so that
    ``x * cos + x[pair_swap] * sin_signed`` is the rotation. ``width = (H + KV) * D +
    v_columns``; the trailing ``v_columns`` columns have cos 1 and sin 0 (pass-through).
    """
    n = context_length or config.seq_len
    d = config.head_size
    inv = float(config.rope_theta) ** (-(2.0 * np.arange(d // 2)) / d)  # [D/2]
    ang = np.arange(n, dtype=np.float64)[:, None] * np.repeat(inv, 2)[None, :]  # [n, D]
    sign = np.tile([-1.0, 1.0], d // 2)[None, :]
    heads = config.n_heads + config.n_kv_heads
    cos = np.concatenate([np.tile(np.cos(ang), (1, heads)), np.ones((n, v_columns))], axis=1)
    sin = np.concatenate([np.tile(np.sin(ang) * sign, (1, heads)), np.zeros((n, v_columns))], axis=1)
    return cos.astype(np.float32), sin.astype(np.float32)


#: wide RoPE tables (see the module docstring) up to this many bytes for cos + sin.
WIDE_ROPE_TABLE_BYTES = 16 << 20


def pair_swap_index(width: int) -> np.ndarray:
    """int64 ``[width]`` column indices exchanging the elements of every pair (2m <-> 2m+1)."""
    idx = np.arange(width, dtype=np.int64)
    return idx ^ 1


def _layer_matrices(w: Llama2cWeights, layer: int, fold_norms: bool = True) -> dict[str, np.ndarray]:
    """Float32 matrices ``[in, out]`` of one layer (computed in float64).

    With ``fold_norms`` the RMSNorm weights (times ``sqrt(dim)``) scale the matrices' input
    rows; without, they are returned as ``attn_norm``/``ffn_norm`` vectors for a ``Mul`` in
    the graph, so the matrices keep the source's block structure for weight quantization
    (a row scale inside a block of 32 inputs would spoil the blocks).
    """
    c = w.config
    f64 = np.float64
    rms_scale = np.sqrt(c.dim)  # graph computes x / sqrt(sum(x^2) + dim*eps)
    att = w.rms_att[layer].astype(f64) * rms_scale
    ffn = w.rms_ffn[layer].astype(f64) * rms_scale
    norms = {}
    if not fold_norms:
        norms = {"attn_norm": att.astype(np.float32), "ffn_norm": ffn.astype(np.float32)}
        att = ffn = np.ones_like(att)
    wq = w.wq[layer].astype(f64).T / np.sqrt(c.head_size)  # [dim, H*D]
    wk = w.wk[layer].astype(f64).T
    wv = w.wv[layer].astype(f64).T
    qkv = att[:, None] * np.concatenate([wq, wk, wv], axis=1)  # [dim, (H+2KV)*D]
    out = {}
    if w.bq is not None:  # biases follow the same scaling as their columns (q: 1/sqrt(D))
        out["qkv_bias"] = np.concatenate([w.bq[layer].astype(f64) / np.sqrt(c.head_size),
                                          w.bk[layer], w.bv[layer]]).astype(np.float32)
    return {
        **out,
        **norms,
        "qkv": qkv.astype(np.float32),
        "wo": w.wo[layer].T.astype(np.float32),  # [H*D, dim]
        "w1": (ffn[:, None] * w.w1[layer].astype(f64).T).astype(np.float32),  # [dim, hidden]
        "w3": (ffn[:, None] * w.w3[layer].astype(f64).T).astype(np.float32),
        "w2": w.w2[layer].T.astype(np.float32),  # [hidden, dim]
    }


# --------------------------------------------------------------------------- decoder
def _rms(b: GraphBuilder, x: str, hint: str) -> str:
    """x / sqrt(sum(x^2) + dim*eps) over the last axis (weights and sqrt(dim) folded)."""
    dim = b.config.dim
    ss = b.node("ReduceSumSquare", [x, b.const_i64([-1], "axes_last")], f"{hint}/ss", keepdims=1)
    ss = b.node("Add", [ss, b.const_f32(dim * b.config.rms_eps, "rms_eps")], f"{hint}/ss_eps")
    return b.node("Div", [x, b.node("Sqrt", [ss], f"{hint}/rms")], f"{hint}/normed")


def _mask(b: GraphBuilder, attention_mask: str, past_len: str, seq_len: str) -> str:
    """Additive float mask ``[B, 1, 1, S, T]``: 0 where allowed, MASK_VALUE elsewhere."""
    zero = b.const_i64(0, "zero")
    one = b.const_i64(1, "one")
    p = b.node("Squeeze", [past_len, b.const_i64([0], "axis0")], "past_len")
    s = b.node("Squeeze", [seq_len, b.const_i64([0], "axis0")], "seq_len")
    t = b.node("Add", [p, s], "total_len")
    keys = b.node("Range", [zero, t, one], "key_pos")  # [T]
    qmax = b.node("Range", [p, t, one], "query_pos")  # [S] = P + i
    qmax = b.node("Unsqueeze", [qmax, b.const_i64([1], "axis1")], "query_pos_col")  # [S,1]
    causal = b.node("LessOrEqual", [keys, qmax], "causal")  # [S, T]
    am = b.node("Cast", [attention_mask], "attn_mask_bool", to=TensorProto.BOOL)  # [B, T]
    am = b.node("Unsqueeze", [am, b.const_i64([1, 2, 3], "axes123")], "attn_mask_5d")  # [B,1,1,1,T]
    allowed = b.node("And", [causal, am], "allowed")  # [B,1,1,S,T]
    return b.node("Where", [allowed, b.const_f32(0.0, "f_zero"), b.const_f32(MASK_VALUE, "mask_value")],
                  "mask_add")


def build_decoder(weights: Llama2cWeights, adapter: KVGraphAdapter | None = None, *,
                  context_length: int | None = None, name: str = "decoder",
                  check: bool = True, fold_norms: bool = True) -> onnx.ModelProto:
    """Build the decoder graph for ``weights``.

    Args:
        weights: a loaded checkpoint (llama2.c, GGUF or Hugging Face).
        adapter: KV-cache I/O; default :class:`StandardKVAdapter` (``model.onnx``).
        context_length: rows of the RoPE tables (max position + 1); default
            ``config.seq_len``. Positions beyond it make ORT fail in ``Gather``.
        name: graph name.
        check: run ``onnx.checker.check_model(full_check=True)``.
        fold_norms: fold RMSNorm weights into the following matrices (fewest nodes; for
            float weights). Converters pass False for int4/int8 weights (see
            :func:`_layer_matrices`).

    Returns:
        the ``onnx.ModelProto`` (weights embedded; ~1 MB per 260K parameters).

    Raises:
        TypeError: ``adapter`` does not implement :class:`KVGraphAdapter`.
        onnx.checker.ValidationError: the built graph is invalid.
    """
    adapter = adapter if adapter is not None else StandardKVAdapter()
    if not isinstance(adapter, KVGraphAdapter):
        raise TypeError(f"adapter {adapter!r} does not implement KVGraphAdapter")
    c = weights.config
    H, KV, D, G = c.n_heads, c.n_kv_heads, c.head_size, c.kv_mul
    b = GraphBuilder(c, name)

    input_ids = b.add_input("input_ids", INT64, [BATCH, SEQ])
    attention_mask = b.add_input("attention_mask", INT64, [BATCH, TOTAL])
    position_ids = b.add_input("position_ids", INT64, [BATCH, SEQ])
    adapter.declare_inputs(b)

    past_len = adapter.past_length(b)
    seq_len = b.node("Shape", [input_ids], "seq_len_1d", start=1, end=2)
    batch = b.node("Shape", [input_ids], "batch_1d", start=0, end=1)
    total_len = b.node("Add", [past_len, seq_len], "total_len_1d")
    b.shared.update(past_len_1d=past_len, seq_len_1d=seq_len, total_len_1d=total_len, batch_1d=batch)

    mask = _mask(b, attention_mask, past_len, seq_len)
    ctx_rows = context_length or c.seq_len
    wide = ctx_rows * (H + 2 * KV) * D * 8 <= WIDE_ROPE_TABLE_BYTES
    if wide:
        cos_t, sin_t = rope_tables(c, context_length, v_columns=KV * D)
    else:  # one head's tables [ctx, D], broadcast over the heads as [B, S, 1, D]
        cos_t, sin_t = (t[:, :D] for t in rope_tables(c, context_length))
    cos = b.node("Gather", [b.initializer("rope_cos", cos_t), position_ids], "rope/cos", axis=0)
    sin = b.node("Gather", [b.initializer("rope_sin", sin_t), position_ids], "rope/sin", axis=0)
    if not wide:
        cos = b.node("Unsqueeze", [cos, b.const_i64([2], "axis2")], "rope/cos4")
        sin = b.node("Unsqueeze", [sin, b.const_i64([2], "axis2")], "rope/sin4")
    # [B, H, S, T] view of the [B, KV, G, S, T] probabilities, only used by adapters
    probs_shape = b.node("Concat", [batch, b.const_i64([H], "n_heads"), seq_len, total_len],
                         "probs_shape", axis=0)

    x = b.node("Gather", [b.initializer("token_embedding", weights.token_embedding), input_ids],
               "embed", axis=0)  # [B, S, dim]
    q_split = b.const_i64([H * D, KV * D, KV * D], "qkv_split")
    swap = b.initializer("rope_pair_swap", pair_swap_index((H + 2 * KV) * D if wide else D))
    qk_v_split = b.const_i64([(H + KV) * D, KV * D], "qk_v_split")
    qk4_shape = b.const_i64([0, 0, H + KV, D], "qk4_shape")
    qk_flat = b.const_i64([0, 0, (H + KV) * D], "qk_flat_shape")
    q_k_split = b.const_i64([H * D, KV * D], "q_k_split")
    for i in range(c.n_layers):
        m = _layer_matrices(weights, i, fold_norms)
        p = f"layers.{i}"
        h = _rms(b, x, f"{p}/attn_norm")
        if not fold_norms:
            h = b.node("Mul", [h, b.initializer(f"{p}.attn_norm", m["attn_norm"])], f"{p}/attn_normed")
        main = b.node("MatMul", [h, b.initializer(f"{p}.qkv", m["qkv"])], f"{p}/qkv")
        if "qkv_bias" in m:
            main = b.node("Add", [main, b.initializer(f"{p}.qkv_bias", m["qkv_bias"])], f"{p}/qkv_biased")
        if wide:
            rot = b.node("Gather", [main, swap], f"{p}/qkv_swapped", axis=-1)
            main = b.node("Mul", [main, cos], f"{p}/rope_cos")
            rot = b.node("Mul", [rot, sin], f"{p}/rope_sin")
            qkv = b.node("Add", [main, rot], f"{p}/qkv_roped")
            q, k, v = b.node("Split", [qkv, q_split], f"{p}/split", num_outputs=3, axis=-1)
        else:
            qk, v = b.node("Split", [main, qk_v_split], f"{p}/split_v", num_outputs=2, axis=-1)
            qk = b.node("Reshape", [qk, qk4_shape], f"{p}/qk4")
            rot = b.node("Gather", [qk, swap], f"{p}/qk_swapped", axis=-1)
            qk = b.node("Mul", [qk, cos], f"{p}/rope_cos")
            rot = b.node("Mul", [rot, sin], f"{p}/rope_sin")
            qk = b.node("Add", [qk, rot], f"{p}/qk_roped")
            qk = b.node("Reshape", [qk, qk_flat], f"{p}/qk_roped_flat")
            q, k = b.node("Split", [qk, q_k_split], f"{p}/split", num_outputs=2, axis=-1)
        # q: [B,S,H*D] -> [B,KV,G,S,D]
        q = b.node("Reshape", [q, b.const_i64([0, 0, KV, G, D], "q5_shape")], f"{p}/q5")
        q = b.node("Transpose", [q], f"{p}/q", perm=[0, 2, 3, 1, 4])
        past_k, past_v = adapter.past_kv(b, i)
        kt_mode = getattr(adapter, "keys_transposed", False)  # past K is [B,KV*D,P]
        vt = getattr(adapter, "values_transposed", False)  # past V is [B,KV*D,P]
        kv_shape = b.const_i64([0, 0, KV, D], "kv4_shape")
        kvt5 = b.const_i64([0, KV, 1, D, -1], "kvt5_shape")

        def append_step(x: str, past: str, transposed: bool, tag: str) -> tuple[str, str]:
            """This step's K or V ``x`` [B,S,KV*D] in the past's layout, and past + it:
            channel-major [B,KV*D,S] / [B,KV*D,T] when ``transposed``, else head-major
            [B,KV,S,D] / [B,KV,T,D]."""
            if transposed:
                new = b.node("Transpose", [x], f"{p}/{tag}_new_t", perm=[0, 2, 1])
                return new, b.node("Concat", [past, new], f"{p}/{tag}_all_t", axis=2)
            new = b.node("Transpose", [b.node("Reshape", [x, kv_shape], f"{p}/{tag}4")], f"{p}/{tag}_new",
                         perm=[0, 2, 1, 3])
            return new, b.node("Concat", [past, new], f"{p}/{tag}_all", axis=2)

        k_new, k_all = append_step(k, past_k, kt_mode, "k")
        if kt_mode:
            kt = b.node("Reshape", [k_all, kvt5], f"{p}/k_t5")  # [B,KV,1,D,T]
        else:
            kt = b.node("Transpose", [k_all], f"{p}/k_t", perm=[0, 1, 3, 2])  # [B,KV,D,T]
            kt = b.node("Unsqueeze", [kt, b.const_i64([2], "axis2")], f"{p}/k_t5")  # [B,KV,1,D,T]
        v_new, v_all = append_step(v, past_v, vt, "v")
        scores = b.node("MatMul", [q, kt], f"{p}/scores")  # [B,KV,G,S,T] (scale folded in wq)
        scores = b.node("Add", [scores, mask], f"{p}/scores_masked")
        probs = b.node("Softmax", [scores], f"{p}/probs", axis=-1)
        if vt:
            # ctx^T = V^T @ probs^T with the G query heads of a KV head as G*S columns of one
            # MatMul: [B,KV,D,T] @ [B,KV,T,G*S] reads V once (a broadcast [B,KV,G,..] MatMul
            # runs G matrix-vector products of the whole V^T, each with one column: 13 us
            # more per decode step on stories260K at 448 tokens, head_dim 8)
            v4t = b.node("Reshape", [v_all, b.const_i64([0, KV, D, -1], "kvt4_shape")], f"{p}/v4t")
            pr = b.node("Transpose", [probs], f"{p}/probs_t", perm=[0, 1, 4, 2, 3])  # [B,KV,T,G,S]
            pr = b.node("Reshape", [pr, b.const_i64([0, 0, 0, -1], "probs_gs")], f"{p}/probs_gs")
            ctx = b.node("MatMul", [v4t, pr], f"{p}/ctx")  # [B,KV,D,G*S]
            ctx = b.node("Reshape", [ctx, b.const_i64([0, KV, D, G, -1], "ctx_dgs")], f"{p}/ctx_dgs")
            ctx = b.node("Transpose", [ctx], f"{p}/ctx_t", perm=[0, 4, 1, 3, 2])  # [B,S,KV,G,D]
        else:
            v5 = b.node("Unsqueeze", [v_all, b.const_i64([2], "axis2")], f"{p}/v5")  # [B,KV,1,T,D]
            ctx = b.node("MatMul", [probs, v5], f"{p}/ctx")  # [B,KV,G,S,D]
            ctx = b.node("Transpose", [ctx], f"{p}/ctx_t", perm=[0, 3, 1, 2, 4])  # [B,S,KV,G,D]
        ctx = b.node("Reshape", [ctx, b.const_i64([0, 0, H * D], "ctx_shape")], f"{p}/ctx_flat")
        attn = b.node("MatMul", [ctx, b.initializer(f"{p}.wo", m["wo"])], f"{p}/attn_out")
        x = b.node("Add", [x, attn], f"{p}/resid_attn")
        probs4 = b.node("Reshape", [probs, probs_shape], f"{p}/attn_probs")  # pruned unless used
        adapter.emit_outputs(b, i, k_new, v_new, k_all, v_all, probs4)
        # feed-forward: w2(silu(w1 x) * w3 x)
        h = _rms(b, x, f"{p}/ffn_norm")
        if not fold_norms:
            h = b.node("Mul", [h, b.initializer(f"{p}.ffn_norm", m["ffn_norm"])], f"{p}/ffn_normed")
        g = b.node("MatMul", [h, b.initializer(f"{p}.w1", m["w1"])], f"{p}/w1")
        u = b.node("MatMul", [h, b.initializer(f"{p}.w3", m["w3"])], f"{p}/w3")
        g = b.node("Mul", [g, b.node("Sigmoid", [g], f"{p}/sigmoid")], f"{p}/silu")
        f = b.node("MatMul", [b.node("Mul", [g, u], f"{p}/gated"),
                              b.initializer(f"{p}.w2", m["w2"])], f"{p}/w2")
        x = b.node("Add", [x, f], f"{p}/resid_ffn")

    h = _rms(b, x, "final_norm")
    final = weights.rms_final.astype(np.float64) * np.sqrt(c.dim)
    if fold_norms:
        wcls = (final[:, None] * weights.wcls.astype(np.float64).T).astype(np.float32)  # [dim, vocab]
    else:
        h = b.node("Mul", [h, b.initializer("final_norm", final.astype(np.float32))], "final_normed")
        wcls = np.ascontiguousarray(weights.wcls.T, dtype=np.float32)
    logits = b.node("MatMul", [h, b.initializer("lm_head", wcls)], "logits_tmp")
    b.rename(logits, "logits")
    # logits first, then the adapter's outputs in declaration order
    b.outputs.insert(0, helper.make_tensor_value_info("logits", FLOAT, [BATCH, SEQ, c.vocab_size]))
    return b.make_model(check=check)


#: models whose serialized size passes this are saved with external data (protobuf's 2 GB
#: limit, with margin).
EXTERNAL_DATA_BYTES = 1_800_000_000


def save_model(model: onnx.ModelProto, path) -> None:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when the model
    would pass :data:`EXTERNAL_DATA_BYTES` (the ONNX external-data format onnxruntime and
    onnxruntime-genai read)."""
    from pathlib import Path

    path = Path(path)
    big = model.ByteSize() > EXTERNAL_DATA_BYTES
    if big:
        name = path.name.replace(".tmp", "") + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
