"""What machine a benchmark ran on (for every results file), what a process costs on it, and
progress lines."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable


def machine_info(**versions: Any) -> dict[str, Any]:
    """CPU, platform, load average, plus the library versions a benchmark names."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": cpu_model, "platform": platform.platform(), "python": platform.python_version(),
            **versions, "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---- what a process costs, read at the edges of a measured window (Linux /proc)
HZ = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process pid (all its threads) has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2:].split()  # rest[0] is field 3 (state): utime = field 14, stime = 15
    return (int(rest[11]) + int(rest[12])) / HZ


def process_rss_mb(pid: int) -> float | None:
    """Resident memory of process pid in MiB (None when it is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / HZ


def progress_printer(label: str) -> Callable[[str], None]:
    """A benchmark's progress lines on stderr: `[label   12.3s] message`, seconds since this call."""
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{label} {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return progress
