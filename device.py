"""This module decides where the code runs: the device, the precision, the torchrun process group;
and it knows the device's peak speed and peak memory.

train.py, evaluate.py, generate.py, prompt.py and the benchmarks all call `setup()`, so `DEVICE`,
`DTYPE` and torchrun behave the same everywhere.
"""

import contextlib
import ctypes
import os
import platform
import re
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from env import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense tensor-core peaks in TFLOP/s from the vendors' data sheets, for MFU: (bf16 or fp16, float32).
# float32 training runs its matmuls in TF32 (setup() allows it), so the second figure is the TF32
# peak, or the plain float32 one on cards without TF32 (T4, V100). A card is looked up by its exact
# model (gpu_model): an "H100 NVL", an "H800 PCIe" or a laptop part has no row, and so no MFU,
# rather than another card's figure.
GPU_PEAK_TFLOPS = {
    "GB200": (2500, 1250), "B200": (2250, 1125), "H200": (989, 494), "GH200": (989, 494),
    "H100": (989, 494), "H100 PCIE": (756, 378), "H800": (989, 494), "A100": (312, 156),
    "A100 PCIE": (312, 156), "A800": (312, 156), "L40S": (362, 183), "L40": (181, 90), "L4": (121, 60),
    "A10G": (70, 35), "A10": (125, 62), "RTX A6000": (155, 77), "RTX 6000 ADA": (364, 182),
    "RTX 4090": (165, 82), "RTX 3090": (71, 35), "V100": (125, 15.7), "V100 PCIE": (112, 14), "T4": (65, 8.1),
}
# words of a GPU's name that say nothing about its speed: the vendor, the memory, the SXM socket
NAME_NOISE = re.compile(r"NVIDIA|TESLA|GEFORCE|GENERATION|\d+GB|HBM\d*E?|SXM\d*")


@dataclass
class Runtime:
    device: str  # "cpu", "mps", "cuda:0", ...
    dtype: torch.dtype  # the autocast precision; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    capability: tuple | None = None  # a CUDA device's compute capability: (8, 0) for an A100

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

    @property
    def compiles(self):
        """Whether COMPILE=auto turns torch.compile on: on the GPUs that Triton, which generates its
        kernels, supports: NVIDIA's from compute capability 8.0 (Ampere) on, and AMD's. Older cards
        such as the T4 may work but are not supported: they run eagerly unless COMPILE=1."""
        return self.device_type == "cuda" and (torch.version.hip is not None or self.capability >= (8, 0))

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


def return_freed_memory():
    """Ask glibc to give every freed block of 1 MiB or more straight back to the OS, for FSDP.

    FSDP gathers each block's weights, and frees them, twice a micro-batch: kept for reuse, those
    blocks of every size fragment the heap, and the process holds about twice the memory it uses
    (measured: 4.7 GB against 2.2 GB per rank, GPT-2 124M on 2 CPU ranks). The price is fresh
    pages for each large tensor, about a tenth of the step time here."""
    return mallopt({M_MMAP_THRESHOLD: 2**20, M_TRIM_THRESHOLD: 2**20})


