"""``inferos driver status | install | uninstall``: the inferos kernel driver from the command line.

``status`` works for anyone; ``install`` and ``uninstall`` need root.  install builds
driver/linux with DKMS when ``dkms`` is installed (rebuilt for every new kernel) or else with
``make`` against ``/lib/modules/$(uname -r)/build``, loads it, creates the system group
``inferos`` and a udev rule giving the device ``root:inferos 0660``.  The protocol and
everything else: driver/README.md.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

MODULE = "inferos"
VERSION = "0.1.0"
GROUP = "inferos"
UDEV_RULE = Path("/etc/udev/rules.d/70-inferos.rules")
MODPROBE_CONF = Path("/etc/modprobe.d/inferos.conf")
MARKER = "# written by `inferos driver install`; `inferos driver uninstall` removes it"
EXIT_ABSENT = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


def default_source() -> Path:
    """driver/linux of the checkout this package runs from."""
    return Path(__file__).resolve().parents[1] / "driver" / "linux"


def register(sub: Any) -> None:
    d = sub.add_parser(
        "driver",
        help="the inferos kernel driver: status, install (build + load), uninstall",
        description="The optional inferos Linux kernel module (/dev/inferos): a pinned memory pool the KV "
        "store can map and system-wide request accounting across every inference process. Everything "
        "works without it. Protocol and build notes: driver/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  inferos driver status\n  sudo inferos driver install --pool-size 512M\n"
        "  sudo inferos driver install --dry-run     print the steps only\n  sudo inferos driver uninstall",
    )
    dsub = d.add_subparsers(dest="driver_command", metavar="ACTION")
    st = dsub.add_parser("status", help="is the driver loaded and usable? pool, requests, GPU fields",
                         description="Exit status: 0 when the driver is usable, 1 when it is not (the reason "
                         "is printed).")
    st.add_argument("--path", help="device path (default /dev/inferos)")
    st.add_argument("--json", action="store_true", help="print the JSON summary")
    st.set_defaults(func=cmd_status)

    ins = dsub.add_parser("install", help="build (DKMS or make), load, set group and permissions (root)",
                          description="Build the module for the running kernel, load it and make /dev/inferos "
                          "root:inferos 0660 (add users to group 'inferos' to use it). Needs root and the "
                          "kernel headers (Debian/Ubuntu: apt-get install linux-headers-$(uname -r)).")
    ins.add_argument("--pool-size", default=None, metavar="BYTES",
                     help="pinned pool size, e.g. 268435456, 256M, 1G (default: the module's 256 MiB); "
                     "with DKMS it is also written to /etc/modprobe.d/inferos.conf")
    ins.add_argument("--source", type=Path, default=None, help="driver/linux source folder (default: this checkout's)")
    ins.add_argument("--no-dkms", action="store_true", help="build with make even when dkms is installed")
    ins.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    ins.set_defaults(func=cmd_install)

    un = dsub.add_parser("uninstall", help="unload the module and remove what install added (root)",
                         description="rmmod inferos (refused while a process holds it), remove the DKMS "
                         "module and the udev/modprobe files install wrote. The group 'inferos' is kept.")
    un.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    un.set_defaults(func=cmd_uninstall)
    d.set_defaults(func=lambda args: (d.print_help(), EXIT_USAGE)[1])


# ---------------------------------------------------------------- status

def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unavailable"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_status(args: argparse.Namespace) -> int:
    from .resources.driver import driver_status

    st = driver_status(args.path)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["present"] else EXIT_ABSENT
    if not st["present"]:
        print(f"inferos driver: not usable: {st['reason']}")
        return EXIT_ABSENT
    mp, sc, g = st["memory_pool"], st["scheduler"], st["gpu"]
    temp = f"{g['temperature_c']:.1f} °C ({g['thermal_zone']})" if g["temperature_c"] is not None else "unavailable"
    print(f"inferos driver: {st['path']} (ABI {st['abi_version']})")
    print(f"  pinned pool : {_fmt_bytes(mp['used_bytes'])} used of {_fmt_bytes(mp['total_bytes'])} in "
          f"{mp['block_count']} blocks, largest free {_fmt_bytes(mp['largest_free_bytes'])}, "
          f"fragmentation {mp['fragmentation'] * 100:.1f} %")
    print(f"  requests    : {sc['requests_in_flight']} in flight, {sc['requests_completed']} completed "
          f"(avg {sc['avg_latency_ms']:.1f} ms), {sc['requests_aborted']} aborted; "
          f"{sc['processes']} processes hold the device")
    util = "unavailable" if g["utilization_percent"] is None else f"{g['utilization_percent']:.1f} %"
    print(f"  gpu         : utilization {util}, "
          f"memory {_fmt_bytes(g['memory_used_bytes'])} / {_fmt_bytes(g['memory_total_bytes'])}, "
          f"temperature {temp}; system RAM {_fmt_bytes(g['system_memory_available_bytes'])} available of "
          f"{_fmt_bytes(g['system_memory_total_bytes'])}")
    return 0


# ---------------------------------------------------------------- install / uninstall

def parse_size(text: str) -> int:
    """'268435456', '256M', '256MiB', '1G' -> bytes; raises ValueError naming the value."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        n = int(num) * mult
    except ValueError:
        raise ValueError(f"--pool-size {text!r}: expected bytes or a number with K/M/G, e.g. 256M") from None
    if n <= 0 or n % 4096 or n > 4 << 30:
        raise ValueError(f"--pool-size {text!r} = {n} bytes: must be a multiple of 4096 in (0, 4 GiB]")
    return n


