"""Other processes, as Linux's /proc shows them: the benchmarks and bench/gpu_check.py watch and stop
the workers torchrun starts (in sessions of their own, which no signal to its process group reaches)."""

import contextlib
from pathlib import Path


def descendants(pid):
    """Return the processes `pid` started, and the ones they started."""
    children = {}
    for entry in filter(str.isdigit, (path.name for path in Path("/proc").iterdir())):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            stat = Path("/proc", entry, "stat").read_text()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, unvisited = [], [pid]
    while unvisited:
        started = children.get(unvisited.pop(), [])
        found += started
        unvisited += started
    return found


def status_bytes(pid, field):
    """Return a memory figure of /proc/PID/status ("VmRSS", "VmHWM", ...) in bytes, or None once
    the process has ended."""
    with contextlib.suppress(OSError):
        for line in Path("/proc", str(pid), "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None
