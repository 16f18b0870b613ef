"""Other processes, as Linux's /proc shows them: the benchmarks and bench/gpu_check.py watch and stop
the workers torchrun starts (in sessions of their own, which no signal to its process group reaches),
and the servers they start on a free port."""

import contextlib
import os
import signal
import socket
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


def kill_tree(process):
    """SIGKILL a Popen and everything it started (the whole tree is listed before any dies), and reap it."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):  # one that ended meanwhile
            os.kill(pid, signal.SIGKILL)
    process.wait()


def error_line(lines, returncode):
    """A script's own one-line error among its stderr lines (the last `Error:` line), else its last line."""
    errors = [text.strip() for text in lines if text.strip()]
    chosen = [text for text in errors if text.startswith("Error:")] or errors
    return chosen[-1] if chosen else f"exit code {returncode}"


def free_port():
    """Return a TCP port of this machine that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_bytes(pid, field):
    """Return a memory figure of /proc/PID/status ("VmRSS", "VmHWM", ...) in bytes, or None once
    the process has ended."""
    with contextlib.suppress(OSError):
        for line in Path("/proc", str(pid), "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None
