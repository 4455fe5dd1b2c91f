"""``GET /v1/metrics/prometheus`` parses with prometheus_client's parser, matches the JSON
metrics, and lives in a private registry (not the process-global one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from lemonade_inferos.agent.server import BackgroundAgent
from lemonade_inferos.types import KVStats, RunStats

TOKEN = "prom-token-" + "p" * 24
NOW = 1_900_000_000.0


@pytest.fixture()
def agent(tmp_path: Path):
    with BackgroundAgent(state_dir=tmp_path, token=TOKEN, clock=lambda: NOW) as a:
        yield a


def post(agent: BackgroundAgent, i: int, **kw) -> None:
    s = RunStats(request_id=f"p{i}", start_time=NOW - 10 + i, end_time=NOW - 9 + i, prompt_tokens=16, generated_tokens=40,
                 ttft_ms=10.0 * (i + 1), total_ms=1000.0, prompt_nll=2.0, peak_rss_bytes=123_000_000, prompt_hash="ab",
                 kv=KVStats(total_bytes=30_000 + i, fp16_bytes=100_000, level_distribution={"L0": 8, "L1": 4, "L3": 2},
                            store="tiered"), **kw)
    r = requests.post(agent.url + "/v1/stats", json={**s.to_dict(), "instance": "prom"}, headers={"X-Inferos-Token": TOKEN})
    assert r.status_code == 201


def families(agent: BackgroundAgent) -> dict:
    r = requests.get(agent.url + "/v1/metrics/prometheus")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(fams: dict, name: str, **labels: str) -> float:
    for s in fams[name].samples:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_exposition_parses_and_matches_json(agent: BackgroundAgent) -> None:
    for i in range(4):
        post(agent, i)
    post(agent, 9, baseline=True)
    fams = families(agent)
    m = requests.get(agent.url + "/v1/metrics").json()
    assert value(fams, "inferos_tokens_per_second") == pytest.approx(m["throughput"]["tokens_per_second"])
    assert value(fams, "inferos_requests_per_second") == pytest.approx(m["throughput"]["requests_per_second"])
    assert value(fams, "inferos_time_to_first_token_seconds", stat="mean") == pytest.approx(
        m["first_token_latency"]["mean_ms"] / 1000)
    assert value(fams, "inferos_request_latency_seconds", stat="0.95") == pytest.approx(m["latency"]["p95_ms"] / 1000)
    assert value(fams, "inferos_kv_cache_bytes") == pytest.approx(m["memory"]["kv_cache_usage_mb"] * 1e6)
    assert value(fams, "inferos_kv_level_tokens", level="L1") == 16  # 4 non-baseline reports x 4 tokens
    assert value(fams, "inferos_reports") == 5
    assert fams["inferos_reports"].type == "counter"
    assert value(fams, "inferos_delta_ppl_estimate") == pytest.approx(m["quality"]["delta_ppl_est"]["delta"])
    assert value(fams, "inferos_device_utilization_ratio", device="cpu") == pytest.approx(
        m["device_utilization"]["cpu_utilization"], abs=1.0)
    # NPU/DML have no numbers on this platform: omitted, not zero
    assert {s.labels["device"] for s in fams["inferos_device_utilization_ratio"].samples} == {"cpu"}
    assert value(fams, "inferos_policy_version") == m["optimization_status"]["policy_version"]


def test_empty_agent_exposition_parses(agent: BackgroundAgent) -> None:
    fams = families(agent)
    assert value(fams, "inferos_tokens_per_second") == 0.0
    assert "inferos_delta_ppl_estimate" not in fams  # null values are omitted


def test_private_registry_not_global(agent: BackgroundAgent) -> None:
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("inferos_") for n in names)
    families(agent)
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("inferos_") for n in names)
