"""Process and machine facts used in stats and benchmark reports."""

from __future__ import annotations

import os
import platform
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``getrusage`` ru_maxrss;
    kilobytes on Linux, bytes on macOS). On Windows, psutil's ``peak_wset``."""
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    except ImportError:  # Windows
        import psutil

        mi = psutil.Process().memory_info()
        return int(getattr(mi, "peak_wset", mi.rss))


def rss_bytes() -> int:
    """Current resident set size of this process, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def machine_description() -> dict:
    """CPU model, core counts, memory, OS and library versions, for benchmark records."""
    import numpy
    import onnxruntime
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
    }