def _loaded() -> bool:
    return Path(f"/sys/module/{MODULE}").exists()


def _run(cmd: list[str], dry: bool, check: bool = True) -> int:
    print("  $ " + " ".join(cmd), flush=True)
    if dry:
        return 0
    rc = subprocess.run(cmd).returncode
    if check and rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {rc}")
    return rc


def _write_owned(path: Path, body: str, dry: bool) -> None:
    print(f"  write {path}", flush=True)
    if not dry:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{MARKER}\n{body}\n")


def _remove_owned(path: Path, dry: bool) -> None:
    if path.exists():
        if not path.read_text().startswith(MARKER):
            print(f"  keep {path}: not written by inferos driver install", flush=True)
            return
        print(f"  remove {path}", flush=True)
        if not dry:
            path.unlink()


def _preflight(need_root: bool, dry: bool) -> str | None:
    if not sys.platform.startswith("linux"):
        return ("the inferos driver is a Linux kernel module; no Windows driver is shipped "
                "(driver/README.md has the Windows interface document)")
    if need_root and os.geteuid() != 0 and not dry:
        return "this needs root (it builds and loads a kernel module): run it with sudo"
    return None


def cmd_install(args: argparse.Namespace) -> int:
    err = _preflight(True, args.dry_run)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        pool = parse_size(args.pool_size) if args.pool_size is not None else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    src = (args.source or default_source()).resolve()
    if not (src / "inferos_main.c").exists():
        print(f"error: no driver sources in {src} (pass --source DIR, the repository's driver/linux)", file=sys.stderr)
        return EXIT_USAGE
    kver = platform.release()
    kdir = Path(f"/lib/modules/{kver}/build")
    if not kdir.exists():
        msg = (f"no headers for the running kernel {kver} at {kdir}: install them "
               f"(Debian/Ubuntu: apt-get install linux-headers-{kver})")
        if not args.dry_run:
            print(f"error: {msg}", file=sys.stderr)
            return EXIT_FAILED
        print(f"note: {msg}; the build step below would fail")
    params = [f"pool_size={pool}"] if pool else []
    dkms = shutil.which("dkms") if not args.no_dkms else None
    try:
        if _loaded():
            print(f"[1/4] unloading the loaded {MODULE} module", flush=True)
            if _run(["rmmod", MODULE], args.dry_run, check=False) != 0:
                print("error: the loaded module is in use (a process holds /dev/inferos); stop it, then retry",
                      file=sys.stderr)
                return EXIT_FAILED
        if dkms:
            dst = Path(f"/usr/src/{MODULE}-{VERSION}")
            print(f"[2/4] building with DKMS ({dst})", flush=True)
            if not args.dry_run:
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir(parents=True)
                for f in ("Makefile", "dkms.conf", "inferos_main.c", "inferos_ioctl.h"):
                    shutil.copy2(src / f, dst / f)
            _run([dkms, "remove", "-m", MODULE, "-v", VERSION, "--all"], args.dry_run, check=False)
            _run([dkms, "add", "-m", MODULE, "-v", VERSION], args.dry_run)
            _run([dkms, "build", "-m", MODULE, "-v", VERSION, "-k", kver], args.dry_run)
            _run([dkms, "install", "-m", MODULE, "-v", VERSION, "-k", kver], args.dry_run)
            if pool:
                _write_owned(MODPROBE_CONF, f"options {MODULE} pool_size={pool}", args.dry_run)
            print("[3/4] loading", flush=True)
            _run(["modprobe", MODULE, *params], args.dry_run)
        else:
            build = Path.home() / ".cache" / "inferos-driver" / "install-build" / kver
            print(f"[2/4] building with make in {build} (dkms not found: the module is not rebuilt "
                  "for new kernels)", flush=True)
            if not args.dry_run:
                build.mkdir(parents=True, exist_ok=True)
                for f in ("Makefile", "inferos_main.c", "inferos_ioctl.h"):
                    shutil.copy2(src / f, build / f)
            _run(["make", "-C", str(kdir), f"M={build}", "modules"], args.dry_run)
            print("[3/4] loading", flush=True)
            _run(["insmod", str(build / f"{MODULE}.ko"), *params], args.dry_run)
        print(f"[4/4] group '{GROUP}' and permissions root:{GROUP} 0660", flush=True)
        try:
            gid = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            _run(["groupadd", "--system", GROUP], args.dry_run)
            gid = grp.getgrnam(GROUP).gr_gid if not args.dry_run else -1
        _write_owned(UDEV_RULE, f'KERNEL=="{MODULE}", SUBSYSTEM=="misc", GROUP="{GROUP}", MODE="0660"',
                     args.dry_run)
        dev = Path("/dev/inferos")
        if not args.dry_run and dev.exists():
            os.chown(dev, 0, gid)
            os.chmod(dev, 0o660)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    print(f"done. Add users with `usermod -aG {GROUP} USER` (they log in again).")
    return cmd_status(argparse.Namespace(path=None, json=False))


def cmd_uninstall(args: argparse.Namespace) -> int:
    err = _preflight(True, args.dry_run)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if _loaded() and _run(["rmmod", MODULE], args.dry_run, check=False) != 0:
        print("error: the module is in use (a process holds /dev/inferos); stop it, then retry", file=sys.stderr)
        return EXIT_FAILED
    dkms = shutil.which("dkms")
    if dkms and (args.dry_run or Path(f"/var/lib/dkms/{MODULE}").exists()):
        _run([dkms, "remove", "-m", MODULE, "-v", VERSION, "--all"], args.dry_run, check=False)
        print(f"  remove /usr/src/{MODULE}-{VERSION}", flush=True)
        if not args.dry_run:
            shutil.rmtree(f"/usr/src/{MODULE}-{VERSION}", ignore_errors=True)
    _remove_owned(UDEV_RULE, args.dry_run)
    _remove_owned(MODPROBE_CONF, args.dry_run)
    print(f"{'dry run: nothing changed' if args.dry_run else 'done'} (group '{GROUP}' kept: it may hold users)")
    return 0