def mallopt(options):
    """Set glibc's allocator options ({option: value}); return False where there is no glibc."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(option, value)) for option, value in options.items()])
    except (OSError, AttributeError):
        return False  # not glibc (musl, ...): nothing to tune


def pick_device(requested="auto", local_rank=0, local_ranks=1):
    """Return the device this process uses: DEVICE (auto: CUDA, else MPS, else the CPU), on CUDA
    this rank's own GPU. `local_ranks` is the number of torchrun ranks on this machine. Nothing here
    touches a GPU: that waits until setup() has made this rank's GPU the current one."""
    if requested == "auto":
        if torch.cuda.is_available():
            return cuda_device("", local_rank, local_ranks)
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind not in ("cpu", "mps", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"DEVICE must be auto, cpu, mps, cuda or cuda:N, got {requested!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"DEVICE={requested} but CUDA is not available on this machine")
        return cuda_device(index, local_rank, local_ranks)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("DEVICE=mps but MPS is not available on this machine")
    return kind


def cuda_device(index, local_rank, local_ranks):
    """Return this rank's GPU: cuda:`index` when DEVICE names one, else cuda:LOCAL_RANK, or cuda:0
    where only one GPU is visible. Ranks of one machine that would share a GPU are refused (NCCL
    would fail deep inside): torchrun's ranks all see the same GPUs, while a scheduler such as SLURM
    can show each rank one GPU of its own as cuda:0 (CUDA_VISIBLE_DEVICES per rank)."""
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UserError(f"DEVICE=cuda:{index} but only {count} CUDA device(s) exist")
    shared = local_ranks > 1 and (count > 1 or "TORCHELASTIC_RUN_ID" in os.environ)
    if index and shared:
        raise UserError(f"DEVICE=cuda:{index} would put all {local_ranks} ranks of this machine on one GPU: "
                        "set DEVICE=cuda (or auto), and each rank takes its own (cuda:LOCAL_RANK)")
    if index:
        return f"cuda:{index}"
    if (shared and local_ranks > count) or local_rank >= count > 1:
        raise UserError(f"torchrun starts {max(local_ranks, local_rank + 1)} ranks on this machine, which has "
                        f"{count} GPU(s): at most one rank per GPU (--nproc_per_node={count})")
    return f"cuda:{local_rank if count > 1 else 0}"


def check_dtype(requested):
    """Check that DTYPE is a known value (which precision auto means depends on the device)."""
    if requested != "auto" and requested not in DTYPES:
        raise UserError(f"DTYPE must be auto, float32, bfloat16 or float16, got {requested!r}")


def pick_dtype(device, requested="auto", allow_float16=True):
    """Return the training precision: DTYPE, or for auto bf16 on GPUs with bf16 tensor cores and on
    CPUs with bf16 hardware, fp16 on older GPUs (float32 there without `allow_float16`, as under
    FSDP), and float32 elsewhere. On CUDA call it once `device` is the current GPU (setup() does)."""
    check_dtype(requested)
    kind = device.split(":")[0]
    if kind == "cuda":
        return cuda_dtype(device, requested, allow_float16)
    if requested != "auto":
        return DTYPES[requested]
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cuda_dtype(device, requested, allow_float16=True):
    """Choose by the GPU's compute capability: bf16 from 8.0 (Ampere) on, fp16 with a loss scaler
    below (a T4 is 7.5); on ROCm as torch says. torch.cuda.is_bf16_supported() would say yes to any
    NVIDIA GPU, counting bf16 it emulates without tensor cores."""
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if torch.version.hip:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        require_kernels_for(name, capability)
        native_bf16 = capability >= (8, 0)
    if requested == "bfloat16" and not native_bf16:
        instead = "DTYPE=float16, trained with a loss scaler" if allow_float16 else "DTYPE=float32"
        raise UserError(f"DTYPE=bfloat16 but {name} (compute capability {capability[0]}.{capability[1]}) has no "
                        f"bfloat16 tensor cores (Ampere, 8.0, and newer have): set {instead}, or leave DTYPE unset")
    if requested != "auto":
        return DTYPES[requested]
    if native_bf16:
        return torch.bfloat16
    return torch.float16 if allow_float16 else torch.float32


def require_kernels_for(name, capability):
    """Stop with one line where the installed torch has no kernels for this GPU (a V100, 7.0, under
    a build for 7.5 and newer), instead of failing somewhere deep inside torch. A kernel built for
    sm_XY runs on X.Y and later minor versions of X; PTX built for compute_XY on X.Y and newer."""
    archs = torch.cuda.get_arch_list()
    card = 10 * capability[0] + capability[1]

    def runs(arch):  # "sm_86", "sm_90a", "compute_120"
        kind, _, version = arch.partition("_")
        code = int(re.sub(r"\D", "", version))
        if kind == "compute":  # PTX, which the driver compiles for the card it finds
            return card >= code
        if version.endswith("a"):  # architecture-specific features: that exact card only
            return card == code
        return card // 10 == code // 10 and card >= code

    if archs and not any(runs(arch) for arch in archs):
        codes = [int(re.sub(r"\D", "", arch.partition("_")[2])) for arch in archs]
        raise UserError(f"{name} has compute capability {capability[0]}.{capability[1]}, but this torch "
                        f"({torch.__version__}) has GPU kernels for {min(codes) // 10}.{min(codes) % 10} to "
                        f"{max(codes) // 10}.{max(codes) % 10} only ({' '.join(archs)}): install a torch build that "
                        "supports it (pytorch.org lists them by CUDA version)")


def keep_cuda_memory_unfragmented():
    """Let the CUDA caching allocator grow its segments in place (expandable_segments) unless the
    user configured it. Training alternates with HellaSwag batches of varying shapes and with
    generation, which near the memory limit fragments fixed-size segments into out-of-memory
    errors. Read when the allocator starts, so it is set before anything touches CUDA."""
    if not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"} & os.environ.keys():
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def setup(device="auto", dtype="auto", sharded=False):
    """Pick device and precision; under torchrun also join the process group (NCCL or gloo).
    sharded (FSDP): a single process gets a process group of its own too (FSDP shards over one),
    float32 replaces float16 where bf16 is missing (its loss scaler is untested under FSDP), and a
    CPU process returns freed memory to the OS instead of keeping it."""
    launch = launched()
    chosen = pick_device(device, launch.local_rank, launch.local_world_size)
    capability = None
    if chosen.startswith("cuda"):
        keep_cuda_memory_unfragmented()
        # this rank's GPU before anything queries or allocates: else every rank opens a context on GPU 0
        with warnings.catch_warnings():  # torch's own many-line note on a card it lacks kernels for:
            warnings.filterwarnings("ignore", message=".*(compute|CUDA) capability")  # require_kernels_for says it
            torch.cuda.set_device(chosen)
        capability = torch.cuda.get_device_capability(chosen)
    runtime = Runtime(chosen, pick_dtype(chosen, dtype, allow_float16=not sharded), launch.rank, launch.local_rank,
                      launch.world_size, capability)
    if (launch.world_size > 1 or sharded) and not dist.is_initialized():
        backend = "nccl" if runtime.device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=torch.device(chosen) if backend == "nccl" else None,
                                **meeting_point(launch.rank, launch.world_size))
    if runtime.device_type == "cpu":
        return_freed_memory() if sharded else keep_freed_memory()
    if runtime.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever runs outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return runtime


