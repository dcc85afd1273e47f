"""What machine a benchmark ran on, for every results file."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


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
