"""The inferos kernel module in a real kernel: runs driver/linux/test-in-vm.sh (Debian's
linux-image-amd64 booted in QEMU with the module, a static C test program and this
project's Python client) and turns its TAP output into assertions.

Skips when the machine cannot run it: not Linux/x86-64, not root (apt-get install and
/boot/vmlinuz-* need it), or neither the packages nor apt-get are there.
INFEROS_SKIP_VM_TEST=1 skips it on purpose.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "driver" / "linux" / "test-in-vm.sh"


def _skip_reason() -> str | None:
    if os.environ.get("INFEROS_SKIP_VM_TEST") == "1":
        return "INFEROS_SKIP_VM_TEST=1"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the VM test needs Linux on x86-64 (this is {sys.platform}/{platform.machine()})"
    if os.geteuid() != 0:
        return "the VM test needs root (apt-get install of linux-image-amd64 etc., reading /boot/vmlinuz-*)"
    if shutil.which("qemu-system-x86_64") is None and shutil.which("apt-get") is None:
        return "neither qemu-system-x86_64 nor apt-get (to install it) is available"
    return None


@pytest.fixture(scope="module")
def tap(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    bench = tmp_path_factory.mktemp("vm") / "bench.json"
    env = dict(os.environ, INFEROS_VM_PYTHON=os.environ.get("INFEROS_VM_PYTHON", sys.executable))
    proc = subprocess.run(["bash", str(SCRIPT), "--bench-json", str(bench)], capture_output=True, text=True,
                          timeout=900, env=env)
    return proc, bench


def parse_tap(text: str) -> tuple[int | None, list[tuple[bool, int, str]], list[str]]:
    plan, results, bail = None, [], []
    for line in text.splitlines():
        if m := re.match(r"^1\.\.(\d+)", line):
            plan = int(m.group(1))
        elif m := re.match(r"^(ok|not ok) (\d+) - (.*)$", line):
            results.append((m.group(1) == "ok", int(m.group(2)), m.group(3)))
        elif line.startswith("Bail out!"):
            bail.append(line)
    return plan, results, bail


def test_parse_tap_reads_plan_results_and_bail_out():
    plan, res, bail = parse_tap("TAP version 13\n1..3\nok 1 - a\nnot ok 2 - b # why\n# c\nok 3 - d\nBail out! x\n")
    assert plan == 3
    assert res == [(True, 1, "a"), (False, 2, "b # why"), (True, 3, "d")]
    assert bail == ["Bail out! x"]


def test_vm_every_tap_line_ok(tap):
    proc, _ = tap
    plan, results, bail = parse_tap(proc.stdout)
    assert not bail, "\n".join(bail) + "\n" + proc.stderr[-2000:]
    assert plan is not None and plan == len(results) > 0, f"plan {plan}, {len(results)} results\n{proc.stderr[-2000:]}"
    failed = [f"{n} - {name}" for ok, n, name in results if not ok]
    assert not failed, "failed in the VM:\n" + "\n".join(failed) + "\n" + "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith("#   "))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_vm_covered_the_contract(tap):
    """Each required behaviour was really exercised (a silent skip would pass the test above)."""
    proc, _ = tap
    names = [name for ok, _, name in parse_tap(proc.stdout)[1] if ok]
    for cfg in ("[base]", "[debug]"):
        for needle in ("insmod inferos.ko", "4 more processes holding the device", "then ENOMEM",
                       "every block freed", "data written through one mapping reads back",
                       "SIGKILL: the child's blocks come back", "FREE another descriptor's block -> EPERM",
                       "double FREE -> ENOENT", "ALLOC size 0 -> EINVAL", "unknown command 0x222040 -> ENOTTY",
                       "FREE while mapped -> EBUSY", "rmmod inferos", "kernel log has no WARNING"):
            assert any(n.startswith(cfg) and needle in n for n in names), f"{cfg} {needle!r} missing"
    assert any(n.startswith("[base] py: pool exhaustion -> OSError ENOMEM") for n in names)
    assert "slub_debug=FZPU" in proc.stdout


def test_vm_latency_numbers_recorded(tap):
    import json

    _, bench = tap
    data = json.loads(bench.read_text())
    assert data["vm"]["accel"] in ("kvm", "tcg")
    for name in ("ioctl_get_scheduler_stats", "alloc_pinned_4KiB", "free_pinned_4KiB"):
        r = data["results"][name]
        assert 0 < r["min_ns"] <= r["median_ns"] <= r["p99_ns"], name
