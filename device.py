"""Where the code runs: the device, the precision, and the torchrun process group.

train.py, evaluate.py, generate.py, prompt.py and the benchmarks all call `setup()`, so `DEVICE`,
`DTYPE` and torchrun behave the same everywhere.
"""

import contextlib
import ctypes
import os
import platform
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from env import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: str  # "cpu", "mps", "cuda:0", ...
    dtype: torch.dtype  # the autocast precision; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def ddp(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master(self):
        """Rank 0 logs, evaluates samples and writes files."""
        return self.rank == 0

    @property
    def dtype_name(self):
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def autocast(self):
        """Matmuls in the low precision, reductions and weights kept in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


def cpu_has_native_bf16():
    """True where the processor computes bf16 in hardware (AVX-512 BF16, AMX, Arm BF16)."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
            return out.stdout.strip() == "1"
        except OSError:
            return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def keep_freed_memory(keep=True):
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees buffers of hundreds of MB; by default glibc maps each
    one fresh and unmaps it on free, so every step pays for the kernel zeroing new pages again
    (measured here: up to 46% of a small model's step). Same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647, but it holds for a user who just types `uv run train.py`.
    keep=False is for bench_train's baseline, an untuned process: glibc's defaults at the most their
    self-adjustment reaches (the thresholds rise with the buffers a process frees, up to 32 MiB
    mapped fresh each time), so that if anything the baseline is flattered. They are set explicitly
    because setting the trim or mmap thresholds, as keep=True does, stops that self-adjustment.
    """
    if platform.system() != "Linux":
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    if keep:
        settings = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
    else:
        settings = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(option, value)) for option, value in settings.items()])
    except (OSError, AttributeError):
        return False  # not glibc (musl, ...): nothing to tune


def pick_device(requested="auto", local_rank=0):
    if requested == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind not in ("cpu", "mps", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"DEVICE must be auto, cpu, mps, cuda or cuda:N, got {requested!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"DEVICE={requested} but CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"DEVICE={requested} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return requested if index else f"cuda:{local_rank}"
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("DEVICE=mps but MPS is not available on this machine")
    return kind


def pick_dtype(device, requested="auto"):
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"DTYPE must be auto, float32, bfloat16 or float16, got {requested!r}")
        return DTYPES[requested]
    kind = device.split(":")[0]
    if kind == "cuda":
        # bf16 on Ampere and newer; fp16 (with a gradient scaler) on T4 and V100
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def setup(device="auto", dtype="auto"):
    """Pick device and precision; under torchrun also join the process group (NCCL or gloo)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    chosen = pick_device(device, local_rank)
    runtime = Runtime(chosen, pick_dtype(chosen, dtype), rank, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if runtime.device_type == "cuda":
            torch.cuda.set_device(chosen)
            dist.init_process_group(backend="nccl", device_id=torch.device(chosen))
        else:
            dist.init_process_group(backend="gloo")
    if runtime.device_type == "cpu":
        keep_freed_memory()
    if runtime.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever runs outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return runtime


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
