"""``inferos gaia``: flag → policy mapping, the dry run, the missing-GAIA error, and a full
launch (agent + backend + a stand-in ``gaia-cli`` that talks to LEMONADE_BASE_URL the way
GAIA does: /health, /models, /load, the OpenAI client on /chat/completions, /stats)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from lemonade_inferos.cli import build_parser, main
from lemonade_inferos.integrations import gaia
from lemonade_inferos.policy import load_policy, parse_size


def _args(*argv: str):
    return build_parser().parse_args(["gaia", *argv])


@pytest.fixture
def no_gaia(monkeypatch, tmp_path):
    """PATH without gaia-cli/gaia (but with this interpreter's folder)."""
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "empty"), "/usr/bin", "/bin"]))
    monkeypatch.delenv("INFEROS_AGENT_URL", raising=False)
    monkeypatch.delenv("INFEROS_BACKEND_URL", raising=False)
    assert gaia.find_gaia() is None


def test_flags_map_onto_policy():
    p = gaia.gaia_policy(_args("--quality-threshold", "0.3", "--memory-limit", "2GiB", "--mode", "gpu_only"))
    assert p.quality.max_delta_ppl == 0.3
    assert p.kv.budget_bytes == parse_size("2GiB") == 2 * 1024**3
    assert (p.scheduler.mode, p.scheduler.prefill_device, p.scheduler.decode_device) == ("gpu_only", "dml", "dml")
    base = load_policy("default")
    assert p.kv.mode == base.kv.mode and p.kv.recent_window == base.kv.recent_window  # the rest is the base
    assert p.name == "gaia-default"
    assert gaia.gaia_policy(_args("--kv-quantization", "disabled")).kv.mode == "disabled"
    assert gaia.gaia_policy(_args("--policy", "quality")).name == "gaia-quality"
    off = gaia.gaia_policy(_args("--optimization", "none", "--quality-threshold", "0.1"))
    assert off.name == "baseline" and off.kv.mode == "disabled"


