"""``hooks/ryzenai-server``: the shim lemond (v9.2+) runs as its OGA backend binary.

Started exactly the way lemond starts ``ryzenai-server`` (``-m DIR --port N --ctx-size N
[--verbose]``), it must bring up ``inferos serve`` answering ``/health`` and the OpenAI
endpoints, with the context capped to the model's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
SHIM_DIR = REPO / "hooks" / "ryzenai-server"
SHIM = SHIM_DIR / "ryzenai-server"

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sh shim is for POSIX systems")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"the shim exited with {proc.returncode}:\n{out}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=15)
    return out.decode(errors="replace") if out else ""


def _run_shim(model_dir: Path, env: dict[str, str], verbose: bool) -> tuple[dict, dict, str]:
    port = _free_port()
    argv = [str(SHIM), "-m", str(model_dir), "--port", str(port), "--ctx-size", "4096"]
    if verbose:
        argv.append("--verbose")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        health = _wait_health(proc, f"http://127.0.0.1:{port}/health")
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": "whatever-lemond-calls-it", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Tell me a story."}]}).json()
    finally:
        out = _stop(proc)
    return health, chat, out


def test_shim_files():
    assert SHIM.is_file() and os.access(SHIM, os.X_OK), "hooks/ryzenai-server/ryzenai-server must be executable"
    assert SHIM.read_text().startswith("#!/bin/sh")
    subprocess.run(["sh", "-n", str(SHIM)], check=True)
    cmd = (SHIM_DIR / "ryzenai-server.cmd").read_bytes()
    assert b"\r\n" in cmd and b"lemonade_inferos.cli serve %*" in cmd and b"inferos serve %*" in cmd
    readme = (SHIM_DIR / "README.md").read_text()
    assert "LEMONADE_RYZENAI_SERVER_BIN" in readme and "ryzenai.server_bin" in readme


def test_shim_with_lemond_argv_via_inferos_python(embedded_model):
    env = {**os.environ, "INFEROS_PYTHON": sys.executable}
    health, chat, out = _run_shim(embedded_model, env, verbose=True)
    assert health["status"] == "ok"
    assert health["context_size"] == 512  # lemond's --ctx-size 4096 capped to the model's context
    assert health["checkpoint_loaded"] == str(embedded_model)
    assert chat["usage"]["completion_tokens"] <= 8
    assert chat["timings"]["predicted_n"] == chat["usage"]["completion_tokens"]
    assert "exceeds the model's context" in out


def test_shim_finds_inferos_on_path(embedded_model):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "inferos").exists():
        pytest.skip("no 'inferos' console script next to this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "INFEROS_PYTHON"}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    health, chat, _ = _run_shim(embedded_model, env, verbose=False)
    assert health["status"] == "ok" and chat["object"] == "chat.completion"


def test_shim_without_inferos_says_how_to_fix(tmp_path):
    env = {"PATH": str(tmp_path)}  # nothing on PATH: no inferos, no python
    r = subprocess.run(["/bin/sh", str(SHIM), "-m", str(tmp_path), "--port", "1", "--ctx-size", "8"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 127
    assert "INFEROS_PYTHON" in r.stderr
