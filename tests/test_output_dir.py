"""Converters never delete what they did not create (lemonade_inferos.model.output_dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lemonade_inferos.model.output_dir import (
    MANIFEST,
    OutputDirError,
    commit_output_dir,
    is_model_folder,
    prepare_output_dir,
    staged_output_dir,
)


def _model_folder(p: Path, marker: str = "old") -> Path:
    p.mkdir(parents=True)
    (p / MANIFEST).write_text(json.dumps({"converter": "test", "marker": marker}))
    (p / "model.onnx").write_text(marker)
    return p


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_refuses_a_non_empty_directory_that_is_not_a_model_folder(tmp_path):
    out = tmp_path / "src"
    out.mkdir()
    (out / "main.py").write_text("precious")
    with pytest.raises(OutputDirError, match="not an inferos model folder.*--force"):
        prepare_output_dir(out, inputs=[])
    assert (out / "main.py").read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_refuses_an_existing_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    with pytest.raises(OutputDirError, match="existing file"):
        prepare_output_dir(f)
    assert f.read_text() == "precious"


def test_never_replaces_an_input_or_the_current_directory_even_with_force(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    ckpt = src / "w.bin"
    ckpt.write_bytes(b"x")
    with pytest.raises(OutputDirError, match="input"):
        prepare_output_dir(src, force=True, inputs=[ckpt])
    with pytest.raises(OutputDirError, match="input"):
        prepare_output_dir(ckpt, force=True, inputs=[ckpt])
    monkeypatch.chdir(src)
    for out in (".", str(tmp_path)):
        with pytest.raises(OutputDirError, match="current directory"):
            prepare_output_dir(out, force=True)
    with pytest.raises(OutputDirError):
        prepare_output_dir(Path.home(), force=True)
    assert ckpt.read_bytes() == b"x"


def test_replaces_a_previous_model_folder_and_an_empty_directory(tmp_path):
    old = _model_folder(tmp_path / "m")
    assert is_model_folder(old)
    with staged_output_dir(old) as tmp:
        (tmp / MANIFEST).write_text(json.dumps({"converter": "test", "marker": "new"}))
    assert json.loads((old / MANIFEST).read_text())["marker"] == "new"
    assert not (old / "model.onnx").exists()  # the old folder was replaced, not merged
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").is_file()
    assert _leftovers(tmp_path) == []


def test_force_replaces_anything_else(tmp_path):
    out = tmp_path / "src"
    out.mkdir()
    (out / "main.py").write_text("x")
    with staged_output_dir(out, force=True) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert _leftovers(tmp_path) == []


def test_a_failure_leaves_the_old_folder_and_no_staging_dir(tmp_path):
    old = _model_folder(tmp_path / "m")
    with pytest.raises(RuntimeError):
        with staged_output_dir(old) as tmp:
            (tmp / "half").write_text("half")
            raise RuntimeError("converter crashed")
    assert (old / "model.onnx").read_text() == "old"
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with staged_output_dir(fresh):
            raise RuntimeError("converter crashed")
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_commit_rechecks_a_path_that_changed_meanwhile(tmp_path):
    out = tmp_path / "m"
    tmp = prepare_output_dir(out)
    out.mkdir()
    (out / "user.txt").write_text("written while converting")
    with pytest.raises(OutputDirError):
        commit_output_dir(tmp, out)
    assert (out / "user.txt").is_file()


def _inferos(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ})


def test_cli_convert_into_dot_or_a_file_keeps_everything(tmp_path, stories_paths):
    work = tmp_path / "repo"
    (work / ".git").mkdir(parents=True)
    (work / "README.md").write_text("mine")
    ckpt, tok = (work / "w.bin"), (work / "tok.bin")
    ckpt.write_bytes(stories_paths[0].read_bytes())
    tok.write_bytes(stories_paths[1].read_bytes())
    before = sorted(p.name for p in work.iterdir())
    # "." is refused even with --force (cwd, holds the inputs); a file only without --force
    for out, extra in ((".", ()), (".", ("--force",)), ("README.md", ()), ("w.bin", ("--force",))):
        r = _inferos("convert", "llama2c", "w.bin", "tok.bin", out, *extra, cwd=work)
        assert r.returncode == 2, (out, extra, r.stderr)
        assert r.stderr.count("\n") == 1 and "inferos: error: output" in r.stderr, r.stderr
    assert sorted(p.name for p in work.iterdir()) == before
    assert (work / "README.md").read_text() == "mine"


def test_cli_convert_force_and_replacing_a_previous_conversion(tmp_path, stories_paths):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    r = _inferos("convert", "llama2c", *map(str, stories_paths), str(other), cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    r = _inferos("convert", "llama2c", *map(str, stories_paths), str(other), "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert is_model_folder(other) and not (other / "x.txt").exists()
    (other / "model.onnx").unlink()  # incomplete previous conversion: replaced without --force
    r = _inferos("convert", "llama2c", *map(str, stories_paths), str(other), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (other / "model.onnx").is_file()
