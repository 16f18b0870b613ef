"""What every benchmark shares: min/median/max over repeats, a printed table, and a JSON record
(figures, configuration, torch version, device, threads) under bench/results/."""

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from device import cpu_has_native_bf16

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def positive_int(text):
    """argparse type for counts that must be at least 1 (repeats, steps, sizes)."""
    return _int_from(text, 1)


def non_negative_int(text):
    """argparse type for counts that may be 0 (warm-up steps, optional rounds)."""
    return _int_from(text, 0)


def _int_from(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def synchronize(runtime):
    """Wait until the device has finished its queued work, so that a timer measures it."""
    if runtime.device_type == "cuda":
        torch.cuda.synchronize()
    elif runtime.device_type == "mps":
        torch.mps.synchronize()


def spread(values):
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def environment(device="cpu"):
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "processor": processor(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def processor():
    """The CPU's model name (Linux's /proc/cpuinfo; platform.processor() is empty there), and whether it
    computes bf16 in hardware: the hosts of one kind differ in both."""
    name = platform.processor()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    return f"{name}{' (bf16)' if cpu_has_native_bf16() else ''}"


def table(headers, rows):
    """Print rows as a plain aligned table."""
    cells = [[str(h) for h in headers]] + [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def save(name, figures, config, device="cpu"):
    """Write bench/results/{name}.json and say where."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"figures": figures, "config": config, "environment": environment(device)}, f, indent=2)
    print(f"results written to {os.path.relpath(path)}")
    return path


def read_peak(device="cpu", dtype="bfloat16"):
    """The matmul peak (FLOP/s) that bench_matmul_peak measured on this device, or None."""
    path = os.path.join(RESULTS, "matmul_peak.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record["environment"]["device"].split(":")[0] != device.split(":")[0]:
        return None
    return record["figures"].get(dtype, {}).get("max")
