"""The plugin-side agent client against real agents (uvicorn on loopback): policy fetch with
TTL cache, baseline mode, background stats queue, overflow accounting, fallback to the
baseline policy while the agent is away and recovery when it returns."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import requests

from lemonade_inferos.agent.server import BackgroundAgent, free_port
from lemonade_inferos.client import AgentClientPlugin, Backoff, agent_plugin_from_env
from lemonade_inferos.policy import Policy, baseline_policy, load_policy
from lemonade_inferos.types import InferenceContext, KVStats, RunStats

TOKEN = "client-token-" + "c" * 24
AUTH = {"X-Inferos-Token": TOKEN}
FAST = dict(backoff_initial=0.02, backoff_max=0.2, timeout=2.0)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def ctx(i: int) -> InferenceContext:
    return InferenceContext(model="stories260K", prompt_tokens=8, request_id=f"req-{i:04d}")


def stats(i: int, **kw) -> RunStats:
    now = time.time()
    return RunStats(request_id=f"req-{i:04d}", model="stories260K", start_time=now - 0.2, end_time=now, prompt_tokens=8,
                    generated_tokens=16, ttft_ms=3.0, total_ms=200.0, kv=KVStats(total_bytes=4096, fp16_bytes=8192), **kw)


def reports_total(agent: BackgroundAgent) -> int:
    return requests.get(agent.url + "/v1/metrics").json()["counters"]["reports_total"]


@pytest.fixture()
def agent(tmp_path: Path):
    with BackgroundAgent(state_dir=tmp_path / "state", token=TOKEN) as a:
        yield a


@pytest.fixture()
def plugins():
    made: list[AgentClientPlugin] = []
    yield made
    for p in made:
        p.close(timeout=0.5)


def make(plugins: list, url: str, **kw) -> AgentClientPlugin:
    p = AgentClientPlugin(url, kw.pop("token", TOKEN), **{**FAST, **kw})
    plugins.append(p)
    return p


def test_client_never_imports_fastapi() -> None:
    code = ("import sys, lemonade_inferos.client as c; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'lemonade_inferos.agent.app') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_before_request_returns_agent_policy_with_ttl_cache(agent: BackgroundAgent, plugins: list) -> None:
    cached = make(plugins, agent.url, policy_ttl=60.0)
    fresh = make(plugins, agent.url, policy_ttl=0.0)
    local = load_policy("quality")
    got = cached.before_request(context=ctx(0), policy=local)
    assert isinstance(got, Policy) and got == load_policy("default")  # the agent's, not the host's
    v = cached.policy_version
    requests.post(agent.url + "/v1/policy", json={"kv": {"recent_window": 200}}, headers=AUTH).raise_for_status()
    assert cached.before_request(context=ctx(1), policy=local) == got  # within TTL: cached
    c = ctx(2)
    assert fresh.before_request(context=c, policy=local).kv.recent_window == 200
    assert fresh.policy_version == v + 1
    assert c.extra["inferos_agent"] == {"policy_source": "agent", "policy_version": v + 1}


def test_baseline_mode_gives_baseline_policy(agent: BackgroundAgent, plugins: list) -> None:
    p = make(plugins, agent.url, policy_ttl=0.0)
    requests.post(agent.url + "/v1/baseline", json={"enable": True}, headers=AUTH).raise_for_status()
    assert p.before_request(context=ctx(0), policy=load_policy("default")) == baseline_policy()
    assert p.agent_baseline is True and p.policy_source == "agent"
    requests.post(agent.url + "/v1/baseline", json={"enable": False}, headers=AUTH).raise_for_status()
    assert p.before_request(context=ctx(1), policy=baseline_policy()) == load_policy("default")


def test_after_request_posts_in_background(agent: BackgroundAgent, plugins: list) -> None:
    p = make(plugins, agent.url, instance="test-client-1")
    t0 = time.perf_counter()
    for i in range(25):
        p.after_request(context=ctx(i), stats=stats(i))
    enqueue_s = time.perf_counter() - t0
    assert p.flush(timeout=20)
    assert reports_total(agent) == 25
    items = requests.get(agent.url + "/v1/history", params={"limit": 100}).json()["items"]
    assert sorted(it["stats"]["request_id"] for it in items) == [f"req-{i:04d}" for i in range(25)]
    assert {it["stats"]["instance"] for it in items} == {"test-client-1"}
    assert p.status()["sent"] == 25 and p.status()["dropped"] == 0
    assert enqueue_s < 1.0, f"after_request must not wait on the network ({enqueue_s:.3f} s for 25)"


def test_queue_overflow_is_counted_and_reported(tmp_path: Path, plugins: list) -> None:
    port = free_port()
    p = make(plugins, f"http://127.0.0.1:{port}", queue_size=2)
    p.after_request(context=ctx(0), stats=stats(0))
    wait_for(lambda: p._queue.qsize() == 0, what="the sender to hold the first report")  # agent down: it keeps it
    for i in range(1, 10):
        p.after_request(context=ctx(i), stats=stats(i))
    assert p.dropped_total == 7  # 1 held by the sender + 2 queued; 7 did not fit
    with BackgroundAgent(state_dir=tmp_path, token=TOKEN, port=port) as agent:
        assert p.flush(timeout=20)
        m = requests.get(agent.url + "/v1/metrics").json()
    assert m["counters"]["reports_total"] == 3
    assert m["counters"]["dropped_reports_total"] == 7


def test_falls_back_to_baseline_and_recovers(tmp_path: Path, plugins: list, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lemonade_inferos.client")
    state = tmp_path / "state"
    agent = BackgroundAgent(state_dir=state, token=TOKEN).start()
    port = agent.port
    p = make(plugins, agent.url, policy_ttl=0.0)
    requests.post(agent.url + "/v1/policy", json={"kv": {"recent_window": 96}}, headers=AUTH).raise_for_status()
    sent = 0
    seq: list[str] = []

    def one_request() -> Policy:
        nonlocal sent
        c = ctx(sent)
        pol = p.before_request(context=c, policy=load_policy("default"))
        seq.append(c.extra["inferos_agent"]["policy_source"])
        p.after_request(context=c, stats=stats(sent, policy_name=pol.name, baseline=pol.name == "baseline"))
        sent += 1
        return pol

    try:
        for _ in range(3):
            assert one_request().kv.recent_window == 96
        assert p.flush(10)
    finally:
        agent.stop()

    # agent gone: every request runs with the baseline policy, logged once
    for _ in range(5):
        assert one_request() == baseline_policy()
        time.sleep(0.01)
    assert not p.agent_available
    down_logs = [r for r in caplog.records if "policy fetch failed" in r.getMessage()]
    assert len(down_logs) == 1, [r.getMessage() for r in caplog.records]

    with BackgroundAgent(state_dir=state, token=TOKEN, port=port) as again:
        deadline = time.monotonic() + 10
        while True:
            pol = one_request()
            if pol.kv.recent_window == 96:
                break
            assert time.monotonic() < deadline, "plugin did not recover"
            time.sleep(0.02)
        assert p.agent_available and p.policy_source == "agent"
        assert one_request().kv.recent_window == 96
        assert p.flush(20), p.status()
        # nothing the plugin queued was lost or double-counted across the outage
        assert reports_total(again) == sent
        assert any("works again" in r.getMessage() for r in caplog.records)
        hist = requests.get(again.url + "/v1/history", params={"limit": 1000}).json()["items"]
        assert sum(1 for it in hist if it["stats"]["baseline"]) >= 5
    assert seq[:3] == ["agent"] * 3 and seq[3:8] == ["fallback"] * 5 and seq[-1] == "agent"


def test_agent_error_answers_also_mean_baseline(plugins: list) -> None:
    # something that is not the agent answers on the port: 404 for /v1/policy
    import http.server
    import threading

    class NotAgent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAgent)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        p = make(plugins, f"http://127.0.0.1:{srv.server_address[1]}", policy_ttl=0.0)
        assert p.before_request(context=ctx(0), policy=load_policy("default")) == baseline_policy()
        assert "HTTP 404" in p.status()["last_error"]
    finally:
        srv.shutdown()


def test_wrong_token_keeps_reports_queued(agent: BackgroundAgent, plugins: list) -> None:
    p = make(plugins, agent.url, token="wrong-token-" + "w" * 20)
    assert p.before_request(context=ctx(0), policy=baseline_policy()) == load_policy("default")  # GET needs no token
    p.after_request(context=ctx(1), stats=stats(1))
    wait_for(lambda: p.status()["stats_channel_down"], what="the 401 to be noticed")
    assert not p.flush(timeout=0.3)  # still held, not dropped
    assert reports_total(agent) == 0 and p.dropped_total == 0


def test_rejected_report_is_not_retried_forever(agent: BackgroundAgent, plugins: list) -> None:
    p = make(plugins, agent.url)
    bad = stats(1)
    bad.end_time = bad.start_time - 10  # the agent answers 422
    p.after_request(context=ctx(1), stats=bad)
    p.after_request(context=ctx(2), stats=stats(2))
    assert p.flush(timeout=10)
    assert p.rejected_total == 1 and reports_total(agent) == 1


def test_registered_in_the_plugin_manager(agent: BackgroundAgent, plugins: list) -> None:
    from lemonade_inferos.plugins import get_plugin_manager

    p = make(plugins, agent.url, policy_ttl=0.0)
    requests.post(agent.url + "/v1/policy", json={"kv": {"recent_window": 32}}, headers=AUTH).raise_for_status()
    pm = get_plugin_manager(enabled=True, extra=[("inferos.agent", p)], entry_points=False)
    assert "inferos.agent" in pm.plugin_names()
    c = ctx(0)
    assert pm.before_request(c, load_policy("default")).kv.recent_window == 32
    pm.after_request(c, stats(0))
    assert p.flush(10) and reports_total(agent) == 1


def test_agent_plugin_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFEROS_AGENT_URL", raising=False)
    monkeypatch.delenv("INFEROS_AGENT_TOKEN", raising=False)
    monkeypatch.setenv("INFEROS_CONFIG_DIR", str(tmp_path))
    assert agent_plugin_from_env() is None
    (tmp_path / "agent-token").write_text("token-from-the-file-1234\n")
    monkeypatch.setenv("INFEROS_AGENT_URL", "http://127.0.0.1:7031/")
    p = agent_plugin_from_env()
    assert p is not None and p.url == "http://127.0.0.1:7031" and p.token == "token-from-the-file-1234"
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", "token-from-the-env-5678")
    assert agent_plugin_from_env().token == "token-from-the-env-5678"
    monkeypatch.setenv("INFEROS_AGENT_URL", "127.0.0.1:7031")
    with pytest.raises(ValueError, match="http://"):
        agent_plugin_from_env()


def test_backoff_doubles_with_jitter_and_caps() -> None:
    lo = Backoff(initial=0.5, maximum=4.0, rng=lambda: 0.0)
    hi = Backoff(initial=0.5, maximum=4.0, rng=lambda: 1.0)
    assert [lo.failure(0.0) for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert [hi.failure(0.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not hi.ready(3.9) and hi.ready(4.0)
    hi.success()
    assert hi.ready(0.0) and hi.failures == 0


def test_engine_end_to_end_reports_to_the_agent(agent: BackgroundAgent, plugins: list, embedded_model: Path) -> None:
    """The real embedded model generating with the client plugin registered: the agent's
    policy is applied, every request's PostRun report arrives, metrics match the results."""
    engine_mod = pytest.importorskip("lemonade_inferos.engine")
    from lemonade_inferos.plugins import get_plugin_manager

    p = make(plugins, agent.url, policy_ttl=0.0, instance="e2e")
    requests.post(agent.url + "/v1/policy", json={"name": "agent-e2e", "kv": {"recent_window": 32}},
                  headers=AUTH).raise_for_status()
    pm = get_plugin_manager(enabled=True, extra=[("inferos.agent", p)], entry_points=False)
    engine = engine_mod.Engine(embedded_model, pm=pm)
    cfg = engine_mod.GenerationConfig(max_new_tokens=24, stop_on_eos=False)
    results = [engine.generate(prompt, cfg) for prompt in ("Once upon a time", "The cat sat", "Lily went to the park")]
    assert all(r.stats.policy_name == "agent-e2e" for r in results)
    requests.post(agent.url + "/v1/baseline", json={"enable": True}, headers=AUTH).raise_for_status()
    base = engine.generate("Once upon a time", cfg)
    assert base.stats.policy_name == "baseline"
    results.append(base)
    assert p.flush(30), p.status()

    m = requests.get(agent.url + "/v1/metrics").json()
    assert m["counters"]["reports_total"] == 4
    assert m["throughput"]["generated_tokens"] == sum(r.stats.generated_tokens for r in results) == 4 * 24
    ttfts = sorted(r.stats.ttft_ms for r in results)
    assert m["first_token_latency"]["mean_ms"] == pytest.approx(sum(ttfts) / 4, abs=1e-3)
    assert m["memory"]["kv_cache_usage_mb"] == pytest.approx(base.stats.kv.total_bytes / 1e6, abs=1e-6)
    items = requests.get(agent.url + "/v1/history").json()["items"]
    assert [it["stats"]["request_id"] for it in items] == [r.stats.request_id for r in results]
    assert {it["stats"]["instance"] for it in items} == {"e2e"}
    if all(r.stats.prompt_nll is not None for r in results):
        assert m["quality"]["delta_ppl"]["delta"] is not None  # baseline-mode report = reference
