"""``inferos driver status | install | uninstall`` on this machine (no inferos module here).

The real install/status/uninstall with a loaded module runs inside the VM
(driver/linux/test-in-vm.sh, tests/test_driver_vm.py)."""

from __future__ import annotations

import json

import pytest

from lemonade_inferos import cli, driver_cli


def test_status_absent_json_and_text(tmp_path, capsys):
    p = str(tmp_path / "inferos")
    assert cli.main(["driver", "status", "--path", p, "--json"]) == driver_cli.EXIT_ABSENT
    st = json.loads(capsys.readouterr().out)
    assert st["present"] is False and st["path"] == p and "absent" in st["reason"]
    assert cli.main(["driver", "status", "--path", p]) == driver_cli.EXIT_ABSENT
    assert "not usable" in capsys.readouterr().out


@pytest.mark.parametrize("text,n", [("268435456", 268435456), ("256M", 256 << 20), ("256MiB", 256 << 20),
                                    ("1G", 1 << 30), ("64k", 64 << 10), ("4G", 4 << 30)])
def test_parse_size(text, n):
    assert driver_cli.parse_size(text) == n


@pytest.mark.parametrize("text", ["0", "12345", "5G", "abc", "-4096", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="--pool-size"):
        driver_cli.parse_size(text)


def test_install_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(driver_cli.os, "geteuid", lambda: 1000)
    assert cli.main(["driver", "install"]) == driver_cli.EXIT_USAGE
    assert "needs root" in capsys.readouterr().err
    assert cli.main(["driver", "uninstall"]) == driver_cli.EXIT_USAGE
    assert "needs root" in capsys.readouterr().err


def test_install_rejects_bad_pool_size_and_source(tmp_path, capsys):
    assert cli.main(["driver", "install", "--dry-run", "--pool-size", "12345"]) == driver_cli.EXIT_USAGE
    assert "multiple of 4096" in capsys.readouterr().err
    assert cli.main(["driver", "install", "--dry-run", "--source", str(tmp_path)]) == driver_cli.EXIT_USAGE
    assert "no driver sources" in capsys.readouterr().err


def test_install_and_uninstall_dry_run_change_nothing(capsys):
    assert cli.main(["driver", "install", "--dry-run", "--no-dkms", "--pool-size", "64M"]) == 0
    out = capsys.readouterr().out
    assert "make -C /lib/modules/" in out and "pool_size=67108864" in out
    assert "dry run: nothing changed" in out
    assert not driver_cli.UDEV_RULE.exists() or driver_cli.UDEV_RULE.read_text().startswith(driver_cli.MARKER)
    assert cli.main(["driver", "uninstall", "--dry-run"]) == 0
    assert "nothing changed" in capsys.readouterr().out


def test_uninstall_keeps_files_it_did_not_write(tmp_path, monkeypatch, capsys):
    mine, theirs = tmp_path / "mine.rules", tmp_path / "theirs.rules"
    driver_cli._write_owned(mine, "x", dry=False)
    theirs.write_text("KERNEL==\"inferos\", GROUP=\"video\"\n")
    driver_cli._remove_owned(theirs, dry=False)
    driver_cli._remove_owned(mine, dry=False)
    assert theirs.exists() and not mine.exists()
    assert "not written by inferos driver install" in capsys.readouterr().out
