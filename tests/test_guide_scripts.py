"""The seed guide's monitoring (§3.2), A/B (§6.2) and auto-tuner (§6.1) scripts run
against a live agent with only the token header added; quotas and compact fields survive
an agent restart; resource reports from an inference process reach /v1/metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from lemonade_inferos.agent.server import BackgroundAgent
from lemonade_inferos.types import KVStats, RunStats

SCRIPTS = Path(__file__).parent / "data" / "guide_scripts"
TOKEN = "guide-token-" + "g" * 24
H = {"X-Inferos-Token": TOKEN}


def post_reports(url: str, n: int = 3) -> None:
    now = time.time()
    for i in range(2 * n):
        base = i < n
        s = RunStats(request_id=f"r{i}", model="m", start_time=now - 1.0, end_time=now - 0.5, prompt_tokens=40,
                     generated_tokens=30, ttft_ms=20.0 + i, total_ms=500.0, decode_tps=60.0 + i,
                     prompt_nll=2.0 if base else 2.05, baseline=base, policy_name="baseline" if base else "default",
                     prompt_hash=f"{0xa0 + i % n:x}",  # each prompt ran both ways: ΔPPL compares like with like
                     kv=KVStats(tokens=70, total_bytes=10000, fp16_bytes=40000, blocks=2, store="tiered"),
                     resources=None if base else {
                         "kv_budget": {"total_bytes": 10**6, "reserved_bytes": 5000, "used_bytes": 4000,
                                       "refused_total": 1, "requests_running": 1, "requests_queued": 0},
                         "memory_pool": {"total_bytes": 1 << 20, "used_bytes": 4096, "free_bytes": (1 << 20) - 4096,
                                         "block_count": 1, "fragmentation": 0.0},
                         "scheduler": {"requests_in_flight": 1, "requests_queued": 2},
                         "runtime": {"fallback": {"critical": False, "active": ["memory_pressure"],
                                                  "counters": {"memory_pressure": 1},
                                                  "events": [{"timestamp": now, "kind": "fallback",
                                                              "reason": "memory_pressure", "detail": "x"}]}}})
        r = requests.post(url + "/v1/stats", json={**s.to_dict(), "instance": "host-a"}, headers=H, timeout=10)
        assert r.status_code == 201, r.text


def run_script(name: str, url: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFEROS_AGENT_URL": url, "INFEROS_AGENT_TOKEN": TOKEN,
           "PYTHONPATH": str(SCRIPTS / "fastsleep") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SCRIPTS / name)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def agent(tmp_path):
    with BackgroundAgent(state_dir=tmp_path / "state", token=TOKEN, port=7721) as a:
        post_reports(a.url)
        yield a


def test_monitor_script(agent):
    env = {**os.environ, "INFEROS_AGENT_URL": agent.url, "INFEROS_AGENT_TOKEN": TOKEN,
           "PYTHONPATH": str(SCRIPTS / "fastsleep")}
    p = subprocess.Popen([sys.executable, str(SCRIPTS / "monitor_inferos.py")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = [p.stdout.readline() for _ in range(3)]
    p.kill()
    p.wait(10)
    for ln in lines:
        assert ln.startswith("TPS: ") and "FTL: 22.5ms" in ln and "NPU: 0.0%" in ln, lines


def test_ab_script(agent):
    r = run_script("ab_test_inferos.py", agent.url)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in out[-3:]] == ["Conservative", "Balanced", "Aggressive"]
    assert "Quality=" in out[-1]
    pol = requests.get(agent.url + "/v1/policy", timeout=10).json()
    assert pol["policy"]["name"] == "Aggressive" and pol["policy"]["kv"]["recent_window"] == 32


def test_auto_tuner_script_gets_the_threshold_explanation(agent):
    before = requests.get(agent.url + "/v1/policy", timeout=10).json()
    r = run_script("auto_tuner.py", agent.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("400") and "L1_int8=0.2, L2_int4=0.4, L3_evict=0.6" in r.stdout  # 1 - x of 0.8/0.6/0.4
    assert requests.get(agent.url + "/v1/policy", timeout=10).json() == before  # refused: unchanged


def test_compact_fields_resources_and_history(agent):
    m = requests.get(agent.url + "/v1/metrics", timeout=10).json()
    assert m["tps"] == m["throughput"]["tokens_per_second"] > 0
    assert m["ftl_ms"] == pytest.approx(22.5)  # mean of 20..25
    assert m["quality"]["delta_ppl_est"] == m["quality"]["delta_ppl"]["delta"] > 0
    assert set(m["mem"]) == {"vram_gb", "system_gb", "kv_cache_gb"} and m["mem"]["kv_cache_gb"] == 1e-5
    assert set(m["util"]) == {"npu", "igpu", "cpu"} and "util.npu" in m["compact_notes"]
    assert m["kv_stats"]["total_chunks"] == 6
    res = m["resources"]
    assert res["kv_budget"]["used_bytes"] == 4000 and res["memory_pool"]["block_count"] == 1
    assert res["scheduler"]["requests_running"] == 1 and res["scheduler"]["requests_queued"] == 2
    assert res["fallback"]["per_instance"]["host-a"]["active"] == ["memory_pressure"]
    assert res["events"][0]["reason"] == "memory_pressure" and res["events"][0]["instance"] == "host-a"
    h = requests.get(agent.url + "/v1/history", timeout=10).json()
    assert len(h["history"]) == 6 and {"timestamp", "tps"} <= set(h["history"][0])
    prom = requests.get(agent.url + "/v1/metrics/prometheus", timeout=10).text
    assert 'inferos_fallbacks_total{reason="memory_pressure"} 1.0' in prom
    assert "inferos_kv_budget_used_bytes 4000.0" in prom and "inferos_scheduler_requests_queued 2.0" in prom


def test_baseline_without_body_and_curl_form(agent):
    r = requests.post(agent.url + "/v1/baseline", headers=H, timeout=10)
    assert r.status_code == 200 and r.json()["baseline"] is True
    r = requests.post(agent.url + "/v1/baseline", json={"enable": False}, headers=H, timeout=10)
    assert r.status_code == 200 and r.json()["baseline"] is False
    r = requests.post(agent.url + "/v1/baseline", data='{"enable": false}', headers={
        **H, "Content-Type": "application/x-www-form-urlencoded"}, timeout=10)  # what bare `curl -d` sends
    assert r.status_code == 415  # JSON-only bodies (lemonade_inferos.http_guard: no cross-site form posts)
    r = requests.post(agent.url + "/v1/baseline", data="not json", headers={**H, "Content-Type": "application/json"},
                      timeout=10)
    assert r.status_code == 400
    assert requests.post(agent.url + "/v1/baseline", timeout=10).status_code == 401


def test_quotas_persist_across_agent_restart(tmp_path):
    state = tmp_path / "state"
    with BackgroundAgent(state_dir=state, token=TOKEN, port=7722) as a:
        r = requests.post(a.url + "/v1/quotas", json={"client": "team-a", "max_kv_bytes": 1 << 20,
                                                       "max_concurrent": 2}, headers=H, timeout=10)
        assert r.status_code == 200
        assert requests.post(a.url + "/v1/quotas", json={"client": "x", "max_concurrent": 0}, headers=H,
                             timeout=10).status_code == 422
    from lemonade_inferos.resources.quotas import QuotaStore

    qs = QuotaStore(state / "history.sqlite3")  # an inferos serve sharing the agent's file records usage
    qs.record("team-a", granted=1000, peak=900)
    qs.close()
    with BackgroundAgent(state_dir=state, token=TOKEN, port=7722) as a:
        v = {c["client"]: c for c in requests.get(a.url + "/v1/quotas", timeout=10).json()["clients"]}
    assert v["team-a"]["max_kv_bytes"] == 1 << 20 and v["team-a"]["max_concurrent"] == 2
    assert v["team-a"]["requests"] == 1 and v["team-a"]["peak_kv_bytes"] == 900


def test_status_line_shows_budget_and_fallbacks(agent):
    from lemonade_inferos.agent.cli import status_line

    line = status_line(requests.get(agent.url + "/v1/metrics", timeout=10).json())
    assert "KV budget 0.0/1.0 MB, 1 running 2 queued, 1 refused" in line and "fallback: memory_pressure" in line


def test_runtime_events_reach_the_agent_without_a_request(tmp_path, embedded_model):
    """A fallback event is posted to /v1/events as it happens (the guide's notification
    chain: log, agent event, Prometheus counter), not only inside the next PostRun report."""
    from lemonade_inferos.client import AgentClientPlugin
    from lemonade_inferos.engine import Engine
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.resources import Telemetry
    from lemonade_inferos.runtime import AdaptiveRuntime

    with BackgroundAgent(state_dir=tmp_path / "state", token=TOKEN, port=7723) as a:
        client = AgentClientPlugin(a.url, TOKEN, instance="srv-1")
        eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
        rt = AdaptiveRuntime(eng, Telemetry([], root=tmp_path), agent=client, evaluate=lambda p: None,
                             providers=lambda: ["CPUExecutionProvider"])
        rt.fallback.device_error("DmlExecutionProvider", RuntimeError("device removed"))
        rt.fallback.device_error("DmlExecutionProvider", RuntimeError("device removed"))
        assert client.flush(10)
        ev = requests.get(a.url + "/v1/metrics", timeout=10).json()["resources"]["events"]
        client.close()
    kinds = [(e["instance"], e["kind"], e["reason"]) for e in ev]
    assert ("srv-1", "fallback", "device_error") in kinds and ("srv-1", "notification", "device_error") in kinds
