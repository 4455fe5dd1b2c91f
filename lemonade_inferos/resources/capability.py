"""Which quantized operators each execution provider really runs (the guide's
DeviceCapabilityChecker, done by running tiny models instead of reading op lists).

Two probe models, built with ``onnx.helper`` and checked against numpy:

* ``int8``: ``DequantizeLinear`` (opset 21, int8 weights, per-axis float scale, zero point)
  feeding ``MatMul`` -- the INT8 KV / weight path.
* ``int4``: ``com.microsoft.MatMulNBits`` (bits=4, block_size=16, packed uint8 weights,
  float scales, default zero point 8) -- the INT4 weight path of onnxruntime-genai models;
  plus ``DequantizeLinear`` with an ``int4`` input, the in-graph INT4 KV path.

A provider "supports" a probe when a session with only that provider (plus CPU as ORT
requires for some) is created, runs, *and assigns the probe's node to that provider* (the
session's first provider is the one asked for) and the
output matches numpy within ``REL_TOL`` of the output's magnitude. Failures carry the error text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

M, K, N, BLOCK = 2, 32, 8, 16
REL_TOL = 0.02
SKIP_PROVIDERS = ("TensorrtExecutionProvider", "AzureExecutionProvider")


@dataclass
class ProbeResult:
    provider: str
    probe: str
    ok: bool
    detail: str = ""
    max_abs_err: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Capabilities:
    results: list[ProbeResult] = field(default_factory=list)

    def supports(self, provider: str, probe: str) -> bool:
        return any(r.ok for r in self.results if r.provider == provider and r.probe == probe)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results]}


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def int8_probe() -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """(model bytes, feeds, expected output) for DequantizeLinear(int8) -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    r = _rng()
    q = r.integers(-128, 128, size=(K, N), dtype=np.int8)
    scale = (r.random(N, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = r.integers(-8, 8, size=N, dtype=np.int8)
    a = r.standard_normal((M, K), dtype=np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"], axis=1),
             helper.make_node("MatMul", ["a", "w"], ["y"])]
    g = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                          [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale"),
                           numpy_helper.from_array(zp, "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    expected = a @ ((q.astype(np.float32) - zp.astype(np.float32)) * scale)
    return m.SerializeToString(), {"a": a}, expected


def int4_probe() -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """(model bytes, feeds, expected) for MatMulNBits(bits=4) and DequantizeLinear(int4)."""
    import onnx  # noqa: F401
    from onnx import TensorProto, helper, numpy_helper

    r = _rng()
    kb = K // BLOCK
    q = r.integers(0, 16, size=(N, K), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(N, kb, BLOCK // 2)
    scales = (r.random(N * kb, dtype=np.float32) * 0.05 + 0.01).astype(np.float32)
    a = r.standard_normal((M, K), dtype=np.float32)
    w = (q.astype(np.float32) - 8.0) * np.repeat(scales.reshape(N, kb), BLOCK, axis=1)
    # int4 DequantizeLinear (opset 21): per-axis over columns of a [K, N] int4 tensor
    q4 = r.integers(-8, 8, size=(K, N)).astype(np.int8)
    s4 = (r.random(N, dtype=np.float32) * 0.05 + 0.01).astype(np.float32)
    t4 = helper.make_tensor("q4", TensorProto.INT4, [K, N], q4.flatten().tolist())
    nodes = [helper.make_node("MatMulNBits", ["a", "b", "scales"], ["y1"], domain="com.microsoft",
                              K=K, N=N, bits=4, block_size=BLOCK),
             helper.make_node("DequantizeLinear", ["q4", "s4"], ["w4"], axis=1),
             helper.make_node("MatMul", ["a", "w4"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    g = helper.make_graph(nodes, "int4_probe", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                          [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales"),
                           t4, numpy_helper.from_array(s4, "s4")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    expected = a @ w.T + a @ (q4.astype(np.float32) * s4)
    return m.SerializeToString(), {"a": a}, expected


PROBES = {"int8": int8_probe, "int4": int4_probe}


def run_probe(provider: str, probe: str) -> ProbeResult:
    """Build and run one probe on ``provider`` alone; never raises."""
    import onnxruntime as ort

    try:
        model, feeds, expected = PROBES[probe]()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model, so, providers=[provider])
        if sess.get_providers()[0] != provider:
            return ProbeResult(provider, probe, False, f"onnxruntime placed the session on {sess.get_providers()[0]}")
        (y,) = sess.run(None, feeds)
        err = float(np.max(np.abs(y - expected)))
        # 2 %: onnxruntime's optimizer may fuse DequantizeLinear+MatMul into an integer
        # kernel that quantizes the activations too (measured ~1 % here); a wrong kernel is far off
        tol = REL_TOL * max(1.0, float(np.max(np.abs(expected))))
        return ProbeResult(provider, probe, err <= tol, "" if err <= tol else f"wrong result (max abs err {err:.3g})",
                           round(err, 8))
    except Exception as e:  # an unsupported op, a provider that fails to load, ...
        return ProbeResult(provider, probe, False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def check(providers: list[str] | None = None) -> Capabilities:
    """Run every probe on every provider (default: ``onnxruntime.get_available_providers()``
    minus ``SKIP_PROVIDERS``: TensorRT needs engine setup, Azure is a remote endpoint)."""
    import onnxruntime as ort

    if providers is None:
        providers = [p for p in ort.get_available_providers() if p not in SKIP_PROVIDERS]
    caps = Capabilities()
    for p in providers:
        for probe in PROBES:
            caps.results.append(run_probe(p, probe))
    return caps
