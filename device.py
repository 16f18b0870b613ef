"""This module decides where the code runs: the device, the precision, the torchrun process group;
and it knows the device's peak speed.

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

# Dense bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' data sheets, for MFU. Matched
# against torch.cuda.get_device_name(), longest name first ("H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = {
    "B200": 2250, "H200": 989, "GH200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989,
    "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70, "A10": 125,
    "A6000": 155, "RTX 6000 Ada": 365, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65,
}


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
    def distributed(self):
        """True under torchrun: several processes that must agree (all-reduce, barriers)."""
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


def cpu_has_native_bf16():
    """Return True where the processor computes bf16 in hardware (AVX-512 BF16, AMX, Arm BF16)."""
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt options


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees buffers of hundreds of MB; by default glibc maps each
    one fresh and unmaps it on free, so every step pays for the kernel zeroing new pages again.
    Same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647, but it holds for a user who just types `uv run train.py`.
    """
    return mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1})


def mallopt(options):
    """Set glibc's allocator options ({option: value}); return False where there is no glibc."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(option, value)) for option, value in options.items()])
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


def setup(device="auto", dtype="auto", group_of_one=False):
    """Pick device and precision; under torchrun also join the process group (NCCL or gloo).
    group_of_one: a single process gets a process group of its own too (FSDP shards over one)."""
    rank, local_rank, world_size = launched()
    chosen = pick_device(device, local_rank)
    runtime = Runtime(chosen, pick_dtype(chosen, dtype), rank, local_rank, world_size)
    if (world_size > 1 or group_of_one) and not dist.is_initialized():
        backend = "nccl" if runtime.device_type == "cuda" else "gloo"
        if runtime.device_type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend=backend, device_id=torch.device(chosen) if backend == "nccl" else None,
                                **meeting_point(rank, world_size))
    if runtime.device_type == "cpu":
        keep_freed_memory()
    if runtime.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever runs outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return runtime


def launched():
    """Return (rank, local_rank, world_size) as torchrun set them: (0, 0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def meeting_point(rank, world_size):
    """Return how init_process_group finds the other ranks: by itself (torchrun's variables), in a
    store of its own for a single process, or, in a one-machine group torchrun has restarted, under
    a prefix of its own in torchrun's store. Without that prefix the restarted ranks can read the
    peer addresses the previous attempt left there and hang or fail connecting to them. (Across
    machines each agent counts its own restarts, so the count is no shared name: README says what
    to set there.)"""
    if world_size == 1:
        return dict(store=dist.HashStore(), rank=0, world_size=1)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return {}
    from torch.distributed.constants import default_pg_timeout

    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_serves and rank == 0, timeout=default_pg_timeout,
                          multi_tenant=True)
    return dict(store=dist.PrefixStore(f"mini-gpt2/attempt_{restart}/", store), rank=rank, world_size=world_size)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def peak_flops(runtime, peak_tflops=0.0):
    """Return the peak FLOP/s of one device, for MFU: `peak_tflops` (PEAK_TFLOPS) if set, else the
    GPU's data sheet figure from GPU_PEAK_TFLOPS, else None (unknown: no MFU is shown)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if runtime.device_type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key] * 1e12
    return None
