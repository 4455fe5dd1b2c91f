"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this
folder is on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path


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
