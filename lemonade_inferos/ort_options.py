"""Policy → onnxruntime ``SessionOptions`` / ``RunOptions`` / execution providers.

Pure mapping functions; the built-in plugin exposes them as hooks. Provider names and
options follow the onnxruntime documentation:

* NPU: ``VitisAIExecutionProvider`` (Ryzen AI; Windows only),
* iGPU: ``DmlExecutionProvider`` (DirectML; package onnxruntime-directml, Windows only),
* ``CPUExecutionProvider`` always last.

Providers that ``onnxruntime.get_available_providers()`` does not list are dropped with one
log line each, so on this Linux build the result degrades to CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import onnxruntime as ort

from .policy import Policy

log = logging.getLogger("lemonade_inferos.ort")

GRAPH_OPT = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXEC_MODE = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
DEVICE_PROVIDER = {
    "npu": "VitisAIExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# genai_config.json provider keys used by onnxruntime-genai for the same devices
GENAI_PROVIDER = {"npu": "VitisAI", "dml": "dml", "cpu": "cpu"}


def session_options(policy: Policy) -> ort.SessionOptions:
    """Build ``SessionOptions`` from ``policy.runtime`` and ``policy.io``.

    Sets intra/inter-op thread counts (0 = ORT default), graph optimisation level, execution
    mode, ``enable_mem_pattern``, ``enable_cpu_mem_arena``, log severity and every
    ``runtime.session_config`` entry via ``add_session_config_entry``.
    """
    r = policy.runtime
    so = ort.SessionOptions()
    so.intra_op_num_threads = r.intra_op_threads
    so.inter_op_num_threads = r.inter_op_threads
    so.graph_optimization_level = GRAPH_OPT[r.graph_optimization]
    so.execution_mode = EXEC_MODE[r.execution_mode]
    so.enable_mem_pattern = r.enable_mem_pattern
    so.enable_cpu_mem_arena = r.enable_cpu_mem_arena
    so.log_severity_level = r.log_severity
    so.logid = f"inferos:{policy.name}"
    for k, v in r.session_config.items():
        so.add_session_config_entry(str(k), str(v))
    return so


def run_options(policy: Policy, request_id: str) -> ort.RunOptions:
    """Build per-request ``RunOptions``: log severity, run tag (``logid``) = request id, and
    ``memory.enable_memory_arena_shrinkage`` = ``cpu:0`` when ``runtime.arena_shrinkage``."""
    ro = ort.RunOptions()
    ro.log_severity_level = policy.runtime.log_severity
    ro.logid = request_id  # the C API run tag (RunOptionsSetRunTag)
    prime_run_options(ro)
    if policy.runtime.arena_shrinkage:
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def prime_run_options(ro: ort.RunOptions) -> ort.RunOptions:
    """Set ``gpu_graph_id`` to its default ("0") explicitly.

    onnxruntime's Python ``run``/``run_with_iobinding`` look this entry up on every call and
    an absent entry costs a raised-and-caught C++ exception (~0.1 ms here, a third of a
    decode step of the embedded model). The value is the documented default.
    """
    try:
        if ro.get_run_config_entry("gpu_graph_id"):
            return ro
    except RuntimeError:
        pass
    ro.add_run_config_entry("gpu_graph_id", "0")
    return ro


def _device_order(policy: Policy) -> list[str]:
    s = policy.scheduler
    if s.mode == "npu_only":
        order = ["npu"]
    elif s.mode == "gpu_only":
        order = ["dml"]
    else:  # hybrid: decode device first (decode dominates a chat), then prefill device
        order = [s.decode_device, s.prefill_device]
    order.append("cpu")
    seen: list[str] = []
    for d in order:
        if d not in seen:
            seen.append(d)
    return seen


def provider_options(device: str, policy: Policy) -> dict[str, Any]:
    """ORT provider options for ``device`` ("npu" | "dml" | "cpu") under ``policy``."""
    if device == "dml":
        return {"device_id": 0}
    if device == "npu":
        return {}
    return {}


def execution_providers(policy: Policy, available: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Ordered ``(provider, options)`` for ``policy.scheduler``, filtered by ``available``.

    ``hybrid`` prefers the decode device then the prefill device; ``gpu_only`` DirectML;
    ``npu_only`` VitisAI. CPU is always last. Each wanted provider that is not available is
    dropped with a log line ``provider X (for device) not available; falling back``.
    (One ORT session runs one provider chain; distinct prefill/decode devices would need two
    sessions, which this version does not open.)
    """
    if available is None:
        available = ort.get_available_providers()
    out: list[tuple[str, dict[str, Any]]] = []
    for device in _device_order(policy):
        name = DEVICE_PROVIDER[device]
        if name in available:
            out.append((name, provider_options(device, policy)))
        else:
            log.info("provider %s (for %s) not available here; falling back to the next one", name, device)
    if not any(n == "CPUExecutionProvider" for n, _ in out):
        out.append(("CPUExecutionProvider", {}))
    return out


def genai_overlay(policy: Policy, available: list[str] | None = None) -> dict[str, Any]:
    """An ``og.Config.overlay`` JSON document applying the policy to an onnxruntime-genai model.

    Sets ``model.decoder.session_options`` (threads, graph optimisation, memory arena,
    log severity, provider list) in genai_config.json terms.
    """
    r = policy.runtime
    so: dict[str, Any] = {
        "log_id": f"inferos:{policy.name}",
        "enable_cpu_mem_arena": r.enable_cpu_mem_arena,
        "enable_mem_pattern": r.enable_mem_pattern,
        "log_severity_level": r.log_severity,
        "graph_optimization_level": {
            "disable": "ORT_DISABLE_ALL",
            "basic": "ORT_ENABLE_BASIC",
            "extended": "ORT_ENABLE_EXTENDED",
            "all": "ORT_ENABLE_ALL",
        }[r.graph_optimization],
    }
    if r.intra_op_threads:
        so["intra_op_num_threads"] = r.intra_op_threads
    if r.inter_op_threads:
        so["inter_op_num_threads"] = r.inter_op_threads
    provs = []
    for name, opts in execution_providers(policy, available):
        if name == "CPUExecutionProvider":
            continue
        dev = next(d for d, n in DEVICE_PROVIDER.items() if n == name)
        provs.append({GENAI_PROVIDER[dev]: {k: str(v) for k, v in opts.items()}})
    so["provider_options"] = provs
    return {"model": {"decoder": {"session_options": so}}}
