"""The wheel ships the start-up ``lemonade_inferos.pth`` (issue 9 §6): installing the
package alone, without ``install-hook``, makes ``INFEROS_ENABLED=1`` load the integration.

Real builds and installs, no mocks: a copy of the project's build inputs is built with pip
(wheel from the source folder, wheel from the sdist) and with setuptools' PEP 660 editable
hook (what ``pip install -e`` calls), each wheel is installed with ``--no-deps`` into a fresh
venv without site packages, and a fresh interpreter of that venv shows what site did at
start-up. ``tests/test_pth_loader.py`` covers the loader's own behaviour in detail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PTH_NAME = "lemonade_inferos.pth"
#: The documented one-line content (README, hooks/lemonade/README.md).
PTH_TEXT = "import lemonade_inferos.integrations._pth_loader\n"
LOADER = "lemonade_inferos.integrations._pth_loader"
INTEGRATION = "lemonade_inferos.integrations.lemonade"

def _check(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _pip(*args: str) -> subprocess.CompletedProcess:
    return _check([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A copy of what a build reads (so builds leave the checkout untouched)."""
    dst = tmp_path_factory.mktemp("src") / "lemonade-inferos"
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        if (REPO / name).is_file():  # a missing build file must show as a failure below
            shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("lemonade_inferos", "hooks"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, got {found}"
    return found[0]


def _setuptools_build(hook: str, src: Path, out: Path) -> Path:
    """Call setuptools' PEP 517/660 hook (``build_sdist``, ``build_editable``) as pip does."""
    res = _check([sys.executable, "-c",
                  f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"],
                 cwd=str(src))
    return out / res.stdout.strip().splitlines()[-1]


def _assert_wheel_ships_pth(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert PTH_NAME in names, f"{PTH_NAME} not at the root of {wheel.name}: {names[:20]}"
        assert z.read(PTH_NAME).decode("utf-8") == PTH_TEXT
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        # listed in RECORD, so `pip uninstall` removes it
        assert any(line.split(",")[0] == PTH_NAME for line in z.read(record).decode().splitlines())


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv without site packages holding only ``wheel`` (``--no-deps``); its python."""
    _check([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    return python


PROBE = textwrap.dedent(f"""
    import json, sys
    print(json.dumps({{
        "modules": sorted(sys.modules),
        "hooked": any(type(f).__name__ == "_PostImportHook" for f in sys.meta_path),
        "origin": sys.modules["lemonade_inferos"].__file__ if "lemonade_inferos" in sys.modules else None,
        "purelib": __import__("sysconfig").get_paths()["purelib"],
    }}))
""")


def _start(python: Path, cwd: Path, enabled: str | None) -> dict:
    """Start ``python`` as a host would (no PYTHONPATH, a neutral cwd) and report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFEROS_", "PYTHON"))}
    if enabled is not None:
        env["INFEROS_ENABLED"] = enabled
    res = _check([str(python), "-c", PROBE], env=env, cwd=str(cwd))
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"stderr": res.stderr}


def _assert_startup(python: Path, cwd: Path, package_root: Path) -> None:
    off = _start(python, cwd, None)
    assert LOADER in off["modules"], "the installed .pth did not run at start-up"
    assert Path(off["origin"]).resolve().is_relative_to(package_root.resolve())
    assert INTEGRATION not in off["modules"] and not off["hooked"]
    assert [m for m in off["modules"] if m.startswith("lemonade_inferos")] == [
        "lemonade_inferos", "lemonade_inferos.integrations", LOADER]
    assert off["stderr"] == ""

    on = _start(python, cwd, "1")
    assert on["hooked"] and INTEGRATION in on["modules"]
    assert "lemonade" not in on["modules"]  # the hook waits for Lemonade's own import
    assert on["stderr"] == ""  # no "could not be installed" warning


def test_wheel_from_source_ships_pth_and_it_loads(src, tmp_path):
    out = tmp_path / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src))
    wheel = _one(out, "lemonade_inferos-*.whl")
    _assert_wheel_ships_pth(wheel)

    python = _fresh_venv(tmp_path / "venv", wheel)
    purelib = Path(_start(python, tmp_path, None)["purelib"])
    assert (purelib / PTH_NAME).read_text(encoding="utf-8") == PTH_TEXT
    _assert_startup(python, tmp_path, purelib)

    _pip("--python", str(python), "uninstall", "-y", "-q", "lemonade-inferos")
    assert not (purelib / PTH_NAME).exists()


def test_sdist_carries_pth_source_and_builds_the_same_wheel(src, tmp_path):
    out = tmp_path / "dist"
    sdist = _setuptools_build("build_sdist", src, out)
    with tarfile.open(sdist) as t:
        assert any(n.endswith("/hooks/lemonade/lemonade_inferos.pth") for n in t.getnames())
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(sdist))
    _assert_wheel_ships_pth(_one(out, "lemonade_inferos-*.whl"))


def test_editable_wheel_ships_pth_and_it_loads(src, tmp_path):
    wheel = _setuptools_build("build_editable", src, tmp_path / "dist")
    _assert_wheel_ships_pth(wheel)
    with zipfile.ZipFile(wheel) as z:
        # site runs .pth files in name order: setuptools' editable finder must come first
        assert sorted(n for n in z.namelist() if n.endswith(".pth"))[-1] == PTH_NAME

    python = _fresh_venv(tmp_path / "venv", wheel)
    _assert_startup(python, tmp_path, src)  # the package is imported from the source folder
