"""``inferos serve`` against hostile clients and bad configurations: body size, nesting
depth, Host / Content-Type checks, CPU work off the event loop, internal errors as 500,
a corrupt model and bad ports at start-up. Real uvicorn on loopback, the embedded model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.integrations.server import BackgroundServer, create_app

JSON = {"Content-Type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(embedded_model):
    from lemonade_inferos.host import build_engine
    from lemonade_inferos.plugins import get_plugin_manager

    return build_engine(embedded_model, "default", pm=get_plugin_manager(enabled=True, entry_points=False))


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine)) as srv:  # default limits
        yield srv


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_oversized_body_is_413_before_it_is_read(server):
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    err = _err(httpx.post(server.url + "/v1/completions", content=big, headers=JSON, timeout=30), 413)
    assert "8388608 bytes" in err["message"] and err["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    _err(httpx.post(server.url + "/v1/completions", content=chunks(), headers=JSON, timeout=30), 413)


def test_body_limit_is_configurable(engine):
    with BackgroundServer(create_app(engine, max_body_bytes=1000)) as srv:
        body = {"prompt": "x" * 2000, "max_tokens": 1}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=30).status_code == 413
        assert httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    with pytest.raises(ValueError, match="max_body"):
        create_app(engine, max_body_bytes=0)


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
def test_deeply_nested_json_is_400_not_500(server, depth):
    body = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    err = _err(httpx.post(server.url + "/v1/chat/completions", content=body, headers=JSON, timeout=30), 400)
    assert "nested" in err["message"]


def test_foreign_host_header_is_refused(server):
    err = _err(httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers={"Host": "evil.example"}), 421)
    assert "evil.example" in err["message"]
    assert httpx.get(server.url + "/health", headers={"Host": "rebind.attacker:8001"}).status_code == 421
    for host in ("localhost:8001", "127.0.0.1", "[::1]:1"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_cross_site_simple_posts_are_refused(server):
    """text/plain and form bodies are what a web page can send cross-origin without a
    preflight; they must not drive the server."""
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x"):
        err = _err(httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": ctype}), 415)
        assert "application/json" in err["message"]
    _err(httpx.post(server.url + "/v1/chat/completions", content=raw), 415)  # no Content-Type at all
    r = httpx.post(server.url + "/v1/chat/completions", content=raw,
                   headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-content-type-options"] == "nosniff"


def test_any_host_when_asked(engine):
    from lemonade_inferos.integrations.serve_guard import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.1", ["*"]) is None
    assert "gpu-box.lan" in allowed_hosts_for("127.0.0.1", ["gpu-box.lan"])
    assert "192.168.1.5" in allowed_hosts_for("192.168.1.5")
    with BackgroundServer(create_app(engine, allowed_hosts=allowed_hosts_for("127.0.0.1", ["*"]))) as srv:
        assert httpx.get(srv.url + "/health", headers={"Host": "gpu-box.lan"}).status_code == 200


def test_tokenizing_a_large_prompt_does_not_stall_health(serve_process):
    """A 7 MB prompt takes seconds to tokenize; meanwhile /health must answer (within 2 s:
    on the event loop the tokenization alone blocks it for about 4 s)."""
    body = {"prompt": "Once upon a time there was a dog. " * 200_000, "max_tokens": 1}
    out: dict = {}

    def post() -> None:
        out["r"] = httpx.post(serve_process + "/v1/completions", json=body, timeout=120)

    t = threading.Thread(target=post)
    t.start()
    answered = 0
    try:
        time.sleep(0.3)  # the body is uploaded and being worked on
        while t.is_alive():
            r = httpx.get(serve_process + "/health", timeout=2)  # raises ReadTimeout if the loop is blocked
            assert r.status_code == 200
            answered += 1
            time.sleep(0.05)
    finally:
        t.join(120)
    assert answered >= 1, "the request finished before /health was polled; make the prompt larger"
    assert _err(out["r"], 400)["code"] == "context_length_exceeded"


class Exploding:
    """A plugin whose KV store fails with a ValueError: a server-side fault."""

    @hookimpl
    def kv_cache(self, policy, spec, context):
        raise ValueError("internal: store exploded")


def test_internal_errors_are_500_not_400(embedded_model):
    from lemonade_inferos.host import build_engine
    from lemonade_inferos.plugins import get_plugin_manager

    pm = get_plugin_manager(enabled=True, extra=[("test.exploding", Exploding())], entry_points=False)
    eng = build_engine(embedded_model, "default", pm=pm)
    with BackgroundServer(create_app(eng)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        err = _err(r, 500)
        assert err["type"] == "server_error" and "store exploded" in err["message"]


# -- start-up -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lemonade_inferos.cli", "serve", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"serve kept running (it should have refused to start): {e.stderr!r}") from None


def test_corrupt_model_fails_before_serving(embedded_model, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(embedded_model, bad)
    for name in ("model.onnx", "model_tiered.onnx"):
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 3])
    r = _serve("-m", str(bad), "--port", str(_free_port()), timeout=60)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "corrupt" in err[0] and "Traceback" not in r.stderr, r.stderr


def test_policy_whose_kv_budget_cannot_fit_fails_at_start(embedded_model, tmp_path):
    pol = tmp_path / "tiny.yaml"
    pol.write_text("kv:\n  budget_bytes: 1KiB\n")
    r = _serve("-m", str(embedded_model), "--policy", str(pol), "--port", str(_free_port()), timeout=60)
    assert r.returncode == 2 and "kv.budget_bytes" in r.stderr and "minimum" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_and_busy_ports_are_one_line(embedded_model):
    r = _serve("--port", "99999", timeout=30)
    assert r.returncode == 2 and "out of range" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = _serve("-m", str(embedded_model), "--port", str(s.getsockname()[1]), timeout=60)
    assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