@dataclass
class Launch:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine


def launched():
    """Return where torchrun placed this process (its variables): Launch() in a plain process."""
    return Launch(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                  int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def meeting_point(rank, world_size):
    """Return how init_process_group finds the other ranks: by itself (torchrun's variables), in a
    store of its own for a single process, or, in a one-machine group torchrun has restarted, under
    a prefix of its own in torchrun's store. Without that prefix the restarted ranks can read the
    peer addresses the previous attempt left there and hang or fail connecting to them. (Across
    machines each agent counts its own restarts, so the count is no shared name: docs/checkpoints.md
    says what to set there.)"""
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
    """Return the peak FLOP/s of one device in the training precision, for MFU: `peak_tflops`
    (PEAK_TFLOPS) if set, else the GPU's data sheet figure from GPU_PEAK_TFLOPS, else None
    (unknown: no MFU is shown)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if runtime.device_type != "cuda":
        return None
    peaks = GPU_PEAK_TFLOPS.get(gpu_model(torch.cuda.get_device_name(runtime.device)))
    if peaks is None:
        return None
    return (peaks[1] if runtime.dtype == torch.float32 else peaks[0]) * 1e12


def gpu_model(name):
    """Return the model in a GPU's name, as GPU_PEAK_TFLOPS knows it: "NVIDIA H100 80GB HBM3" is
    "H100", "NVIDIA A100-PCIE-40GB" "A100 PCIE", "NVIDIA GeForce RTX 4090" "RTX 4090"."""
    words = re.split(r"[\s_-]+", name.upper())
    return " ".join(word for word in words if word and not NAME_NOISE.fullmatch(word))


def to_device(tensors, device):
    """Copy CPU tensors to `device`. On CUDA through pinned memory without waiting, so the copy
    overlaps with compute; elsewhere plainly: an asynchronous copy from pageable memory can arrive
    corrupted on MPS."""
    if torch.device(device).type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


def reset_peak_memory(runtime):
    """Start measuring peak memory anew: on CUDA the caching allocator's peak, on a Linux CPU the
    process's peak RSS (which writing 5 to /proc/self/clear_refs resets). Return False where no
    peak can be measured (MPS, other systems)."""
    if runtime.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
        return True
    if runtime.device_type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False
    return False


def peak_memory(runtime):
    """Return the peak memory in bytes since reset_peak_memory() returned True."""
    if runtime.device_type == "cuda":
        return torch.cuda.max_memory_allocated(runtime.device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
