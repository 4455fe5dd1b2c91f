"""The ``inferos`` command line, run as a real subprocess on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REQUIRED_EVAL_KEYS = {
    "tokens", "ppl_baseline", "ppl", "delta_ppl", "delta_ppl_pct", "kld_mean", "top1_agreement",
    "kv_bytes_fp16", "kv_bytes", "compression_vs_fp16", "bits_per_element", "level_distribution",
}

STORY = (
    "Once upon a time, there was a little dog named Max. Max liked to run in the park. "
    "One day, Max saw a big red ball. He ran to the ball and played with it all day. "
    "Max was very happy. When the sun went down, Max went home to sleep."
)


def inferos(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def model_env(embedded_model):
    return {"INFEROS_CACHE_DIR": os.environ["INFEROS_CACHE_DIR"]}


def test_help_teaches():
    r = inferos("--help")
    assert r.returncode == 0
    for word in ("generate", "demo", "convert", "eval", "examples:"):
        assert word in r.stdout
    r = inferos("eval", "--help")
    assert "--text" in r.stdout and "KLD" in r.stdout


def test_generate_streams_and_reports_numbers(model_env):
    r = inferos("generate", "Once upon a time", "--max-new-tokens", "24", env_extra=model_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily")
    for word in ("TTFT", "tokens/s", "KV", "bytes"):
        assert word in r.stderr


def test_generate_json_baseline(model_env):
    r = inferos("generate", "Once upon a time", "--max-new-tokens", "5", "--baseline", "--json", env_extra=model_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["generated_tokens"] == 5 and out["stats"]["baseline"] is True


def test_generate_bad_policy_is_a_clear_error(model_env, tmp_path):
    r = inferos("generate", "Hi", "--policy", "nonsense", env_extra=model_env)
    assert r.returncode == 2 and "unknown preset" in r.stderr and "default" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("infer_os:\n  kv:\n    recent_window: 2\n")
    r = inferos("generate", "Hi", "--policy", str(bad), env_extra=model_env)
    assert r.returncode == 2 and "kv.recent_window" in r.stderr


def test_demo_prints_stories_and_table(model_env, tmp_path):
    out = tmp_path / "demo.json"
    r = inferos("demo", "--max-new-tokens", "40", "--prompts", "2", "--json", str(out), env_extra=model_env)
    assert r.returncode == 0, r.stderr
    assert "story 1" in r.stdout and "story 2" in r.stdout
    assert "baseline" in r.stdout and "inferos" in r.stdout and "TTFT" in r.stdout
    rows = json.loads(out.read_text())
    assert [row["mode"] for row in rows] == ["baseline", "inferos"] * 2
    assert all(row["stats"]["generated_tokens"] > 0 for row in rows)


def test_convert_writes_a_loadable_folder(tmp_path, stories_paths):
    ckpt, tok = stories_paths
    r = inferos("convert", "llama2c", str(ckpt), str(tok), str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "m" / f).is_file(), f
    r = inferos("generate", "Once upon a time", "--model", str(tmp_path / "m"), "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time, there was")


def test_convert_missing_input_is_a_clear_error(tmp_path):
    r = inferos("convert", "llama2c", str(tmp_path / "nope.bin"), str(tmp_path / "tok.bin"), str(tmp_path / "m"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_eval_json_keys(model_env, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text(STORY)
    r = inferos("eval", "--text", str(f), "--policy", "default", "--json", env_extra=model_env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert REQUIRED_EVAL_KEYS <= set(res)
    assert res["tokens"] > 40
    assert res["ppl_baseline"] < 5
    assert set(res["level_distribution"]) == {"L0", "L1", "L2", "L3"}


@pytest.mark.parametrize("content, policy, message", [
    ("", "default", "empty"),
    ("   \n", "default", "empty"),
    (STORY, "no-such-preset", "unknown preset"),
])
def test_eval_bad_input(model_env, tmp_path, content, policy, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    r = inferos("eval", "--text", str(f), "--policy", policy, "--json", env_extra=model_env)
    assert r.returncode != 0 and message in r.stderr and r.stdout == ""


def test_eval_missing_file(model_env, tmp_path):
    r = inferos("eval", "--text", str(tmp_path / "missing.txt"), "--json", env_extra=model_env)
    assert r.returncode == 2 and "does not exist" in r.stderr
