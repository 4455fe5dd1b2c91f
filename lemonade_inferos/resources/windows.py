"""Windows GPUs/NPUs: DXGI video-memory budgets and the "GPU Engine" / "GPU Adapter Memory"
performance counters (Windows 10 1709+; Windows 11 lists NPUs under the same counters).

* DXGI (``dxgi.dll`` through ctypes COM): ``CreateDXGIFactory1`` ->
  ``IDXGIFactory1::EnumAdapters1`` -> ``IDXGIAdapter1::GetDesc1`` (name, LUID, dedicated
  memory) -> ``QueryInterface(IDXGIAdapter3)`` -> ``QueryVideoMemoryInfo(0,
  DXGI_MEMORY_SEGMENT_GROUP_LOCAL)`` giving ``Budget`` (what the OS lets this process use;
  DirectML works within it) and ``CurrentUsage`` (bytes).
* PDH through pywin32 (``win32pdh``): ``\\GPU Engine(*)\\Utilization Percentage`` with
  instances ``pid_<pid>_luid_<hi>_<lo>_phys_<n>_eng_<n>_engtype_<type>`` and
  ``\\GPU Adapter Memory(*)\\Dedicated Usage`` / ``Shared Usage`` with instances
  ``luid_<hi>_<lo>_phys_<n>``. Utilisation of an adapter is, as Task Manager shows it, the
  busiest engine's sum over processes (capped at 100).

The aggregation functions are pure and tested on recorded counter samples; the API calls
are written against the documented interfaces and are untested on hardware (these
machines run Linux).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from typing import Any

from .snapshot import BackendStatus, Snapshot

SOURCE = "windows"
_ENGINE = re.compile(r"pid_(\d+)_luid_(0x[0-9a-fA-F]+)_(0x[0-9a-fA-F]+)_phys_(\d+)_eng_(\d+)_engtype_(.*)$")
_ADAPTER = re.compile(r"luid_(0x[0-9a-fA-F]+)_(0x[0-9a-fA-F]+)_phys_(\d+)$")
ENGINE_COUNTER = r"\GPU Engine(*)\Utilization Percentage"
MEMORY_COUNTERS = {"dedicated": r"\GPU Adapter Memory(*)\Dedicated Usage",
                   "shared": r"\GPU Adapter Memory(*)\Shared Usage"}


def luid_key(high: str | int, low: str | int) -> str:
    """Canonical LUID text ``0xHHHHHHHH_0xLLLLLLLL`` (counter instances and DXGI agree)."""
    h = int(high, 16) if isinstance(high, str) else high
    lo = int(low, 16) if isinstance(low, str) else low
    return f"0x{h & 0xFFFFFFFF:08X}_0x{lo & 0xFFFFFFFF:08X}"


def aggregate_engine_utilization(samples: dict[str, float]) -> dict[str, dict[str, Any]]:
    """``{instance: percent}`` of ``GPU Engine`` -> ``{luid: {"percent", "by_engtype"}}``.

    Per (adapter, physical engine) the processes' percentages are summed; the adapter's
    utilisation is its busiest engine, capped at 100. Unparsable instances are ignored.
    """
    per_engine: dict[tuple[str, str, str], float] = defaultdict(float)
    engtype: dict[tuple[str, str, str], str] = {}
    for inst, v in samples.items():
        m = _ENGINE.match(inst)
        if not m:
            continue
        key = (luid_key(m.group(2), m.group(3)), m.group(4), m.group(5))
        per_engine[key] += float(v)
        engtype[key] = m.group(6)
    out: dict[str, dict[str, Any]] = {}
    for (luid, _, _), v in per_engine.items():
        out.setdefault(luid, {"percent": 0.0, "by_engtype": {}})
    for key, v in per_engine.items():
        d = out[key[0]]
        d["percent"] = min(100.0, max(d["percent"], v))
        t = engtype[key]
        d["by_engtype"][t] = min(100.0, max(d["by_engtype"].get(t, 0.0), v))
    return out


def aggregate_adapter_memory(dedicated: dict[str, float], shared: dict[str, float]) -> dict[str, dict[str, int]]:
    """``GPU Adapter Memory`` samples -> ``{luid: {"dedicated_bytes", "shared_bytes"}}``
    (summed over physical adapters of one LUID)."""
    out: dict[str, dict[str, int]] = {}
    for kind, samples in (("dedicated_bytes", dedicated), ("shared_bytes", shared)):
        for inst, v in samples.items():
            m = _ADAPTER.match(inst)
            if not m:
                continue
            d = out.setdefault(luid_key(m.group(1), m.group(2)), {"dedicated_bytes": 0, "shared_bytes": 0})
            d[kind] += int(v)
    return out


def build_snapshots(adapters: list[dict[str, Any]], engines: dict[str, dict[str, Any]],
                    memory: dict[str, dict[str, int]], counters_reason: str = "") -> list[Snapshot]:
    """Join DXGI adapters (dicts with ``luid``, ``name``, ``budget_bytes``, ``usage_bytes``,
    ``dedicated_video_memory``, optional ``driver_version``) with counter aggregates.

    Memory: used = DXGI ``CurrentUsage`` (else the counters' dedicated usage), total = DXGI
    ``Budget`` (else ``DedicatedVideoMemory``). Counter-only LUIDs (e.g. an NPU that DXGI
    does not enumerate) become ``kind="npu"`` snapshots with utilisation only.
    """
    out = []
    seen = set()
    for i, a in enumerate(adapters):
        luid = a["luid"]
        seen.add(luid)
        s = Snapshot(device=f"dxgi{i}", kind="gpu", source=SOURCE, name=a.get("name"),
                     driver=a.get("driver"), driver_version=a.get("driver_version"))
        s.extra["luid"] = luid
        e = engines.get(luid)
        if e is not None:
            s.utilization_percent = round(e["percent"], 3)
            s.extra["by_engtype"] = e["by_engtype"]
        else:
            s.unavailable["utilization_percent"] = counters_reason or "no GPU Engine counter instance for this LUID"
        mem = memory.get(luid, {})
        s.memory_used_bytes = a.get("usage_bytes", mem.get("dedicated_bytes"))
        s.memory_total_bytes = a.get("budget_bytes") or a.get("dedicated_video_memory")
        if "budget_bytes" in a:
            s.extra["dxgi_budget_bytes"] = a["budget_bytes"]
        if mem:
            s.extra["shared_usage_bytes"] = mem["shared_bytes"]
        s.explain_missing("neither DXGI nor the performance counters reported it")
        out.append(s)
    for luid, e in engines.items():
        if luid in seen:
            continue
        s = Snapshot(device=f"luid{luid}", kind="npu", source=SOURCE, utilization_percent=round(e["percent"], 3))
        s.extra.update(luid=luid, by_engtype=e["by_engtype"])
        s.explain_missing("only the GPU Engine counters list this adapter (not DXGI)")
        out.append(s)
    return out


def dxgi_adapters() -> list[dict[str, Any]]:  # pragma: no cover - Windows only
    """Enumerate adapters with DXGI 1.4 (see module docstring). Untested on hardware."""
    import ctypes
    from ctypes import wintypes

    class GUID(ctypes.Structure):
        _fields_ = [("d1", ctypes.c_uint32), ("d2", ctypes.c_uint16), ("d3", ctypes.c_uint16), ("d4", ctypes.c_ubyte * 8)]

    def guid(s: str) -> GUID:
        import uuid

        b = uuid.UUID(s).bytes_le
        return GUID.from_buffer_copy(b)

    class LUID(ctypes.Structure):
        _fields_ = [("LowPart", wintypes.DWORD), ("HighPart", wintypes.LONG)]

    class DESC1(ctypes.Structure):
        _fields_ = [("Description", ctypes.c_wchar * 128), ("VendorId", ctypes.c_uint), ("DeviceId", ctypes.c_uint),
                    ("SubSysId", ctypes.c_uint), ("Revision", ctypes.c_uint),
                    ("DedicatedVideoMemory", ctypes.c_size_t), ("DedicatedSystemMemory", ctypes.c_size_t),
                    ("SharedSystemMemory", ctypes.c_size_t), ("AdapterLuid", LUID), ("Flags", ctypes.c_uint)]

    class VMINFO(ctypes.Structure):
        _fields_ = [("Budget", ctypes.c_uint64), ("CurrentUsage", ctypes.c_uint64),
                    ("AvailableForReservation", ctypes.c_uint64), ("CurrentReservation", ctypes.c_uint64)]

    def method(obj: ctypes.c_void_p, index: int, *argtypes: Any) -> Any:
        vtbl = ctypes.cast(obj, ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p))).contents
        return ctypes.WINFUNCTYPE(ctypes.HRESULT, ctypes.c_void_p, *argtypes)(vtbl[index])

    dxgi = ctypes.WinDLL("dxgi")
    factory = ctypes.c_void_p()
    iid_factory1 = guid("770aae78-f26f-4dba-a829-253c83d1b387")
    dxgi.CreateDXGIFactory1(ctypes.byref(iid_factory1), ctypes.byref(factory))
    iid_adapter3 = guid("645967a4-1392-4310-a798-8053ce3e93fd")
    out = []
    i = 0
    while True:
        adapter = ctypes.c_void_p()
        try:  # IDXGIFactory1::EnumAdapters1 (vtable 12); DXGI_ERROR_NOT_FOUND ends the list
            method(factory, 12, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p))(factory, i, ctypes.byref(adapter))
        except OSError:
            break
        desc = DESC1()
        method(adapter, 10, ctypes.POINTER(DESC1))(adapter, ctypes.byref(desc))  # GetDesc1
        a: dict[str, Any] = {"name": desc.Description, "luid": luid_key(desc.AdapterLuid.HighPart, desc.AdapterLuid.LowPart),
                             "dedicated_video_memory": int(desc.DedicatedVideoMemory),
                             "vendor_id": desc.VendorId, "software": bool(desc.Flags & 2)}
        a3 = ctypes.c_void_p()
        try:  # IUnknown::QueryInterface (0) -> IDXGIAdapter3::QueryVideoMemoryInfo (14)
            method(adapter, 0, ctypes.POINTER(GUID), ctypes.POINTER(ctypes.c_void_p))(adapter, ctypes.byref(iid_adapter3), ctypes.byref(a3))
            info = VMINFO()
            method(a3, 14, ctypes.c_uint, ctypes.c_int, ctypes.POINTER(VMINFO))(a3, 0, 0, ctypes.byref(info))
            a["budget_bytes"], a["usage_bytes"] = int(info.Budget), int(info.CurrentUsage)
            method(a3, 2)(a3)  # Release
        except OSError:
            pass
        method(adapter, 2)(adapter)
        if not a["software"]:
            out.append(a)
        i += 1
    method(factory, 2)(factory)
    return out


def pdh_sample(paths: dict[str, str], interval_s: float = 0.1) -> dict[str, dict[str, float]]:  # pragma: no cover
    """Collect wildcard PDH counters twice ``interval_s`` apart (rate counters need two
    samples) -> ``{key: {instance: value}}``. Untested on hardware."""
    import time

    import win32pdh  # type: ignore[import-not-found]

    q = win32pdh.OpenQuery()
    try:
        hs = {k: win32pdh.AddEnglishCounter(q, p) for k, p in paths.items()}
        win32pdh.CollectQueryData(q)
        time.sleep(interval_s)
        win32pdh.CollectQueryData(q)
        return {k: dict(win32pdh.GetFormattedCounterArray(h, win32pdh.PDH_FMT_DOUBLE)) for k, h in hs.items()}
    finally:
        win32pdh.CloseQuery(q)


class WindowsBackend:
    """DXGI + performance counters; on other systems ``status()`` says "not Windows"."""

    source = SOURCE

    def status(self) -> BackendStatus:
        if sys.platform != "win32":
            return BackendStatus(SOURCE, False, "not Windows")
        try:
            n = len(dxgi_adapters())
        except Exception as e:  # pragma: no cover
            return BackendStatus(SOURCE, False, f"DXGI failed: {e}")
        return BackendStatus(SOURCE, n > 0, "" if n else "DXGI lists no hardware adapter", devices=n)  # pragma: no cover

    def sample(self) -> list[Snapshot]:
        if sys.platform != "win32":
            return []
        adapters = dxgi_adapters()  # pragma: no cover
        reason = ""  # pragma: no cover
        try:  # pragma: no cover
            c = pdh_sample({"engine": ENGINE_COUNTER, **MEMORY_COUNTERS})
            engines = aggregate_engine_utilization(c["engine"])
            memory = aggregate_adapter_memory(c["dedicated"], c["shared"])
        except ImportError:  # pragma: no cover
            engines, memory, reason = {}, {}, "pywin32 (win32pdh) is not installed"
        except Exception as e:  # pragma: no cover
            engines, memory, reason = {}, {}, f"performance counters failed: {e}"
        return build_snapshots(adapters, engines, memory, reason)  # pragma: no cover
