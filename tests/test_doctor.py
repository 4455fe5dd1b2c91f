"""``inferos doctor`` and the capability probes on the real CPU provider."""

from __future__ import annotations

import json

from lemonade_inferos.cli import main
from lemonade_inferos.resources.capability import Capabilities, ProbeResult, run_probe
from lemonade_inferos.resources.doctor import kv_plan


def test_probes_run_on_cpu_and_fail_clearly_on_absent_provider():
    for probe in ("int8", "int4"):
        r = run_probe("CPUExecutionProvider", probe)
        assert r.ok, r.detail
    bad = run_probe("DmlExecutionProvider", "int8")
    assert not bad.ok and bad.detail  # not available here: the reason is kept


def test_kv_plan_steps_back_int4_then_int8():
    caps = Capabilities([ProbeResult("X", "int8", True), ProbeResult("X", "int4", False)])
    assert kv_plan("X", caps)["override"] == {"kv": {"level_thresholds": {"L2_int4": 1.0}}}
    caps = Capabilities([ProbeResult("X", "int8", False), ProbeResult("X", "int4", False)])
    assert kv_plan("X", caps)["override"] == {"kv": {"mode": "disabled"}}


def test_doctor_cli_json(capsys):
    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "CPUExecutionProvider" in r["providers"]
    assert r["plan"]["provider_chain"][-1] == "CPUExecutionProvider"
    assert {c["probe"] for c in r["capabilities"]["results"]} == {"int8", "int4"}
    assert r["host_memory"]["memory_total_bytes"] > 0
    assert main(["doctor", "--policy", "nope"]) == 2
