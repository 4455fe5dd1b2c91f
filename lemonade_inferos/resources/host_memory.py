"""Usable host memory: ``/proc/meminfo`` capped by the cgroup memory limit (containers).

* ``proc/meminfo``: ``MemTotal`` / ``MemAvailable`` in kB (``Documentation/filesystems/proc.rst``).
* cgroup v2 (``Documentation/admin-guide/cgroup-v2.rst``): the process's group is the
  ``0::/path`` line of ``proc/self/cgroup``; ``sys/fs/cgroup/<path>/memory.max`` is bytes or
  ``max``; ``memory.current`` is bytes in use.
* cgroup v1 fallback: the ``memory`` controller line; ``memory.limit_in_bytes`` /
  ``memory.usage_in_bytes`` (a limit near 2^63 means none). When the group's directory is not
  visible (a container's own namespace) the controller's mount root is read instead.

The usable total is ``min(MemTotal, limit)`` and the available bytes
``min(MemAvailable, limit - usage)``, so a 2 GiB container on a 64 GiB host reads 2 GiB.
Off Linux (no ``proc/meminfo``) psutil's virtual memory is used.
"""

from __future__ import annotations

from pathlib import Path

from .snapshot import Snapshot

UNLIMITED = 1 << 62


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def parse_meminfo(text: str) -> dict[str, int]:
    """``Key:   123 kB`` lines -> bytes (lines without a unit are counts, kept as is)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            v = int(parts[0])
        except ValueError:
            continue
        out[k.strip()] = v * 1024 if len(parts) > 1 and parts[1].lower() == "kb" else v
    return out


def cgroup_memory(root: str | Path = "/") -> tuple[int | None, int | None, str]:
    """``(limit_bytes or None, usage_bytes or None, description)`` of this process's cgroup."""
    root = Path(root)
    lines = (_read(root / "proc/self/cgroup") or "").splitlines()
    v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    v1 = next((ln.split(":", 2)[2] for ln in lines if len(ln.split(":", 2)) == 3 and "memory" in ln.split(":")[1].split(",")), None)
    if v1 is not None:
        base = root / "sys/fs/cgroup/memory"
        for d in (base / v1.lstrip("/"), base):
            lim = _read(d / "memory.limit_in_bytes")
            if lim is not None:
                use = _read(d / "memory.usage_in_bytes")
                limit = int(lim) if lim.isdigit() and int(lim) < UNLIMITED else None
                return limit, (int(use) if use and use.isdigit() else None), f"cgroup v1 {d}"
    if v2 is not None:
        for base in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
            d = base / v2.lstrip("/")
            mx = _read(d / "memory.max")
            if mx is not None:
                cur = _read(d / "memory.current")
                limit = int(mx) if mx.isdigit() and int(mx) < UNLIMITED else None
                return limit, (int(cur) if cur and cur.isdigit() else None), f"cgroup v2 {d}"
    return None, None, "no cgroup memory controller found"


def host_memory(root: str | Path = "/") -> Snapshot:
    """Snapshot ``kind="host"``: total = usable bytes, used = total - available.

    ``extra`` holds ``mem_total_bytes``, ``mem_available_bytes``, ``cgroup_limit_bytes``,
    ``cgroup_usage_bytes`` and ``cgroup`` (where the limit came from).
    """
    root = Path(root)
    text = _read(root / "proc/meminfo")
    snap = Snapshot(device="host", kind="host", source="proc", name="system memory")
    if text is None:
        import psutil

        vm = psutil.virtual_memory()
        total, avail = int(vm.total), int(vm.available)
        snap.source = "psutil"
    else:
        mi = parse_meminfo(text)
        total = mi.get("MemTotal", 0)
        avail = mi.get("MemAvailable", mi.get("MemFree", 0))
    limit, usage, where = cgroup_memory(root) if text is not None else (None, None, "not Linux")
    snap.extra.update(mem_total_bytes=total, mem_available_bytes=avail, cgroup_limit_bytes=limit,
                      cgroup_usage_bytes=usage, cgroup=where)
    if limit is not None:
        total = min(total, limit)
        if usage is not None:
            avail = min(avail, max(0, limit - usage))
    snap.memory_total_bytes = total
    snap.memory_used_bytes = max(0, total - avail)
    snap.extra["available_bytes"] = min(avail, total)
    snap.explain_missing("not applicable to host memory")
    return snap
