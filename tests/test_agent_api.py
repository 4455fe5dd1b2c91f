"""The agent's HTTP API against a real uvicorn server on loopback: auth, policy, baseline,
config, stats validation, error shape, security headers, token storage, bind rules."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from lemonade_inferos.agent import auth, server
from lemonade_inferos.agent.server import BackgroundAgent, BindError, check_bind
from lemonade_inferos.policy import baseline_policy, load_policy
from lemonade_inferos.types import KVStats, RunStats

TOKEN = "test-token-" + "k" * 24
AUTH = {"X-Inferos-Token": TOKEN}


@pytest.fixture()
def agent(tmp_path: Path):
    with BackgroundAgent(state_dir=tmp_path / "state", token=TOKEN) as a:
        yield a


def stats_body(i: int = 0, **over) -> dict:
    now = time.time()
    s = RunStats(request_id=f"req-{i}", model="m", start_time=now - 1, end_time=now, prompt_tokens=12, generated_tokens=32,
                 ttft_ms=15.0, total_ms=1000.0, decode_tps=33.0, peak_rss_bytes=200_000_000, prompt_nll=2.5,
                 kv=KVStats(tokens=44, total_bytes=50_000, fp16_bytes=150_000, level_distribution={"L0": 20, "L2": 24},
                            store="tiered"))
    return {**s.to_dict(), "instance": "test-1", **over}


def assert_error(resp: requests.Response, code: int) -> dict:
    assert resp.status_code == code, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


MUTATING = [
    ("/v1/policy", {"kv": {"recent_window": 128}}),
    ("/v1/baseline", {"enable": True}),
    ("/v1/config", {"window_seconds": 30}),
    ("/v1/stats", None),  # filled per test
]


@pytest.mark.parametrize("path,body", MUTATING)
def test_mutating_endpoints_need_the_right_token(agent: BackgroundAgent, path: str, body: dict | None) -> None:
    body = body if body is not None else stats_body()
    before = requests.get(agent.url + "/v1/policy").json()
    err = assert_error(requests.post(agent.url + path, json=body), 401)
    assert "X-Inferos-Token" in err["message"]
    assert_error(requests.post(agent.url + path, json=body, headers={"X-Inferos-Token": TOKEN + "x"}), 401)
    assert_error(requests.post(agent.url + path, json=body, headers={"X-Inferos-Token": ""}), 401)
    # nothing changed while unauthenticated
    assert requests.get(agent.url + "/v1/policy").json() == before
    assert requests.get(agent.url + "/v1/history").json()["count"] == 0
    ok = requests.post(agent.url + path, json=body, headers=AUTH)
    assert ok.status_code in (200, 201), ok.text


def test_unauthenticated_invalid_body_gets_401_not_validation_details(agent: BackgroundAgent) -> None:
    assert_error(requests.post(agent.url + "/v1/stats", json={"nonsense": 1}), 401)


def test_get_endpoints_are_open_and_carry_security_headers(agent: BackgroundAgent) -> None:
    for path in ("/v1/health", "/v1/metrics", "/v1/policy", "/v1/policy/schema", "/v1/config", "/v1/history",
                 "/v1/metrics/prometheus", "/openapi.json", "/dashboard"):
        r = requests.get(agent.url + path, headers={"Origin": "http://evil.example"})
        assert r.status_code == 200, path
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    h = requests.get(agent.url + "/v1/health").json()
    assert h["status"] == "healthy" and h["policy_version"] >= 1
    # CORS preflight is not granted
    pre = requests.options(agent.url + "/v1/policy", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}


def test_policy_update_merges_partial_and_bumps_version(agent: BackgroundAgent) -> None:
    v0 = requests.get(agent.url + "/v1/policy").json()
    assert v0["policy"] == load_policy("default").to_dict()
    r = requests.post(agent.url + "/v1/policy", json={"kv": {"recent_window": 128}}, headers=AUTH)
    assert r.status_code == 200
    v1 = r.json()
    assert v1["version"] == v0["version"] + 1
    assert v1["policy"]["kv"]["recent_window"] == 128
    assert v1["policy"]["kv"]["sink_tokens"] == v0["policy"]["kv"]["sink_tokens"]  # merged, not replaced
    assert v1["effective"] == v1["policy"]
    # the seed's infer_os root and size strings are accepted
    r = requests.post(agent.url + "/v1/policy", json={"infer_os": {"io": {"dml_pool_bytes": "4GiB"}}}, headers=AUTH)
    assert r.json()["policy"]["io"]["dml_pool_bytes"] == 4 * 1024**3
    assert r.json()["version"] == v1["version"] + 1


@pytest.mark.parametrize(
    "doc,field",
    [
        ({"kv": {"recent_window": 1000}}, "kv.recent_window"),
        ({"kv": {"mode": "turbo"}}, "kv.mode"),
        ({"kv": {"level_thresholds": {"L1_int8": 0.9, "L2_int4": 0.1}}}, "kv.level_thresholds"),
        ({"io": {"dml_pool_bytes": "lots"}}, "io.dml_pool_bytes"),
        ({"bogus": 1}, "bogus"),
        ({"quality": {"max_delta_ppl": -1}}, "quality.max_delta_ppl"),
    ],
)
def test_bad_policy_is_400_names_the_field_and_changes_nothing(agent: BackgroundAgent, doc: dict, field: str) -> None:
    before = requests.get(agent.url + "/v1/policy").json()
    err = assert_error(requests.post(agent.url + "/v1/policy", json=doc, headers=AUTH), 400)
    fields = [d["field"] for d in err["details"]]
    assert any(f.startswith(field) for f in fields), fields
    assert all({"field", "value", "message"} <= set(d) for d in err["details"])
    assert field.split(".")[0] in err["message"]
    assert requests.get(agent.url + "/v1/policy").json() == before


def test_non_object_policy_body_is_422_in_error_shape(agent: BackgroundAgent) -> None:
    before = requests.get(agent.url + "/v1/policy").json()
    assert_error(requests.post(agent.url + "/v1/policy", json=[1, 2], headers=AUTH), 422)
    assert_error(requests.post(agent.url + "/v1/policy", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}), 422)
    assert requests.get(agent.url + "/v1/policy").json() == before


def test_baseline_mode_switches_effective_policy(agent: BackgroundAgent) -> None:
    v0 = requests.get(agent.url + "/v1/policy").json()["version"]
    on = requests.post(agent.url + "/v1/baseline", json={"enable": True}, headers=AUTH).json()
    assert on["baseline"] is True and on["version"] == v0 + 1
    assert on["effective"] == baseline_policy().to_dict()
    assert on["policy"]["name"] == "default"  # kept for when baseline ends
    again = requests.post(agent.url + "/v1/baseline", json={"enable": True}, headers=AUTH).json()
    assert again["version"] == v0 + 1  # no change, no bump
    m = requests.get(agent.url + "/v1/metrics").json()
    assert m["optimization_status"]["baseline_mode"] is True
    assert m["optimization_status"]["current_policy"] == "baseline"
    off = requests.post(agent.url + "/v1/baseline", json={"enable": False}, headers=AUTH).json()
    assert off["baseline"] is False and off["version"] == v0 + 2
    assert_error(requests.post(agent.url + "/v1/baseline", json={"enable": "yes"}, headers=AUTH), 422)
    assert_error(requests.post(agent.url + "/v1/baseline", json={}, headers=AUTH), 422)


def test_config_update_and_errors(agent: BackgroundAgent) -> None:
    c0 = requests.get(agent.url + "/v1/config").json()
    assert c0["config"]["window_seconds"] == 60.0
    err = assert_error(requests.post(agent.url + "/v1/config", json={"window_seconds": 0}, headers=AUTH), 400)
    assert err["details"][0]["field"] == "window_seconds" and err["details"][0]["value"] == 0
    err = assert_error(requests.post(agent.url + "/v1/config", json={"windw": 5}, headers=AUTH), 400)
    assert "unknown field" in err["details"][0]["message"]
    assert requests.get(agent.url + "/v1/config").json() == c0
    r = requests.post(agent.url + "/v1/config", json={"window_seconds": 5}, headers=AUTH)
    assert r.json()["config"]["window_seconds"] == 5.0
    assert requests.get(agent.url + "/v1/metrics").json()["measurement_window"]["duration_seconds"] == 5.0


def test_stats_accepted_and_visible_in_metrics_and_history(agent: BackgroundAgent) -> None:
    for i in range(3):
        r = requests.post(agent.url + "/v1/stats", json=stats_body(i), headers=AUTH)
        assert r.status_code == 201 and r.json()["accepted"] and not r.json()["duplicate"]
    m = requests.get(agent.url + "/v1/metrics").json()
    assert m["measurement_window"]["sample_count"] == 3
    assert m["throughput"]["generated_tokens"] == 96
    assert m["first_token_latency"]["mean_ms"] == 15.0
    assert m["memory"]["kv_cache_usage_mb"] == 0.05
    assert m["kv_stats"]["level_distribution"] == {"L0": 60, "L2": 72}
    assert m["optimization_status"]["kv_quantization_active"] is True
    assert m["counters"]["reports_total"] == 3
    h = requests.get(agent.url + "/v1/history", params={"limit": 2}).json()
    assert h["count"] == 2 and h["total_stored"] == 3
    assert [it["stats"]["request_id"] for it in h["items"]] == ["req-1", "req-2"]  # newest 2, oldest first


def test_retry_of_same_request_is_not_counted_twice(agent: BackgroundAgent) -> None:
    body = stats_body(7)
    first = requests.post(agent.url + "/v1/stats", json=body, headers=AUTH).json()
    second = requests.post(agent.url + "/v1/stats", json=body, headers=AUTH).json()
    assert second == {"id": first["id"], "accepted": True, "duplicate": True}
    assert requests.get(agent.url + "/v1/metrics").json()["counters"]["reports_total"] == 1


@pytest.mark.parametrize(
    "over,field",
    [
        ({"end_time": 1.0}, "end_time"),
        ({"generated_tokens": -1}, "generated_tokens"),
        ({"instance": ""}, "instance"),
        ({"instance": "bad id with spaces"}, "instance"),
        ({"ttft_ms": "fast"}, "ttft_ms"),
        ({"kv": {"total_bytes": 2**70}}, "kv.total_bytes"),
        ({"prompt_nll": float("nan")}, "prompt_nll"),
        ({"start_time": float("inf")}, "start_time"),
    ],
)
def test_invalid_stats_get_422_naming_the_field(agent: BackgroundAgent, over: dict, field: str) -> None:
    body = stats_body(**over)
    data = json.dumps(body)  # allow_nan: sends NaN/Infinity literals like a sloppy client would
    err = assert_error(requests.post(agent.url + "/v1/stats", data=data, headers={**AUTH, "Content-Type": "application/json"}), 422)
    assert any(d["field"] == field for d in err["details"]), err["details"]
    assert requests.get(agent.url + "/v1/history").json()["count"] == 0


def test_missing_instance_is_rejected(agent: BackgroundAgent) -> None:
    body = stats_body()
    del body["instance"]
    err = assert_error(requests.post(agent.url + "/v1/stats", json=body, headers=AUTH), 422)
    assert err["details"][0]["field"] == "instance"


def test_history_limit_bounds(agent: BackgroundAgent) -> None:
    for bad in ("0", "-3", "10001", "abc"):
        err = assert_error(requests.get(agent.url + "/v1/history", params={"limit": bad}), 422)
        assert err["details"][0]["field"] == "limit"


def test_body_limit_and_host_check(agent: BackgroundAgent) -> None:
    big = b'{"kv": {"x": "' + b"a" * (1024 * 1024 + 10) + b'"}}'
    assert_error(requests.post(agent.url + "/v1/policy", data=big, headers={**AUTH, "Content-Type": "application/json"}), 413)
    chunked = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length
    assert_error(requests.post(agent.url + "/v1/policy", data=chunked, headers={**AUTH, "Content-Type": "application/json"}), 413)
    err = assert_error(requests.get(agent.url + "/v1/metrics", headers={"Host": "evil.example:7031"}), 421)
    assert "evil.example" in err["details"]
    assert requests.get(agent.url + "/v1/health", headers={"Host": f"localhost:{agent.port}"}).status_code == 200


def test_unknown_path_and_method_use_error_shape(agent: BackgroundAgent) -> None:
    assert_error(requests.get(agent.url + "/v1/nope"), 404)
    assert_error(requests.delete(agent.url + "/v1/policy", headers=AUTH), 405)


def test_policy_schema_is_a_json_schema_the_policy_satisfies(agent: BackgroundAgent) -> None:
    schema = requests.get(agent.url + "/v1/policy/schema").json()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(requests.get(agent.url + "/v1/policy").json()["policy"], schema)
    openapi = requests.get(agent.url + "/openapi.json").json()
    for path in ("/v1/health", "/v1/metrics", "/v1/metrics/prometheus", "/v1/policy", "/v1/policy/schema",
                 "/v1/baseline", "/v1/config", "/v1/history", "/v1/stats"):
        assert path in openapi["paths"], path


def test_metrics_document_has_the_seed_sections(agent: BackgroundAgent) -> None:
    m = requests.get(agent.url + "/v1/metrics").json()
    for key in ("timestamp", "measurement_window", "throughput", "latency", "first_token_latency", "quality", "memory",
                "kv_stats", "device_utilization", "optimization_status"):
        assert key in m, key
    assert set(m["throughput"]) >= {"tokens_per_second", "requests_per_second"}
    assert set(m["latency"]) >= {"mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms"}
    assert set(m["first_token_latency"]) >= {"mean_ms", "median_ms", "p95_ms"}
    assert set(m["quality"]) == {"delta_ppl_est", "delta_ppl", "accept_rate"}
    assert set(m["memory"]) >= {"kv_cache_usage_mb", "total_allocated_mb", "peak_usage_mb"}
    assert set(m["kv_stats"]) >= {"level_distribution", "compression_ratio"}
    dev = m["device_utilization"]
    assert 0.0 <= dev["cpu_utilization"] <= 1.0
    assert dev["npu_utilization"] is None and dev["notes"]["npu_utilization"] == "not available on this platform"
    assert dev["dml_utilization"] is None


def test_resource_provider_seam(tmp_path: Path) -> None:
    def provider() -> dict:
        return {"device_utilization": {"npu": 0.5, "dml": 0.25},
                "memory_pool": {"total_bytes": 256_000_000, "used_bytes": 64_000_000}, "source": "test"}

    with BackgroundAgent(state_dir=tmp_path, token=TOKEN, resource_provider=provider) as a:
        m = requests.get(a.url + "/v1/metrics").json()
    assert m["device_utilization"]["npu_utilization"] == 0.5
    assert m["device_utilization"]["dml_utilization"] == 0.25
    assert m["device_utilization"]["notes"] == {}
    assert m["memory"]["memory_pool"]["used_bytes"] == 64_000_000

    def broken() -> dict:
        raise OSError("driver gone")

    with BackgroundAgent(state_dir=tmp_path, token=TOKEN, resource_provider=broken) as a:
        m = requests.get(a.url + "/v1/metrics")
    assert m.status_code == 200 and m.json()["device_utilization"]["npu_utilization"] is None


# -- token storage and bind rules ---------------------------------------------------------
def test_token_file_created_once_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("INFEROS_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("INFEROS_AGENT_TOKEN", raising=False)
    caplog.set_level("DEBUG")
    tok, source = auth.load_or_create_token()
    path = tmp_path / "cfg" / "agent-token"
    assert source == "generated" and path.read_text().strip() == tok and len(tok) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.load_or_create_token() == (tok, "file")
    assert tok not in caplog.text and auth.fingerprint(tok) in caplog.text
    os.chmod(path, 0o644)
    auth.load_or_create_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", "from-the-environment-123")
    assert auth.load_or_create_token() == ("from-the-environment-123", "env")
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", "short")
    with pytest.raises(auth.TokenError, match="at least 16"):
        auth.load_or_create_token()


def test_xdg_config_home_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFEROS_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    from lemonade_inferos.agent.settings import token_path

    assert token_path() == tmp_path / "lemonade-inferos" / "agent-token"


def test_token_comparison() -> None:
    assert auth.token_matches("a" * 20, "a" * 20)
    assert not auth.token_matches("a" * 19 + "b", "a" * 20)
    assert not auth.token_matches(None, "a" * 20)
    assert not auth.token_matches("", "")


def test_bind_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("INFEROS_AGENT_TOKEN", raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, allow_remote=False)
    with pytest.raises(BindError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False)
    with pytest.raises(BindError, match="no token is configured"):
        check_bind("0.0.0.0", allow_remote=True)
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", "x" * 32)
    check_bind("0.0.0.0", allow_remote=True)


def test_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFEROS_AGENT_PORT", raising=False)
    assert server.default_port() == 7031
    monkeypatch.setenv("INFEROS_AGENT_PORT", "7100")
    assert server.default_port() == 7100
    monkeypatch.setenv("INFEROS_AGENT_PORT", "99999")
    with pytest.raises(BindError, match="out of range"):
        server.default_port()


def test_stats_with_a_subnormal_total_ms_is_not_a_server_error(tmp_path):
    """total_ms = 5e-324 (found by the fuzz test): the tokens/s plausibility check must not
    divide by an underflowed zero."""
    from lemonade_inferos.agent.server import BackgroundAgent

    token = "sub-token-" + "s" * 24
    with BackgroundAgent(state_dir=tmp_path, token=token) as agent:
        body = {"instance": "fe2206", "start_time": 1.0, "end_time": 2.0, "total_ms": 5e-324, "ttft_ms": 5e-324,
                "generated_tokens": 3}
        r = requests.post(agent.url + "/v1/stats", json=body, headers={"X-Inferos-Token": token})
        assert r.status_code == 422 and "tokens/s" in r.text
        body.update(generated_tokens=0)
        assert requests.post(agent.url + "/v1/stats", json=body, headers={"X-Inferos-Token": token}).status_code == 201
