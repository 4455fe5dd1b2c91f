"""The Lemonade integration against the real Lemonade Server 9.1.4 (Python) – no mocks.

Needs ``INFEROS_LEMONADE_PYTHON`` = an interpreter with ``lemonade-sdk[oga-cpu]==9.1.4`` and
lemonade-inferos' dependencies installed (see ``hooks/lemonade/README.md``); otherwise every
test here is skipped with the reason. Lemonade runs offline on 127.0.0.1 with its cache in
a temp folder; the shipped ``hooks/lemonade/lemonade_inferos.pth`` is processed with
``site.addsitedir`` before Lemonade's CLI starts (what ``site`` does at interpreter start).
A recorder plugin (``INFEROS_PLUGINS``) writes every hook call to a JSON-lines file, which is
compared with Lemonade's own ``/api/v1/stats``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK_DIR = REPO / "hooks" / "lemonade"
PY_ENV = "INFEROS_LEMONADE_PYTHON"

RECORDER = '''
import json, os
from lemonade_inferos.hookspecs import hookimpl

def _write(rec):
    with open(os.environ["INFEROS_TEST_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\\n")

class Recorder:
    @hookimpl
    def before_request(self, context, policy):
        _write({"hook": "before_request", "context": context.to_dict(), "policy": policy.name})

    @hookimpl
    def after_request(self, context, stats):
        _write({"hook": "after_request", "context": context.to_dict(), "stats": stats.to_dict()})

    @hookimpl
    def on_request_error(self, context, error):
        _write({"hook": "on_request_error", "error": repr(error)})

recorder = Recorder()
'''

# What the .pth does at interpreter start, then Lemonade's console script `lemonade-server-dev`.
BOOT = textwrap.dedent(f"""
    import site, sys
    site.addsitedir({str(HOOK_DIR)!r})
    assert "lemonade" not in sys.modules
    from lemonade_server.cli import main
    sys.argv[0] = "lemonade-server-dev"
    sys.exit(main())
