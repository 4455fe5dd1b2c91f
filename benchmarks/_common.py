"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this
folder is on ``sys.path``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable


def code_state() -> dict:
    """Which code was measured: git HEAD, modified tracked files, and a hash of the KV/model
    sources (the tiered store is under active development; results are tied to it)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    state: dict = {}
    try:
        state["git_head"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, check=False,
                                           text=True, timeout=10).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True, timeout=10, check=False).stdout
        state["modified"] = sorted(line[3:] for line in st.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha256()
    for sub in ("lemonade_inferos/kv", "lemonade_inferos/model", "lemonade_inferos/engine"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.read_bytes())
    state["kv_model_engine_sources_sha256"] = h.hexdigest()[:16]
    return state


def write_results(out: dict, json_path: str | Path, plot_path: str | Path | None,
                  plot: Callable[[dict, Path], None]) -> None:
    """Write ``out`` as JSON to ``json_path`` and the plot (if a path is given), saying where."""
    p = Path(json_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {p}")
    if plot_path:
        plot(out, Path(plot_path))
        print(f"plot: {plot_path}")
    print(f"total {out['seconds']:.0f} s")


def time_store_updates(cache: Any) -> list[float]:
    """Wrap ``cache.update`` so the seconds it spends accumulate in the returned one-item
    list (reset it with ``acc[0] = 0.0``)."""
    acc = [0.0]
    orig = cache.update

    def timed_update(outputs: Any, n: int) -> None:
        t0 = time.perf_counter()
        orig(outputs, n)
        acc[0] += time.perf_counter() - t0

    cache.update = timed_update
    return acc


def print_code_and_targets(out: dict, *, width: int, fmt: str) -> None:
    """Print which code was measured and the PASS/FAIL target lines of ``out``."""
    c = out.get("code", {})
    print(f"code: HEAD {c.get('git_head', '?')[:7]}" + (f" + uncommitted changes in {', '.join(c['modified'])}"
                                                         if c.get("modified") else " (clean)")
          + f"; sources sha {c.get('kv_model_engine_sources_sha256', '?')}")
    if out.get("targets"):
        print("\ntargets:")
        for t in out["targets"]:
            print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']:{width}s} measured {t['value']:{fmt}}")
