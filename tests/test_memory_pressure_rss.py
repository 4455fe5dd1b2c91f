"""Budget adherence and resident memory under six concurrent 544-token requests, on the
synthetic Llama-shaped model, each arm in its own process (benchmarks/memory_pressure.py's worker):
with the resource manager the live KV never passes the budget, every request completes,
and the process grows less above idle than the same store without admission."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "memory_pressure.py"

pytestmark = pytest.mark.slow


def _arm(arm: str, folder: Path, budget: int) -> dict:
    r = subprocess.run([sys.executable, str(BENCH), "--arm", arm, "--model-dir", str(folder), "--budget", str(budget),
                        "--chats", "6", "--prompt", "512", "--new", "32", "--timeout", "120"],
                       capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "INFEROS_AGENT_URL": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_budget_and_rss_under_concurrent_long_requests():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from synthetic_model import ensure_synthetic_model
    finally:
        sys.path.pop(0)
    from lemonade_inferos.model.spec import DecoderSpec

    from lemonade_inferos.policy import load_policy
    from lemonade_inferos.resources.budget import kv_bytes_estimate

    folder = ensure_synthetic_model("small")
    spec = DecoderSpec.from_folder(folder)
    one = kv_bytes_estimate(spec, load_policy("default"), 544, prompt_tokens=512).want
    budget = int(one * 1.3)  # room for one request at a time; six compete
    assert budget < spec.kv_bytes_per_token(2) * 544 * 6  # below the six chats' float16 KV
    rm = _arm("tiered_rm", folder, budget)
    free = _arm("tiered_no_rm", folder, budget)
    assert rm["completed"] == 6 and rm["refused"] == 0
    assert rm["peak_live_kv_bytes"] <= budget < free["peak_live_kv_bytes"]
    assert rm["admission"]["peak_reserved_bytes"] <= budget
    grow_rm = rm["peak_rss_bytes"] - rm["idle_rss_bytes"]
    grow_free = free["peak_rss_bytes"] - free["idle_rss_bytes"]
    assert grow_rm < grow_free, (grow_rm, grow_free)
