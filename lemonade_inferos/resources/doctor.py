"""``inferos doctor``: what this machine has and what inferos will therefore do.

Reports the onnxruntime build and its execution providers, the telemetry backends (GPU/NPU
drivers and versions, host memory and its cgroup limit, the /dev/inferos driver), runs the
INT8/INT4 capability probes on each provider (:mod:`.capability`), and derives the plan:
the provider chain for the policy, and which KV levels the decode provider can run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..policy import PolicyError, format_size, load_policy


def kv_plan(decode_provider: str, caps: Any) -> dict[str, Any]:
    """KV levels usable on ``decode_provider`` (the guide's quantization fallback rows:
    INT4 fails -> INT8; INT8 fails -> float16) and the policy change that enforces it."""
    int8 = caps.supports(decode_provider, "int8")
    int4 = caps.supports(decode_provider, "int4")
    if int8 and int4:
        return {"levels": ["fp16", "int8", "int4", "evict"], "override": None,
                "why": f"{decode_provider} ran both INT8 and INT4 probes correctly"}
    if int8:
        return {"levels": ["fp16", "int8", "evict"], "override": {"kv": {"level_thresholds": {"L2_int4": 1.0}}},
                "why": f"{decode_provider} failed the INT4 probe: INT4 disabled, INT8 kept"}
    return {"levels": ["fp16"], "override": {"kv": {"mode": "disabled"}},
            "why": f"{decode_provider} failed the INT8 probe: KV quantization disabled"}


def diagnose(policy_spec: str | None = None, probes: bool = True) -> dict[str, Any]:
    """The whole report as a dict (``inferos doctor --json`` prints it)."""
    import onnxruntime as ort

    from .. import ort_options, sysinfo
    from . import Telemetry, device_utilization
    from .capability import Capabilities, check

    policy = load_policy(policy_spec)
    available = ort.get_available_providers()
    versions: dict[str, str | None] = {"onnxruntime": ort.__version__}
    for mod in ("onnxruntime_genai", "numpy", "onnx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    tel = Telemetry().sample()
    chain = [p for p, _ in ort_options.execution_providers(policy, available)]
    caps = check() if probes else Capabilities()
    decode = chain[0]
    plan = {
        "policy": policy.name,
        "provider_chain": chain,
        "wanted_devices": {"prefill": policy.scheduler.prefill_device, "decode": policy.scheduler.decode_device,
                           "mode": policy.scheduler.mode},
        "kv": kv_plan(decode, caps) if probes else {"why": "probes skipped"},
    }
    missing = [d for d in (policy.scheduler.decode_device, policy.scheduler.prefill_device)
               if ort_options.DEVICE_PROVIDER[d] not in available]
    if missing:
        import sys

        row = ("the fallback table's 'DML not detected' row applies: conservative KV thresholds until it returns"
               if sys.platform == "win32" else
               "this onnxruntime build has no such provider, so nothing is lost and KV thresholds stay as set")
        plan["fallback"] = f"{', '.join(sorted(set(missing)))} not available: running on {decode} ({row})"
    from .manager import budget_from_policy
    from .pool import memlock_limit

    budget, how = budget_from_policy(policy, int(tel["host"].extra["available_bytes"]))
    lim = memlock_limit()
    plan["kv_budget"] = {"bytes": budget, "source": how,
                         "pool_locked": lim is None or lim >= budget,
                         "memlock_limit_bytes": lim}
    host = tel["host"]
    return {
        "machine": {k: v for k, v in sysinfo.machine_description().items() if k != "providers"},
        "versions": versions,
        "providers": available,
        "devices": [d.to_dict() for d in tel["devices"]],
        "device_utilization": device_utilization(tel["devices"]),
        "host_memory": host.to_dict(),
        "backends": tel["backends"],
        "driver": tel["driver"],
        "capabilities": caps.to_dict(),
        "plan": plan,
    }


def render(r: dict[str, Any]) -> str:
    lines = [f"onnxruntime {r['versions']['onnxruntime']}, onnxruntime-genai {r['versions']['onnxruntime_genai']}",
             f"providers: {', '.join(r['providers'])}", "", "telemetry sources:"]
    for b in r["backends"]:
        lines.append(f"  {b['source']:15s} {'present, ' + str(b['devices']) + ' device(s)' if b['present'] else 'absent: ' + b['reason']}")
    for d in r["devices"]:
        u = "n/a" if d["utilization_percent"] is None else f"{d['utilization_percent']:.0f} %"
        lines.append(f"  {d['device']}: {d['kind']} {d['name'] or ''} driver {d['driver']} {d['driver_version'] or ''}, busy {u}")
    h = r["host_memory"]
    lines.append(f"host memory: {format_size(h['memory_total_bytes'])} usable, "
                 f"{format_size(h['extra']['available_bytes'])} available ({h['extra']['cgroup']})")
    lines += ["", "capability probes (tiny models, checked against numpy):"]
    for c in r["capabilities"]["results"]:
        lines.append(f"  {c['provider']:28s} {c['probe']}: {'ok' if c['ok'] else 'FAILED ' + c['detail']}")
    p = r["plan"]
    lines += ["", f"what inferos will do (policy {p['policy']!r}):",
              f"  provider chain: {' -> '.join(p['provider_chain'])}"]
    if "fallback" in p:
        lines.append(f"  {p['fallback']}")
    lines.append(f"  KV cache: {p['kv'].get('why')}")
    b = p["kv_budget"]
    lines.append(f"  KV budget (inferos serve): {format_size(b['bytes'])} from {b['source']}; pool "
                 + ("page-locked" if b["pool_locked"] else
                    f"pageable (RLIMIT_MEMLOCK {format_size(b['memlock_limit_bytes'])} is smaller)"))
    if p["kv"].get("levels"):
        lines.append(f"  KV levels: {', '.join(p['kv']['levels'])}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        r = diagnose(args.policy, probes=not args.no_probes)
    except PolicyError as e:
        print(f"inferos doctor: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2, default=str) if args.json else render(r))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="providers, drivers, capability probes, and what inferos will do here",
        description="List onnxruntime's execution providers and versions, the GPU/NPU drivers and memory the "
        "telemetry backends find (sysfs, NVML, DXGI, /dev/inferos), run tiny INT8 (DequantizeLinear) and INT4 "
        "(MatMulNBits, int4 DequantizeLinear) models on each provider, and say which provider chain and KV "
        "levels inferos will use with the given policy.",
        epilog="example: inferos doctor --policy 7b --json > doctor.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policy", default=None, help="preset name or policy file (default: default)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-probes", action="store_true", help="skip the capability probes (faster)")
    p.set_defaults(func=cmd_doctor)
