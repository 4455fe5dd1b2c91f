"""``inferos agent | status | policy`` as a user runs them: real subprocesses, a real agent."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from lemonade_inferos.agent.server import free_port
from lemonade_inferos.policy import load_policy

pytestmark = pytest.mark.slow


def cli_env(cfg: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    env["INFEROS_CONFIG_DIR"] = str(cfg)
    return env


def inferos(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


class RunningAgent:
    def __init__(self, env: dict, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "lemonade_inferos.cli", "agent", "--port", str(self.port), *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("agent exited: " + self.proc.stderr.read())
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out + err


@pytest.fixture()
def env(tmp_path: Path) -> dict:
    return cli_env(tmp_path / "cfg")


def test_agent_status_and_policy_commands(tmp_path: Path, env: dict) -> None:
    agent = RunningAgent(env, "--state-dir", str(tmp_path / "state"))
    try:
        token_file = tmp_path / "cfg" / "agent-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        url = ["--url", agent.url]

        r = inferos(env, "status", *url)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("TPS 0.0 tok/s | FTL n/a") and "CPU " in r.stdout and "NPU n/a" in r.stdout

        default_rw = load_policy("default").kv.recent_window
        r = inferos(env, "policy", "set", "kv.recent_window=128", "io.enable_iobinding=false", *url)
        assert r.returncode == 0, r.stderr
        assert f"kv.recent_window: {default_rw} -> 128" in r.stdout
        assert "io.enable_iobinding: True -> False" in r.stdout

        r = inferos(env, "policy", "set", "kv.recent_window=1000", *url)
        assert r.returncode == 1
        assert "agent refused (400)" in r.stderr and "kv.recent_window" in r.stderr and "512" in r.stderr
        assert requests.get(agent.url + "/v1/policy").json()["policy"]["kv"]["recent_window"] == 128

        doc = tmp_path / "mine.yaml"
        doc.write_text(yaml.safe_dump({"infer_os": {"quality": {"max_delta_ppl": 0.25}}}))
        r = inferos(env, "policy", "set", str(doc), *url)
        assert r.returncode == 0, r.stderr
        pol = requests.get(agent.url + "/v1/policy").json()["policy"]
        assert pol["quality"]["max_delta_ppl"] == 0.25 and pol["kv"]["recent_window"] == 128  # merged

        r = inferos(env, "policy", "set", "quality", *url)
        assert r.returncode == 0 and "policy 'quality' in force" in r.stdout
        assert requests.get(agent.url + "/v1/policy").json()["policy"] == load_policy("quality").to_dict()

        r = inferos(env, "policy", "set", "no-such-preset", *url)
        assert r.returncode == 2 and "neither a preset" in r.stderr
        r = inferos(env, "policy", "set", "kv.=3", *url)
        assert r.returncode == 2 and "key=value" in r.stderr

        r = inferos(env, "policy", "baseline", "on", *url)
        assert r.returncode == 0 and "baseline mode on" in r.stdout
        r = inferos(env, "policy", "show", *url)
        assert r.returncode == 0 and "baseline mode on" in r.stdout and "name: quality" in r.stdout
        r = inferos(env, "policy", "show", "--effective", *url)
        assert "name: baseline" in r.stdout and "mode: disabled" in r.stdout

        r = inferos(env, "status", "--watch", "--count", "2", "--interval", "0.05", *url)
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2
        assert "policy baseline" in r.stdout

        # the URL can come from the environment too; changes need the token
        env_url = {**env, "INFEROS_AGENT_URL": agent.url}
        assert inferos(env_url, "policy", "baseline", "off").returncode == 0
        no_token = {**env_url, "INFEROS_CONFIG_DIR": str(tmp_path / "elsewhere")}
        r = inferos(no_token, "policy", "baseline", "on")
        assert r.returncode == 2 and "no agent token" in r.stderr
        wrong = {**env_url, "INFEROS_AGENT_TOKEN": "not-the-right-token-000"}
        r = inferos(wrong, "policy", "baseline", "on")
        assert r.returncode == 1 and "401" in r.stderr
    finally:
        rc, output = agent.stop()
    assert rc == 0, output
    assert token not in output  # never printed
    assert "sha256:" in output


def test_agent_not_running_is_a_clear_error(env: dict) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["policy", "show"], ["policy", "set", "quality"], ["policy", "baseline", "on"]):
        r = inferos({**env, "INFEROS_AGENT_TOKEN": "x" * 20}, *args, "--url", url)
        assert r.returncode == 3, (args, r.stderr)
        assert "start it with `inferos agent`" in r.stderr


def test_agent_refuses_non_loopback_without_allow_remote(env: dict) -> None:
    r = inferos(env, "agent", "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "--allow-remote" in r.stderr
    r = inferos(env, "agent", "--host", "0.0.0.0", "--allow-remote", "--port", str(free_port()))
    assert r.returncode == 2 and "no token is configured" in r.stderr


def test_agent_config_file_and_port_env(tmp_path: Path, env: dict) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"agent": {"window_seconds": 30}, "policy": "latency",
                                   "infer_os": {"kv": {"recent_window": 100}}}))
    port = free_port()
    agent = RunningAgent({**env, "INFEROS_AGENT_PORT": str(port)}, "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    try:
        # --port given by RunningAgent wins; the env var is the fallback default
        pol = requests.get(agent.url + "/v1/policy").json()["policy"]
        assert pol["kv"]["recent_window"] == 100
        assert pol["name"] == "latency"
        assert requests.get(agent.url + "/v1/config").json()["config"]["window_seconds"] == 30
    finally:
        rc, output = agent.stop(signal.SIGTERM)
    assert rc == 0 and "agent stopped" in output, output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"agent": {"window_seconds": -1}}))
    r = inferos(env, "agent", "--config", str(bad), "--port", str(free_port()))
    assert r.returncode == 2 and "window_seconds" in r.stderr