@pytest.mark.parametrize("argv,needle", [
    (["--quality-threshold", "3"], "--quality-threshold"),
    (["--memory-limit", "lots"], "--memory-limit"),
    (["--policy", "nosuchpreset"], "nosuchpreset"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, no_gaia, argv, needle):
    assert main(["gaia", *argv, "--dry-run"]) == 2
    assert needle in capsys.readouterr().err


def test_argparse_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gaia", "--batch-size", "0"])
    assert "--batch-size 0 is not allowed" in capsys.readouterr().err


def test_dry_run_prints_policy_env_and_commands_and_starts_nothing(capsys, no_gaia, embedded_model):
    rc = main(["gaia", "--optimization", "inferos", "--quality-threshold", "0.3", "--batch-size", "2",
               "--max-tokens", "64", "--model-dir", str(embedded_model), "--dry-run", "--",
               "chat", "--model", "Llama-3.2-1B-Instruct-Hybrid"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nothing was started" in out
    assert "max_delta_ppl: 0.3" in out and "infer_os:" in out
    m = re.search(r"^LEMONADE_BASE_URL=http://127\.0\.0\.1:(\d+)/api/v1 (?:\S+=\S+ )*gaia-cli chat --model "
                  r"Llama-3\.2-1B-Instruct-Hybrid$", out, re.M)
    assert m, out
    port = m.group(1)
    serve_line = next(ln for ln in out.splitlines() if " serve " in ln)
    assert f"--port {port}" in serve_line and "--max-concurrency 2" in serve_line and "--max-tokens 64" in serve_line
    assert f"-m {embedded_model}" in serve_line
    policy_file = re.search(r"would be written to (\S+?):", out).group(1)
    assert not Path(policy_file).exists() and not Path(policy_file).parent.exists()  # nothing written
    # with an agent the backend runs the agent's policy (an explicit --policy would win over it)
    assert ("--policy" in serve_line) == (gaia.agent_cli_options() is None)
    assert "pip install amd-gaia" in out  # says GAIA is missing, but the dry run still works
    if gaia.agent_cli_options() is not None:
        agent_line = next(ln for ln in out.splitlines() if " agent --" in ln)
        assert "INFEROS_AGENT_TOKEN='<inferos_agent_token>'" in agent_line  # the token is never printed
        assert "INFEROS_AGENT_URL=http://127.0.0.1:" in serve_line
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_dry_run_baseline(capsys, no_gaia):
    assert main(["gaia", "--optimization", "none", "--kv-quantization", "disabled", "--dry-run", "--", "llm", "hi"]) == 0
    out = capsys.readouterr().out
    serve_line = next(ln for ln in out.splitlines() if " serve " in ln)
    assert serve_line.startswith("INFEROS_DISABLE=1 ")
    assert "name: baseline" in out and "--kv-quantization ignored" in out
    assert " agent " not in out.replace("no agent", "")
    assert re.search(r"^LEMONADE_BASE_URL=\S+ gaia-cli llm hi$", out, re.M)


def test_missing_gaia_is_a_clear_error(capsys, no_gaia):
    assert main(["gaia", "--", "chat"]) == 127
    err = capsys.readouterr().err
    assert "gaia-cli" in err and "pip install amd-gaia" in err and "github.com/amd/gaia" in err


FAKE_GAIA = '''#!{python}
"""Stand-in for gaia-cli: does what GAIA's LemonadeClient does, records what it saw."""
import json, os, sys, time
import httpx
from openai import OpenAI

base = os.environ["LEMONADE_BASE_URL"]
agent = os.environ.get("INFEROS_AGENT_URL")
out = {{"argv": sys.argv[1:], "base": base, "agent": agent}}
out["health"] = httpx.get(base + "/health").json()
out["models"] = httpx.get(base + "/models").json()
out["load"] = httpx.post(base + "/load", json={{"model_name": "Llama-3.2-1B-Instruct-Hybrid"}}).json()
client = OpenAI(base_url=base, api_key="lemonade", max_retries=0)
r = client.chat.completions.create(model="Llama-3.2-1B-Instruct-Hybrid", max_tokens=100,
                                   messages=[{{"role": "user", "content": "Tell me a story."}}])
out["chat"] = r.model_dump()
out["stats"] = httpx.get(base + "/stats").json()
if agent:
    out["agent_policy"] = httpx.get(agent + "/v1/policy").json()
    for _ in range(100):
        h = httpx.get(agent + "/v1/history", params={{"limit": 10}}).json()
        if h["count"]:
            break
        time.sleep(0.1)
    out["agent_history"] = h
with open(sys.argv[-1], "w") as f:
    json.dump(out, f)
sys.exit(3)
'''


@pytest.mark.slow
def test_launch_runs_backend_agent_and_gaia(tmp_path, monkeypatch, embedded_model, capsys):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "gaia-cli"
    fake.write_text(FAKE_GAIA.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    for var in ("INFEROS_AGENT_URL", "INFEROS_AGENT_TOKEN", "INFEROS_BACKEND_URL", "INFEROS_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("INFEROS_CONFIG_DIR", str(tmp_path / "config"))  # never touch the user's token file
    result = tmp_path / "seen.json"
    work_root = tmp_path / "tmp"
    work_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work_root))  # where the launcher's work dir goes
    rc = main(["gaia", "--quality-threshold", "0.3", "--memory-limit", "1MiB", "--max-tokens", "16",
               "--batch-size", "2", "--model-dir", str(embedded_model), "--start-timeout", "120",
               "--", "chat", str(result)])
    err = capsys.readouterr().err
    assert rc == 3, err  # gaia-cli's exit code comes back
    seen = json.loads(result.read_text())
    assert seen["argv"] == ["chat", str(result)]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1", seen["base"])
    assert seen["health"]["status"] == "ok" and seen["health"]["max_concurrency"] == 2
    assert seen["models"]["data"][0]["id"] == "stories260K"
    assert seen["load"]["status"] == "success"
    chat = seen["chat"]
    assert chat["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] <= 16  # --max-tokens caps GAIA's max_tokens=100
    assert seen["stats"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert seen["stats"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    if gaia.agent_cli_options() is not None:
        assert seen["agent"], err
        pol = seen["agent_policy"]["effective"]
        assert pol["quality"]["max_delta_ppl"] == 0.3 and pol["kv"]["budget_bytes"] == 1024**2
        items = seen["agent_history"]["items"]
        assert items, "the backend's PostRun report never reached the agent"
        assert items[-1]["stats"]["generated_tokens"] == chat["usage"]["completion_tokens"]
    else:
        assert "starting the backend only" in err
    # everything this command started is stopped again, and its work dir is gone
    assert list(work_root.iterdir()) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(seen["base"] + "/health", timeout=1)
    if seen["agent"]:
        with pytest.raises(httpx.HTTPError):
            httpx.get(seen["agent"] + "/v1/health", timeout=1)


def test_lemonade_subcommand_passes_arguments_through(monkeypatch):
    """``inferos lemonade ...`` is wired to ``run_lemonade`` with every argument unchanged."""
    from lemonade_inferos.integrations import lemonade

    seen = []
    monkeypatch.setattr(lemonade, "run_lemonade", lambda argv: seen.append(argv) or 7)
    assert main(["lemonade", "serve", "--port", "8000", "--help"]) == 7
    assert seen == [["serve", "--port", "8000", "--help"]]
