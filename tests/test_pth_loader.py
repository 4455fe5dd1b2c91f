"""The interpreter-start loader (``hooks/lemonade/lemonade_inferos.pth`` →
``lemonade_inferos.integrations._pth_loader``) and the lazy import hook.

The ``.pth`` is processed with ``site.addsitedir`` in a fresh subprocess, which is exactly
what ``site`` does for every site-packages folder at interpreter start. The subprocess runs
with ``-S`` (no automatic site-packages): an installed ``lemonade-inferos`` ships the same
``.pth`` in site-packages (see ``tests/test_pth_wheel.py``), and letting it run at start-up
would load the module before the probe looks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK_DIR = REPO / "hooks" / "lemonade"
HEAVY = ["pluggy", "pydantic", "onnxruntime", "onnxruntime_genai", "numpy", "yaml", "lemonade",
         "lemonade_inferos.integrations.lemonade", "lemonade_inferos.plugins", "lemonade_inferos.policy"]


def _run(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(REPO))


PROBE = f"""
import json, site, sys
before = set(sys.modules)
@PRELUDE@
site.addsitedir({str(HOOK_DIR)!r})
new = sorted(set(sys.modules) - before)
heavy = [m for m in {HEAVY!r} if m in new]
hooked = any(type(f).__name__ == "_PostImportHook" for f in sys.meta_path)
print(json.dumps({{"new": new, "heavy": heavy, "hooked": hooked}}))
"""


def _probe(env: dict[str, str] | None = None, prelude: str = "") -> dict:
    res = _run(PROBE.replace("@PRELUDE@", prelude), env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"stderr": res.stderr}


def test_pth_file_is_the_documented_line():
    from lemonade_inferos.integrations.lemonade import PTH_FILENAME, PTH_LINE

    pth = HOOK_DIR / PTH_FILENAME
    assert pth.read_text(encoding="utf-8") == PTH_LINE
    assert PTH_LINE.startswith("import ")  # site.addpackage only executes lines starting with import


@pytest.mark.parametrize("value", [None, "0", "", "no"])
def test_disabled_imports_nothing_heavy(value):
    out = _probe({} if value is None else {"INFEROS_ENABLED": value})
    assert "lemonade_inferos.integrations._pth_loader" in out["new"]  # the .pth line did run
    assert out["heavy"] == []
    assert not out["hooked"]
    assert out["stderr"] == ""


def test_enabled_outside_lemonade_installs_hook_only():
    out = _probe({"INFEROS_ENABLED": "1"})
    assert out["hooked"]
    assert "lemonade_inferos.integrations.lemonade" in out["new"]
    assert [m for m in out["heavy"] if m != "lemonade_inferos.integrations.lemonade"] == []
    assert out["stderr"] == ""


def test_enabled_with_broken_integration_keeps_host_running():
    # None in sys.modules makes the import raise ImportError
    out = _probe({"INFEROS_ENABLED": "1"},
                 prelude="sys.modules['lemonade_inferos.integrations.lemonade'] = None")
    assert not out["hooked"]
    assert out["stderr"].count("lemonade-inferos: INFEROS_ENABLED is set") == 1
    assert "ModuleNotFoundError" in out["stderr"]


def test_enabled_with_system_exit_in_integration_keeps_host_running():
    prelude = textwrap.dedent("""
        import types
        m = types.ModuleType('lemonade_inferos.integrations.lemonade')
        def install_import_hook(**kw):
            raise SystemExit(3)
        m.install_import_hook = install_import_hook
        sys.modules[m.__name__] = m
    """)
    out = _probe({"INFEROS_ENABLED": "1"}, prelude=prelude)
    assert "SystemExit" in out["stderr"]


def test_warning_is_logged_once():
    res = _run("""
        import sys
        sys.modules['lemonade_inferos.integrations.lemonade'] = None
        from lemonade_inferos.integrations import _pth_loader
        assert _pth_loader.load() is False and _pth_loader.load() is False
        print("host ok")
    """, {"INFEROS_ENABLED": "true"})
    assert res.returncode == 0 and res.stdout.strip() == "host ok"
    assert res.stderr.count("could not be installed") == 1


def test_enabled_values():
    from lemonade_inferos.integrations._pth_loader import enabled

    assert enabled({"INFEROS_ENABLED": " ON "}) and enabled({"INFEROS_ENABLED": "Yes"})
    assert not enabled({}) and not enabled({"INFEROS_ENABLED": "2"})


def test_post_import_hook_patches_lazily_and_survives_callback_errors(tmp_path):
    """A watched module gets its callback after executing; a failing callback is logged and
    the import still succeeds (run in a subprocess so sys.meta_path stays clean here)."""
    pkg = tmp_path / "fakehost"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 41\n")
    (pkg / "bad.py").write_text("VALUE = 1\n")
    res = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from lemonade_inferos.integrations import lemonade as L
        hook = L._hook()
        seen = []
        def bump(m):
            m.VALUE += 1
            seen.append(m.__name__)
        def boom(m):
            raise RuntimeError("callback exploded")
        hook.watch("fakehost.mod", bump)
        hook.watch("fakehost.bad", boom)
        assert "fakehost.mod" not in sys.modules          # nothing imported eagerly
        import fakehost.mod, fakehost.bad
        assert fakehost.mod.VALUE == 42 and fakehost.bad.VALUE == 1
        hook.watch("fakehost.mod", bump)                  # already imported: runs at once
        assert fakehost.mod.VALUE == 43 and seen == ["fakehost.mod", "fakehost.mod"]
        L.uninstall_import_hook()
        assert hook not in sys.meta_path
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert "callback exploded" in res.stderr and "Lemonade continues unpatched" in res.stderr


def test_patch_rejects_module_without_ortgenaimodel():
    import types

    from lemonade_inferos.integrations.lemonade import patch_oga_utils

    with pytest.raises(AttributeError):
        patch_oga_utils(types.ModuleType("lemonade.tools.oga.utils"))


def test_run_lemonade_without_lemonade_explains_install(monkeypatch, capsys, tmp_path):
    from lemonade_inferos.integrations import lemonade as L

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(L.SERVER_ENV, raising=False)
    monkeypatch.delenv(L.PYTHON_ENV, raising=False)
    assert L.run_lemonade(["serve"]) == 127
    err = capsys.readouterr().err
    assert "lemonade-server-dev" in err and f"--branch v{L.LEMONADE_VERSION}" in err
    assert 'pip install "./lemonade-src[oga-cpu]"' in err


def test_module_help_explains_instead_of_running_lemonade(capsys):
    from lemonade_inferos.integrations import lemonade as L

    assert L.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "install-hook" in out and "ships the file" in out
