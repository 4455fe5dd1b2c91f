"""Hook system: specs, folding, type checks, ORT option injection, discovery, allow/deny."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest

from lemonade_inferos import ort_options
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.plugins import NoopManager, get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.types import InferenceContext


@pytest.fixture
def ctx():
    return InferenceContext(model="m", prompt_tokens=5, max_new_tokens=10, target_ttft_ms=50.0)


def test_builtin_plugins_registered():
    pm = get_plugin_manager(entry_points=False)
    assert {"inferos.ort", "inferos.kv"} <= set(pm.plugin_names())


def test_before_request_folds_in_call_order(ctx):
    calls = []

    class First:
        @hookimpl(tryfirst=True)
        def before_request(self, context, policy):
            calls.append(("first", policy.kv.recent_window))
            return policy.merged({"kv": {"recent_window": 32}})

    class Second:
        @hookimpl
        def before_request(self, policy):  # a subset of the spec's arguments is fine
            calls.append(("second", policy.kv.recent_window))
            return policy.merged({"kv": {"recent_window": policy.kv.recent_window * 2}})

    pm = get_plugin_manager(entry_points=False, extra=[("a", Second()), ("b", First())])
    out = pm.before_request(ctx, load_policy("default").merged({"kv": {"recent_window": 64}}))
    assert calls == [("first", 64), ("second", 32)]
    assert out.kv.recent_window == 64  # 32 * 2


def test_wrong_return_type_names_plugin_and_hook(ctx):
    class Bad:
        @hookimpl
        def before_request(self, context, policy):
            return {"kv": {}}

    pm = get_plugin_manager(entry_points=False, extra=[("badplugin", Bad())])
    with pytest.raises(TypeError, match=r"badplugin.*before_request.*dict"):
        pm.before_request(ctx, load_policy())

    class BadSO:
        @hookimpl
        def session_options(self, policy):
            return "threads=4"

    pm = get_plugin_manager(entry_points=False, extra=[("bad_so", BadSO())])
    with pytest.raises(TypeError, match="bad_so.*session_options"):
        pm.session_options(load_policy(), None)


def test_session_options_reflect_policy():
    pol = load_policy().merged({"runtime": {
        "intra_op_threads": 2, "inter_op_threads": 1, "graph_optimization": "basic",
        "execution_mode": "parallel", "enable_mem_pattern": False, "enable_cpu_mem_arena": False,
        "session_config": {"session.intra_op.allow_spinning": "0"},
    }})
    so = get_plugin_manager(entry_points=False).session_options(pol, None)
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.enable_mem_pattern is False and so.enable_cpu_mem_arena is False
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_run_options_carry_request_id_and_shrinkage(ctx):
    pol = load_policy().merged({"runtime": {"arena_shrinkage": True, "log_severity": 1}})
    ro = get_plugin_manager(entry_points=False).run_options(pol, ctx)
    assert ro.logid == ctx.request_id
    assert ro.log_severity_level == 1
    assert ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_provider_choice_and_fallback(caplog):
    hybrid = load_policy("default")  # decode npu, prefill dml
    win = ["VitisAIExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider"]
    assert [p for p, _ in ort_options.execution_providers(hybrid, win)] == win
    gpu = load_policy("3b")
    assert [p for p, _ in ort_options.execution_providers(gpu, win)] == ["DmlExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.INFO, logger="lemonade_inferos.ort"):
        got = ort_options.execution_providers(hybrid, ["CPUExecutionProvider"])
    assert got == [("CPUExecutionProvider", {})]
    assert "VitisAIExecutionProvider" in caplog.text and "DmlExecutionProvider" in caplog.text
    # what this machine's onnxruntime really has
    real = ort_options.execution_providers(hybrid)
    assert real[-1][0] == "CPUExecutionProvider"
    assert all(p in ort.get_available_providers() for p, _ in real)


def test_genai_overlay_maps_session_options():
    pol = load_policy().merged({"runtime": {"intra_op_threads": 3, "graph_optimization": "extended"}})
    ov = ort_options.genai_overlay(pol, ["DmlExecutionProvider", "CPUExecutionProvider"])
    so = ov["model"]["decoder"]["session_options"]
    assert so["intra_op_num_threads"] == 3
    assert so["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert so["provider_options"] == [{"dml": {"device_id": "0"}}]


def test_disable_env_gives_noop_manager(monkeypatch, ctx):
    monkeypatch.setenv("INFEROS_DISABLE", "1")
    pm = get_plugin_manager()
    assert isinstance(pm, NoopManager) and not pm.enabled
    pol = load_policy()
    assert pm.before_request(ctx, pol) is pol
    assert pm.plugin_names() == []


def test_allow_and_deny_lists(monkeypatch):
    monkeypatch.setenv("INFEROS_PLUGINS_DENY", "inferos.kv")
    assert "inferos.kv" not in get_plugin_manager(entry_points=False).plugin_names()
    monkeypatch.delenv("INFEROS_PLUGINS_DENY")
    monkeypatch.setenv("INFEROS_PLUGINS_ALLOW", "inferos.ort")
    assert get_plugin_manager(entry_points=False).plugin_names() == ["inferos.ort"]


def test_env_plugin_reference_that_does_not_import_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("INFEROS_PLUGINS", "no_such_module_xyz:plugin")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        get_plugin_manager(entry_points=False)


def test_error_hook_failures_do_not_hide_the_error(ctx, caplog):
    seen = []

    class Broken:
        @hookimpl
        def on_request_error(self, context, error):
            raise RuntimeError("plugin bug")

    class Recorder:
        @hookimpl
        def on_request_error(self, error):
            seen.append(error)

    pm = get_plugin_manager(entry_points=False, extra=[("broken", Broken()), ("rec", Recorder())])
    err = ValueError("boom")
    pm.on_request_error(ctx, err)
    assert seen == [err]
    assert "broken" in caplog.text


def test_entry_point_plugin_from_a_real_installed_distribution(tmp_path, embedded_model):
    """Build and pip-install a throwaway distribution declaring an ``inferos`` entry point,
    then run a real generation in a fresh interpreter and check its hooks ran."""
    src = tmp_path / "src"
    (src / "inferos_probe").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "inferos-probe"
        version = "0.0.1"
        [project.entry-points.inferos]
        probe = "inferos_probe:plugin"
    """))
    (src / "inferos_probe" / "__init__.py").write_text(textwrap.dedent("""
        import json, os
        from lemonade_inferos.hookspecs import hookimpl

        class Probe:
            @hookimpl
            def before_request(self, context, policy):
                return policy.merged({"kv": {"recent_window": 100}})

            @hookimpl
            def after_request(self, context, stats):
                with open(os.environ["PROBE_OUT"], "w") as f:
                    json.dump({"tokens": stats.generated_tokens, "policy_window": None,
                               "request_id": context.request_id}, f)

        plugin = Probe()
    """))
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "probe.json"
    code = textwrap.dedent(f"""
        import json
        from lemonade_inferos.engine import Engine, GenerationConfig
        from lemonade_inferos.plugins import get_plugin_manager
        pm = get_plugin_manager()
        assert "probe" in pm.plugin_names(), pm.plugin_names()
        res = Engine({str(embedded_model)!r}, pm=pm).generate("Once upon a time", GenerationConfig(max_new_tokens=7))
        print(json.dumps({{"window": res.policy.kv.recent_window, "n": len(res.token_ids)}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(target), "PROBE_OUT": str(out)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    import json

    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert printed == {"window": 100, "n": 7}
    assert json.loads(out.read_text())["tokens"] == 7
