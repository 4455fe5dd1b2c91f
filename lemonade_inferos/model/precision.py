"""Weight storage precision of a built decoder graph: fp32, fp16, int8 or int4.

:func:`apply_weight_precision` rewrites a float32 decoder (as
:func:`lemonade_inferos.model.export.build_decoder` builds it) in place of a copy:

* ``int4`` (default of the GGUF/HF converters): every transformer-layer ``MatMul`` weight
  becomes a ``com.microsoft.MatMulNBits`` with 4-bit asymmetric blocks of 32 along the input
  axis (onnxruntime's own ``MatMulNBitsQuantizer``, the quantizer onnxruntime-genai's model
  builder uses; ``accuracy_level`` 4 = int8 activations in the CPU kernel). The classifier
  (``lm_head``) is quantized to 8 bits, because its error lands directly on the logits (the
  same choice as llama.cpp's ``Q4_K_M``/``Q4_1`` files, whose output matrix stays at 6-8
  bits). The token embedding is stored as float16 and cast after the ``Gather``.
* ``int8``: as ``int4`` with 8-bit blocks everywhere.
* ``fp16``: large float32 initializers stored as float16 behind a ``Cast`` (onnxruntime
  folds the Cast at session creation, so compute stays float32).
* ``fp32``: unchanged.

Whether RMSNorm weights are folded into the matrices before quantization
(:data:`FOLD_NORMS`) was measured on SmolLM2-135M (Q4_1 source, 400 tokens of
``benchmarks/data/eval_long.txt``, mean KL divergence from the float32 graph; greedy answer
to the chat question "What is the capital of France?"):

=========  ==============  =================  ========================================
weights    folded norms    unfolded norms     note
=========  ==============  =================  ========================================
int8       KLD 0.0077 ✓    KLD 0.0040 ✗       unfolded: int8 activations (accuracy 4)
                                              clip the norm-scaled outlier channels and
                                              the greedy answer breaks ("L'Étoile…")
int4       KLD 0.51        KLD 0.36           re-quantizing Q4_1 blocks: see
                                              :attr:`lemonade_inferos.model.gguf.GGUFModel.auto_precision`
=========  ==============  =================  ========================================

``accuracy_level`` 0 (float32 compute) would be more exact but onnxruntime runs it as a
dequantize-then-GEMM fallback: 1,368 µs instead of 30 µs for a 576×1536 int8 matrix at
batch 1 on these machines.

Raises ``ValueError`` for an unknown mode.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRECISIONS = ("int4", "int8", "fp16", "fp32")
#: fold RMSNorm weights into the following matrices for this precision (see module docstring)
FOLD_NORMS = {"int4": False, "int8": True, "fp16": True, "fp32": True}
#: MatMulNBits block size along the input (K) axis.
BLOCK_SIZE = 32
#: initializers below this many elements stay float32 under ``fp16`` (norms, tables).
_FP16_MIN_ELEMENTS = 4096

log = logging.getLogger("lemonade_inferos.model.precision")


def _to_fp16_behind_cast(model: onnx.ModelProto, names: set[str]) -> None:
    """Store the float32 initializers ``names`` as float16 and insert a Cast to float32."""
    g = model.graph
    cast_nodes = []
    for t in g.initializer:
        if t.name not in names or t.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(t)
        src = t.name + "_fp16"
        t.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), src))
        cast_nodes.append(helper.make_node("Cast", [src], [src[:-5]], name=f"/cast/{src}", to=TensorProto.FLOAT))
    nodes = cast_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def _quantize_matmuls(model: onnx.ModelProto, bits: int, *, include: list[str] | None,
                      exclude: list[str] | None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                             accuracy_level=4, nodes_to_include=include, nodes_to_exclude=exclude)
    # the quantizer logs every skipped node at INFO; keep a conversion's output readable
    lg = logging.getLogger("onnxruntime.quantization")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        q.process()
    finally:
        lg.setLevel(old)
    return q.model.model


def apply_weight_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Return ``model`` with its weights stored at ``precision`` (see the module docstring).

    Args:
        model: a float32 decoder from :func:`~lemonade_inferos.model.export.build_decoder`
            (or the tiered variant); it is modified and returned.
        precision: one of :data:`PRECISIONS`.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"weights={precision!r} is not allowed; must be one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model
    g = model.graph
    matmul_weights = {n.input[1] for n in g.node if n.op_type == "MatMul"}
    inits = {t.name: t for t in g.initializer}
    big_matmuls = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    if precision == "fp16":
        names = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT
                 and int(np.prod(t.dims)) >= _FP16_MIN_ELEMENTS}
        _to_fp16_behind_cast(model, names)
        return model
    _to_fp16_behind_cast(model, {"token_embedding"})
    head = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] == "lm_head"]
    bits = 4 if precision == "int4" else 8
    layer_nodes = [n for n in big_matmuls if n not in head]
    if layer_nodes:
        model = _quantize_matmuls(model, bits, include=layer_nodes, exclude=None)
    if head:
        model = _quantize_matmuls(model, 8, include=head, exclude=None)
    still_float = matmul_weights & {t.name for t in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in still_float]
    if left:
        log.info("MatMuls left in float32 (shapes the quantizer does not take): %s", left)
    return model
