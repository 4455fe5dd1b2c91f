"""inferos driver latency inside the test VM: IOCTL round trip, pinned alloc/free, the Python
client's round trip, and (``--decode``) decode speed with the tiered store's L0 buffer in the
driver pool vs ordinary memory (``driver_pool_decode.py``).

Boots the driver's test VM (``driver/linux/test-in-vm.sh --config base``) ``--boots`` times;
every boot measures each operation thousands of times (``driver/linux/tests/vmtest.c``:
``clock_gettime(CLOCK_MONOTONIC)`` around each call, the cost of a clock read pair reported
separately; ``batch_mean_ns`` = back-to-back calls timed as one, without per-call clock
reads). Reported: the median over boots of each boot's median and p99. Needs root (the script
installs Debian's kernel and QEMU and reads /boot). Writes ``results/driver_latency.json``.

The VM is described in the JSON (KVM or TCG, kernel, vCPUs). Under TCG (no working KVM, as on
these machines) every guest instruction is emulated: the numbers describe the driver's cost
relative to other guest operations (e.g. a clock read), not what bare metal would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = ROOT / "driver" / "linux" / "test-in-vm.sh"

ROWS = [
    ("clock_gettime_pair", "two clock_gettime() calls (timing overhead)"),
    ("ioctl_get_info", "GET_INFO (no lock)"),
    ("ioctl_get_scheduler_stats", "GET_SCHEDULER_STATS (mutex)"),
    ("ioctl_get_memory_pool", "GET_MEMORY_POOL (mutex + bitmap scan of 65,536 pages)"),
    ("ioctl_request_begin", "REQUEST_BEGIN (kmalloc + xa_alloc)"),
    ("ioctl_request_end", "REQUEST_END"),
    ("alloc_pinned_4KiB", "ALLOC_PINNED 4 KiB (genalloc + zero-fill)"),
    ("free_pinned_4KiB", "FREE_PINNED 4 KiB"),
    ("alloc_pinned_1MiB_zeroed", "ALLOC_PINNED 1 MiB (zero-fill dominates)"),
    ("free_pinned_1MiB", "FREE_PINNED 1 MiB"),
    ("py_scheduler_stats", "Python client scheduler_stats() (ctypes + fcntl.ioctl)"),
    ("py_alloc_free_4KiB", "Python client alloc_pinned + free_pinned 4 KiB"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3, help="VM boots (default 3)")
    ap.add_argument("--decode", action="store_true", help="also run driver_pool_decode.py in every boot")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "driver_latency.json")
    args = ap.parse_args(argv)

    boots = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(args.boots):
            print(f"boot {b + 1}/{args.boots} ...", file=sys.stderr, flush=True)
            js = Path(tmp) / f"boot{b}.json"
            cmd = ["bash", str(SCRIPT), "--config", "base", "--no-install-test", "--bench-json", str(js)]
            if args.decode:
                cmd += ["--guest-script", str(HERE / "driver_pool_decode.py")]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0 or not js.exists():
                print(p.stdout[-3000:], p.stderr[-2000:], file=sys.stderr)
                print("error: the VM run failed (see above)", file=sys.stderr)
                return 1
            boots.append(json.loads(js.read_text()))

    vm = boots[0]["vm"]
    summary: dict[str, dict] = {}
    for name in boots[0]["results"]:
        vals = [bt["results"][name] for bt in boots if name in bt["results"]]
        summary[name] = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
    from _common import code_state

    out = {"vm": vm, "boots": args.boots, "code": code_state(), "summary": summary,
           "per_boot": [bt["results"] for bt in boots]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"VM: {vm['accel'].upper()}, Debian kernel {vm['kernel']}, {vm['vcpus']} vCPUs, {vm['mem_mib']} MiB, "
          f"{vm['qemu']}; host {vm['host_cpu']} x{vm['host_cpus']}; medians over {args.boots} boots\n")
    print("| operation | median µs | p99 µs | back-to-back mean µs |")
    print("|---|---:|---:|---:|")
    for name, desc in ROWS:
        r = summary.get(name)
        if r:
            batch = f"{r['batch_mean_ns'] / 1000:.2f}" if "batch_mean_ns" in r else "–"
            print(f"| {desc} | {r['median_ns'] / 1000:.2f} | {r['p99_ns'] / 1000:.2f} | {batch} |")
    if "decode_heap" in summary:
        h, p, r = summary["decode_heap"], summary["decode_pool"], summary["decode_pool_over_heap"]
        per = [bt["results"]["decode_pool_over_heap"]["ratio_median"] for bt in boots]
        print(f"\ndecode tok/s (stories260K, {int(h['steps'])} steps after {int(h['prefill'])} prompt tokens): "
              f"heap {h['tps_median']:.1f}, pool {p['tps_median']:.1f}; pool/heap pair ratio median "
              f"{r['ratio_median']:.3f} (per boot: {', '.join(f'{x:.3f}' for x in per)})")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
