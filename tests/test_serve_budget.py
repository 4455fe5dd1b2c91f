"""``inferos serve`` under a small KV budget: concurrent long requests end in completions
or clear 503s with Retry-After (streaming too); client quotas answer 429."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import requests

from lemonade_inferos.engine import Engine
from lemonade_inferos.integrations.server import BackgroundServer, create_app
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.resources.budget import kv_bytes_estimate
from lemonade_inferos.resources.manager import ResourceManager, attach
from lemonade_inferos.resources.quotas import QuotaStore

PORT = 7711


@pytest.fixture()
def served(embedded_model, tmp_path):
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))
    # every model run takes 5 ms more (a stand-in for a real model's step): a 380-token
    # request then lasts ~2 s on any machine, so concurrent requests really overlap (on an
    # idle machine stories260K finishes one in ~0.1 s and the queue never fills)
    real_run = eng._run

    def slow_run(*a, **k):
        time.sleep(0.005)
        return real_run(*a, **k)

    eng._run = slow_run
    est = kv_bytes_estimate(eng.spec, eng.policy, 400)
    qs = QuotaStore(tmp_path / "history.sqlite3")
    rm = attach(eng, ResourceManager(int(est.want * 1.5), quotas=qs, timeout_s=0.3))
    app = create_app(eng, max_concurrency=4)
    with BackgroundServer(app, port=PORT) as srv:
        yield srv, rm, qs


def _chat(url, stream=False, headers=None, max_tokens=380):
    return requests.post(url + "/v1/chat/completions", json={
        "model": "x", "max_tokens": max_tokens, "stream": stream, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story about a cat."}]}, headers=headers or {},
        timeout=120, stream=stream)


def test_small_budget_concurrent_long_requests_complete_or_503(served):
    srv, rm, _ = served
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda i: _chat(srv.url, stream=bool(i % 2)), range(6)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in rs:
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["code"] == "kv_budget_exceeded" and "KV budget" in err["message"]
            assert int(r.headers["Retry-After"]) >= 1
        else:
            text = r.text
            if r.headers["content-type"].startswith("text/event-stream"):
                assert text.rstrip().endswith("data: [DONE]")
            else:
                body = r.json()
                assert body["usage"]["completion_tokens"] > 0
    st = rm.budget.status()
    assert st["peak_reserved_bytes"] <= rm.budget.total_bytes and st["reserved_bytes"] == 0
    assert st["refused_total"] == codes.count(503)


def test_client_quota_is_429_and_recorded(served):
    srv, rm, qs = served
    qs.set("team-a", 1000, None)  # far below any request's floor
    r = _chat(srv.url, headers={"X-Inferos-Client": "team-a"}, max_tokens=20)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert "team-a" in r.json()["error"]["message"]
    r = _chat(srv.url, headers={"Authorization": "Bearer sk-abc"}, max_tokens=20)
    assert r.status_code == 200
    clients = {c["client"]: c for c in qs.view()["clients"]}
    assert clients["team-a"]["refused"] == 1
    assert any(c.startswith("key:") and v["requests"] == 1 for c, v in clients.items())
    r = _chat(srv.url, headers={"X-Inferos-Client": "bad client"}, max_tokens=5)
    assert r.status_code == 400 and "X-Inferos-Client" in r.json()["error"]["message"]
