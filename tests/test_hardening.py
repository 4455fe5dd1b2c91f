"""What a new user and a hostile client found (issue 10), checked through the real command
line, engine and agent: the README plugin example, plugin failures, policy precedence with
an agent, KV budget minimum, eval input, flag validation, agent input bounds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from lemonade_inferos.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parent.parent
STORY = ("Once upon a time, there was a little dog named Max. Max liked to run in the park. "
         "One day, Max saw a big red ball. He ran to the ball and played with it all day.")


def inferos(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_AGENT_")}  # only the agent we give
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def model_env(embedded_model):
    return {"INFEROS_CACHE_DIR": os.environ["INFEROS_CACHE_DIR"]}


# -- item 4: the README's plugin example, as written ------------------------------------------
def _readme_plugin_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Writing a plugin"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _readme_plugin_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Writing a plugin"):]
    return shlex.split(re.search(r"```bash\n(.*?)\n```", section, re.S).group(1))


def test_readme_plugin_example_runs_as_written(tmp_path, model_env):
    (tmp_path / "shorter.py").write_text(_readme_plugin_code())
    cmd = _readme_plugin_command()  # PYTHONPATH=. INFEROS_PLUGINS=shorter:Shorter inferos generate ...
    env = dict(c.split("=", 1) for c in cmd if re.fullmatch(r"[A-Z_]+=\S*", c))
    args = [c for c in cmd if not re.fullmatch(r"[A-Z_]+=\S*", c)]
    assert args[0] == "inferos"
    r = inferos(*args[1:], env={**model_env, **env}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "failed" not in r.stderr, r.stderr
    assert re.search(r"policy default TTFT ms [\d.]+ tokens/s \d+ KV bytes \d+", r.stdout), r.stdout


def test_plugin_class_from_an_entry_point(tmp_path, model_env):
    (tmp_path / "shorter.py").write_text(_readme_plugin_code())
    dist = tmp_path / "shorter_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shorter-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[inferos]\nshorter = shorter:Shorter\n")
    r = inferos("generate", "Once upon a time", "--max-new-tokens", "4",
                env={**model_env, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "KV bytes" in r.stdout and "failed" not in r.stderr, (r.stdout, r.stderr)


# -- item 6: plugin failures -----------------------------------------------------------------
class FailsAfter:
    @hookimpl
    def after_request(self, context, stats):
        raise RuntimeError("metrics sink is down")


class FailsBefore:
    @hookimpl
    def before_request(self, context, policy):
        raise KeyError("tenant")


class FailsRunOptions:
    @hookimpl
    def run_options(self, policy, context):
        raise RuntimeError("no run options today")


def _engine(embedded_model, name, plugin):
    from lemonade_inferos.host import build_engine
    from lemonade_inferos.plugins import get_plugin_manager

    pm = get_plugin_manager(enabled=True, extra=[(name, plugin)], entry_points=False)
    return build_engine(embedded_model, "default", pm=pm)


def test_after_request_failure_keeps_the_result_and_names_the_plugin(embedded_model, caplog):
    from lemonade_inferos.engine import GenerationConfig

    eng = _engine(embedded_model, "acme.sink", FailsAfter())
    with caplog.at_level("ERROR", logger="lemonade_inferos.plugins"):
        res = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=6))
    assert len(res.token_ids) == 6 and res.text
    assert any("acme.sink" in r.getMessage() and "after_request" in r.getMessage()
               and "metrics sink is down" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("name,plugin,hook", [("acme.tenant", FailsBefore(), "before_request"),
                                              ("acme.ro", FailsRunOptions(), "run_options")])
def test_hook_errors_name_the_plugin(embedded_model, name, plugin, hook):
    from lemonade_inferos.engine import GenerationConfig
    from lemonade_inferos.plugins import PluginError

    eng = _engine(embedded_model, name, plugin)
    with pytest.raises(PluginError, match=rf"plugin '{re.escape(name)}' failed in {hook}") as ei:
        eng.generate("Once upon a time", GenerationConfig(max_new_tokens=2))
    assert ei.value.plugin == name and ei.value.hook == hook


def test_cli_prints_one_line_and_debug_shows_the_traceback(tmp_path, model_env):
    (tmp_path / "badplug.py").write_text(
        "from lemonade_inferos.hookspecs import hookimpl\n\n"
        "class Bad:\n    @hookimpl\n    def before_request(self, context, policy):\n        raise KeyError('tenant')\n")
    env = {**model_env, "PYTHONPATH": str(tmp_path), "INFEROS_PLUGINS": "badplug:Bad"}
    r = inferos("generate", "Hi", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert "plugin 'badplug:Bad' failed in before_request" in r.stderr and "--debug" in r.stderr
    r = inferos("--debug", "generate", "Hi", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr


# -- item 5: which policy runs ---------------------------------------------------------------
TOKEN = "hardening-token-" + "h" * 20


@pytest.fixture(scope="module")
def agent_env(tmp_path_factory, model_env):
    from lemonade_inferos.agent.server import BackgroundAgent

    with BackgroundAgent(state_dir=tmp_path_factory.mktemp("hard_state"), token=TOKEN) as agent:
        r = requests.post(agent.url + "/v1/policy", json={"name": "agent-quality", "kv": {"mode": "quality_optimized"}},
                          headers={"X-Inferos-Token": TOKEN}, timeout=10)
        assert r.status_code == 200, r.text
        yield {**model_env, "INFEROS_AGENT_URL": agent.url, "INFEROS_AGENT_TOKEN": TOKEN}


def test_explicit_policy_wins_over_the_agent_and_reports_name_it(agent_env):
    r = inferos("generate", "Once upon a time", "--max-new-tokens", "4", "--policy", "latency", "--json", env=agent_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["policy_name"] == "latency"
    r = inferos("generate", "Once upon a time", "--max-new-tokens", "4", "--json", env=agent_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["policy_name"] == "agent-quality"  # no --policy: the agent's


def test_demo_table_names_the_policy_that_ran(agent_env, tmp_path):
    out = tmp_path / "d.json"
    r = inferos("demo", "--prompts", "1", "--max-new-tokens", "4", "--json", str(out), env=agent_env)
    assert r.returncode == 0, r.stderr
    assert "policy 'agent-quality'" in r.stdout and "policy 'default'" not in r.stdout, r.stdout
    rows = json.loads(out.read_text())
    assert rows[1]["stats"]["policy_name"] == "agent-quality"
    r = inferos("demo", "--prompts", "1", "--max-new-tokens", "4", "--policy", "quality", env=agent_env)
    assert r.returncode == 0 and "policy 'quality'" in r.stdout, r.stdout


# -- item 7 (CLI side), 8: model and KV budget -----------------------------------------------
def test_cli_reports_a_corrupt_model_in_one_line(embedded_model, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(embedded_model, bad)
    for name in ("model.onnx", "model_tiered.onnx"):
        (bad / name).write_bytes((bad / name).read_bytes()[:5000])
    r = inferos("generate", "Hi", "--model", str(bad))
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_kv_budget_below_the_minimum_is_a_clear_policy_error(embedded_model):
    from lemonade_inferos.engine import GenerationConfig
    from lemonade_inferos.kv.store import StoreConfig
    from lemonade_inferos.policy import PolicyError, load_policy

    eng = _engine(embedded_model, "noop", object())
    pol = load_policy("default").merged({"kv": {"budget_bytes": 1024}})
    with pytest.raises(PolicyError, match=r"kv\.budget_bytes.*minimum of \d+ bytes"):
        eng.generate("Once", GenerationConfig(max_new_tokens=3), policy=pol)
    need = StoreConfig.from_policy(pol).min_budget_bytes(eng.spec)
    at_min = load_policy("default").merged({"kv": {"budget_bytes": need}})
    for prompt in ("Once", STORY * 3):  # short and long prompts run within the minimum budget
        res = eng.generate(prompt, GenerationConfig(max_new_tokens=40), policy=at_min)
        assert res.token_ids and res.stats.kv.total_bytes <= need


def test_generate_loads_sessions_before_the_clock_starts(embedded_model):
    from lemonade_inferos.engine import GenerationConfig

    eng = _engine(embedded_model, "noop", object())
    eng.preload()
    sessions = dict(eng._sessions)
    eng.generate("Once upon a time", GenerationConfig(max_new_tokens=3))
    eng.generate("Once upon a time", GenerationConfig(max_new_tokens=3), baseline=True)
    assert eng._sessions == sessions  # the timed requests created no session


# -- item 9: eval input ----------------------------------------------------------------------
def test_eval_ignores_a_utf8_bom_and_names_a_directory(tmp_path, model_env):
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text(STORY, encoding="utf-8")
    bom.write_text(STORY, encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    a = inferos("eval", "--text", str(plain), "--json", env=model_env)
    b = inferos("eval", "--text", str(bom), "--json", env=model_env)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert rb["tokens"] == ra["tokens"] and rb["ppl_baseline"] == pytest.approx(ra["ppl_baseline"], rel=1e-6)
    r = inferos("eval", "--text", str(tmp_path), env=model_env)
    assert r.returncode == 2 and "is a directory" in r.stderr and "does not exist" not in r.stderr


# -- item 10: flags checked before work, one KV convention -----------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["demo", "--prompts", "0"], "--prompts 0"),
    (["demo", "--prompts", "1000"], "--prompts 1000"),
    (["demo", "--json", "/nonexistent-dir-xyz/out.json"], "does not exist"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["status", "--interval", "-1"], "--interval -1"),
    (["serve", "--port", "99999"], "out of range"),
])
def test_bad_flags_fail_at_once_in_one_line(argv, needle):
    r = inferos(*argv, timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_agent_state_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = inferos("agent", "--state-dir", str(blocker / "state"), "--port", "7690", timeout=60)
    assert r.returncode == 2 and "--state-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_generate_and_demo_print_kv_as_a_fraction_of_fp16(model_env, tmp_path):
    r = inferos("generate", STORY, "--max-new-tokens", "60", env=model_env)
    assert r.returncode == 0, r.stderr
    shown = float(re.search(r"KV/fp16 ([\d.]+)", r.stderr).group(1))
    j = inferos("generate", STORY, "--max-new-tokens", "60", "--json", env=model_env)
    kv = json.loads(j.stdout)["stats"]["kv"]
    assert shown == pytest.approx(kv["total_bytes"] / kv["fp16_bytes"], abs=0.006)
    assert shown < 1.0  # the tiered store holds less than fp16: a fraction, not an "x vs" factor


# -- item 10: the agent refuses absurd reports and policy names ------------------------------
@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from lemonade_inferos.agent.server import BackgroundAgent

    with BackgroundAgent(state_dir=tmp_path_factory.mktemp("hard_agent"), token=TOKEN) as a:
        yield a


def _report(**kw):
    from lemonade_inferos.types import RunStats

    return {**RunStats(request_id="r1", start_time=1e9, end_time=1e9 + 1, total_ms=1000.0, generated_tokens=10).to_dict(),
            "instance": "hard-1", **kw}


@pytest.mark.parametrize("kw,field", [
    ({"decode_tps": 1e12}, "decode_tps"),
    ({"generated_tokens": 10**11}, "generated_tokens"),
    ({"generated_tokens": 5_000_000, "total_ms": 1.0}, "tokens/s"),
    ({"policy_name": "x" * 100_000}, "policy_name"),
    ({"policy_name": "evil\u202ename\x00"}, "policy_name"),
])
def test_agent_refuses_absurd_stats(agent, kw, field):
    r = requests.post(agent.url + "/v1/stats", json=_report(**kw), headers={"X-Inferos-Token": TOKEN}, timeout=10)
    assert r.status_code == 422 and field in r.text, r.text
    ok = requests.post(agent.url + "/v1/stats", json=_report(), headers={"X-Inferos-Token": TOKEN}, timeout=10)
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("name", ["x" * 100_000, "a\x00b", "\u202eevil", "zero\u200bwidth", ""])
def test_agent_refuses_unprintable_or_huge_policy_names(agent, name):
    before = requests.get(agent.url + "/v1/policy", timeout=10).json()
    r = requests.post(agent.url + "/v1/policy", json={"name": name}, headers={"X-Inferos-Token": TOKEN}, timeout=10)
    assert r.status_code == 400 and "name" in r.text, r.text
    assert requests.get(agent.url + "/v1/policy", timeout=10).json() == before  # unchanged
    from lemonade_inferos.policy import PolicyError, load_policy

    with pytest.raises(PolicyError, match="name"):
        load_policy("default").merged({"name": name})


def test_a_tiny_temperature_samples_greedily_instead_of_nan():
    """Found by the serve fuzz: temperature=5e-324 made every probability NaN (a 500)."""
    import numpy as np

    from lemonade_inferos.engine.sampling import GenerationConfig, select_token

    logits = np.random.default_rng(0).normal(size=512).astype(np.float32)
    for t in (5e-324, 1e-300, 1e-12):
        for k, p in ((0, 1.0), (5, 1.0), (0, 0.9)):
            cfg = GenerationConfig(temperature=t, top_k=k, top_p=p).validate()
            assert select_token(logits, cfg, np.array([], np.int64), np.random.default_rng(1)) == int(np.argmax(logits))