""")


def _lemonade_python() -> str:
    py = os.environ.get(PY_ENV)
    if not py:
        pytest.skip(f"{PY_ENV} is not set: point it at a python with Lemonade 9.1.4 "
                    "(see hooks/lemonade/README.md for the install commands)")
    if not Path(py).is_file():
        pytest.skip(f"{PY_ENV}={py} does not exist")
    probe = subprocess.run(
        [py, "-c", "import lemonade.version as v, lemonade_inferos, pluggy; print(v.__version__)"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    if probe.returncode != 0:
        pytest.skip(f"{py} cannot import lemonade / lemonade_inferos / pluggy: "
                    f"{probe.stderr.strip().splitlines()[-1:]} – see hooks/lemonade/README.md")
    if probe.stdout.strip() != "9.1.4":
        pytest.skip(f"{py} has Lemonade {probe.stdout.strip()}, these tests target 9.1.4")
    return py


@pytest.fixture(scope="module")
def lemonade_python() -> str:
    return _lemonade_python()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LemonadeServer:
    """A ``lemonade-server-dev serve`` subprocess with the integration enabled."""

    def __init__(self, python: str, workdir: Path, extra_env: dict[str, str]):
        import requests

        self.requests = requests
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        self.record = workdir / "hooks.jsonl"
        (workdir / "inferos_test_recorder.py").write_text(RECORDER, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFEROS_", "LEMONADE_"))}
        env.update({
            "INFEROS_ENABLED": "1",
            "INFEROS_PLUGINS": "inferos_test_recorder:recorder",
            "INFEROS_TEST_RECORD": str(self.record),
            "INFEROS_CACHE_DIR": str(workdir / "inferos_cache"),
            "LEMONADE_OFFLINE": "1",
            "LEMONADE_CI_MODE": "1",
            "LEMONADE_CACHE_DIR": str(workdir / "lemonade_cache"),
            "HF_HOME": str(workdir / "hf"),
            "PYTHONPATH": os.pathsep.join([str(workdir), str(REPO)]),
            **extra_env,
        })
        self.log = open(workdir / "lemonade.log", "w+", encoding="utf-8")
        self.proc = subprocess.Popen(
            [python, "-c", BOOT, "serve", "--port", str(self.port), "--host", "127.0.0.1",
             "--log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Lemonade exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(f"{self.base}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        self.close()
        raise RuntimeError(f"Lemonade did not answer /health within 120 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")[-4000:]

    def post(self, path: str, body: dict, **kw):
        r = self.requests.post(f"{self.base}{path}", json=body, timeout=300, **kw)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}\n{self.output()}"
        return r

    def stats(self) -> dict:
        return self.requests.get(f"{self.base}/stats", timeout=30).json()

    def records(self) -> list[dict]:
        if not self.record.is_file():
            return []
        return [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _server(python: str, tmp_path_factory, model: Path, name: str, env: dict[str, str]):
    srv = LemonadeServer(python, tmp_path_factory.mktemp(name), env)
    try:
        srv.post("/load", {"model_name": "custom", "checkpoint": str(model), "recipe": "oga-cpu"})
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def engine_server(lemonade_python, tmp_path_factory, embedded_model):
    yield from _server(lemonade_python, tmp_path_factory, embedded_model, "lem_engine", {})


@pytest.fixture(scope="module")
def oga_server(lemonade_python, tmp_path_factory, embedded_model):
    yield from _server(lemonade_python, tmp_path_factory, embedded_model, "lem_oga",
                       {"INFEROS_LEMONADE_ENGINE": "0"})


def _chat(srv: LemonadeServer, model: Path, stream: bool, max_tokens: int = 24) -> tuple[str, dict, dict]:
    """One chat request; returns (text, usage or {}, the after_request record)."""
    before = len(srv.records())
    body = {"model": str(model), "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Tell me a story about a cat."}]}
    r = srv.post("/chat/completions", body, stream=stream)
    usage: dict = {}
    if stream:
        text = ""
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    else:
        doc = r.json()
        text, usage = doc["choices"][0]["message"]["content"], doc["usage"]
    new = srv.records()[before:]
    assert [rec["hook"] for rec in new] == ["before_request", "after_request"], new
    assert new[0]["context"]["request_id"] == new[1]["context"]["request_id"]
    assert new[1]["context"]["host"] == "lemonade"
    return text, usage, new[1]


def _assert_consistent(srv: LemonadeServer, after: dict, usage: dict) -> dict:
    lem = srv.stats()
    st = after["stats"]
    assert st["prompt_tokens"] == lem["input_tokens"] == after["context"]["prompt_tokens"]
    assert st["generated_tokens"] == lem["output_tokens"]
    assert len(lem["decode_token_times"]) == lem["output_tokens"] - 1
    if usage:
        assert usage["prompt_tokens"] == lem["input_tokens"]
        assert usage["completion_tokens"] == lem["output_tokens"]
    assert st["ttft_ms"] is not None and 0 < st["ttft_ms"] <= lem["time_to_first_token"] * 1000 + 50
    return lem


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_engine_path_stats_match_lemonade(engine_server, embedded_model, stream):
    text, usage, after = _chat(engine_server, embedded_model, stream)
    _assert_consistent(engine_server, after, usage)
    st = after["stats"]
    assert text.strip()
    assert st["backend"] == "ort" and st["kv"]["active"] is True
    assert st["kv"]["tokens"] == st["prompt_tokens"] + st["generated_tokens"] - (st["finish_reason"] != "stop")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_oga_path_stats_match_lemonade(oga_server, embedded_model, stream):
    text, usage, after = _chat(oga_server, embedded_model, stream)
    _assert_consistent(oga_server, after, usage)
    st = after["stats"]
    assert text.strip()
    assert st["backend"] == "onnxruntime-genai" and st["kv"]["active"] is False
    assert any("KV store not active" in n and "INFEROS_LEMONADE_ENGINE=0" in n for n in st["notes"])


@pytest.mark.slow
def test_engine_and_lemonade_generate_the_same_greedy_text(engine_server, oga_server, embedded_model):
    """Greedy decoding (the folder's search config has do_sample=false): the inferos engine
    behind Lemonade's interface yields Lemonade/onnxruntime-genai's own tokens."""
    a, _, ra = _chat(engine_server, embedded_model, stream=False, max_tokens=16)
    b, _, rb = _chat(oga_server, embedded_model, stream=False, max_tokens=16)
    assert ra["stats"]["prompt_tokens"] == rb["stats"]["prompt_tokens"]
    assert a == b


@pytest.mark.slow
def test_patching_is_lazy_and_reversible(lemonade_python, embedded_model):
    """In the Lemonade interpreter: nothing is imported before Lemonade is, the real
    OrtGenaiModel gets patched on import, and a patched model generates what the original does."""
    code = textwrap.dedent(f"""
        import sys
        from lemonade_inferos.integrations import lemonade as L
        L.install_import_hook()
        assert not any(m == "lemonade" or m.startswith(("lemonade.", "onnxruntime", "pluggy"))
                       for m in sys.modules), "imported eagerly"
        import lemonade.tools.oga.utils as u
        assert "_inferos_original" in u.OrtGenaiModel.__dict__
        folder = {str(embedded_model)!r}
        patched = u.OrtGenaiModel(folder)
        assert patched._inferos is not None and patched.config["search"]["do_sample"] is False
        import onnxruntime_genai as og
        ids = og.Tokenizer(patched.model).encode("Once upon a time")
        out_p = patched.generate(ids, max_new_tokens=12)[0].tolist()
        assert L.unpatch_oga_utils(u) and not L.unpatch_oga_utils(u)
        out_o = u.OrtGenaiModel(folder).generate(ids, max_new_tokens=12)[0].tolist()
        print(len(ids), out_p[len(ids):], out_o[len(ids):])
        assert out_p[:len(ids)] == list(ids)
        # the engine stops at EOS and does not return it; og appends it
        assert out_o[len(ids):len(out_p)] == out_p[len(ids):]
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "INFEROS_CACHE_DIR": str(embedded_model.parent.parent)}
    env.pop("INFEROS_ENABLED", None)
    res = subprocess.run([lemonade_python, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def smol_model() -> Path:
    from conftest import user_cache
    from lemonade_inferos.model.registry import model_dir

    with user_cache():
        folder = model_dir("smollm2-135m-instruct")
    if not (folder / "model_tiered.onnx").is_file():
        pytest.skip(f"SmolLM2 is not pulled ({folder} missing): run 'inferos pull smollm2-135m-instruct'")
    return folder


@pytest.fixture(scope="module")
def smol_server(lemonade_python, tmp_path_factory, smol_model):
    yield from _server(lemonade_python, tmp_path_factory, smol_model, "lem_smol", {})


@pytest.mark.slow
def test_lemonade_chats_with_smollm2_through_the_tiered_store(smol_server, smol_model):
    """Real Lemonade 9.1.4 loads the converted SmolLM2 folder with recipe oga-cpu, applies
    the folder's ChatML template (its own tokenizer code) and the request runs on the inferos
    engine with the tiered KV store; the greedy answer names Paris."""
    before = len(smol_server.records())
    body = {"model": str(smol_model), "max_tokens": 24, "stream": False,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    doc = smol_server.post("/chat/completions", body).json()
    text = doc["choices"][0]["message"]["content"]
    new = smol_server.records()[before:]
    after = new[-1]
    assert after["hook"] == "after_request"
    st = after["stats"]
    assert st["backend"] == "ort" and st["kv"]["active"] is True and st["kv"]["store"].startswith("tiered")
    assert st["prompt_tokens"] > 20  # the system + user turns of the ChatML template
    assert "Paris" in text, text
    _assert_consistent(smol_server, after, doc["usage"])
