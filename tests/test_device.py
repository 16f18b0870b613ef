"""device.py on GPUs and Macs this machine does not have: the CUDA and MPS queries are faked, and
the tests check which precision, compile decision, GPU and allocator setting each card gets, in
which order the GPU is touched, and what is refused with one line."""

import mmap
import os

import pytest
import torch

import device
import hellaswag
import train
from env import UserError
from settings import TrainConfig

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # as a CUDA 13 build of torch lists them


@pytest.fixture
def gpus(monkeypatch):
    """Return a function that installs fake GPUs, each (name, capability), and the list of what was
    asked of which GPU: ("set_device", index), ("name", index), ("capability", index)."""
    asked = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # setup() sets them

    def install(*cards, visible=None, torchrun=False):
        current = [0]

        def index(d=None):
            return current[0] if d is None or torch.device(d).index is None else torch.device(d).index

        def ask(what, d=None):
            asked.append((what, index(d)))
            return cards[index(d)]

        def set_device(d):
            asked.append(("set_device", index(d), os.environ.get("PYTORCH_ALLOC_CONF")))
            current[0] = index(d)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ARCHS)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: ask("name", d)[0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: ask("capability", d)[1])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("is_bf16_supported asked"))
        monkeypatch.setattr(torch.version, "hip", None)
        for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "CUDA_VISIBLE_DEVICES",
                     "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(name, raising=False)
        if visible is not None:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        if torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        return asked

    yield install
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


H100 = ("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize("card, dtype, compiles", [
    (("Tesla T4", (7, 5)), torch.float16, False),  # fp16 with the loss scaler; Triton dropped sm75: eager
    (("NVIDIA A100-SXM4-80GB", (8, 0)), torch.bfloat16, True),
    (("NVIDIA GeForce RTX 3090", (8, 6)), torch.bfloat16, True),
    (H100, torch.bfloat16, True),
])
def test_each_rank_picks_its_precision_by_its_own_gpus_capability(gpus, monkeypatch, card, dtype, compiles):
    # GPU 0 is another card: a query of it would give the wrong answer
    asked = gpus(("NVIDIA B200", (10, 0)), card, torchrun=True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    runtime = device.setup("auto", "auto")
    assert (runtime.device, runtime.dtype, runtime.compiles) == ("cuda:1", dtype, compiles)
    assert asked[0] == ("set_device", 1, "expandable_segments:True")  # first, with the allocator set
    assert all(question[1] == 1 for question in asked)  # GPU 0 was never touched
    if dtype == torch.float16:
        assert train.grad_scaler(runtime).is_enabled()  # fp16 trains with a loss scaler


def test_a_gpu_the_installed_torch_has_no_kernels_for_is_one_line(gpus):
    gpus(("Tesla V100-SXM2-16GB", (7, 0)))
    with pytest.raises(UserError) as error:
        device.setup("auto", "auto")
    assert str(error.value) == (
        "Tesla V100-SXM2-16GB has compute capability 7.0, but this torch "
        f"({torch.__version__}) has GPU kernels for 7.5 to 12.0 only ({' '.join(ARCHS)}): install a torch build "
        "that supports it (pytorch.org lists them by CUDA version)")


T4_BF16 = "DTYPE=bfloat16 but Tesla T4 (compute capability 7.5) has no bfloat16 tensor cores (Ampere, 8.0, and newer have): "


@pytest.mark.parametrize("requested, sharded, expected", [
    ("bfloat16", False, T4_BF16 + "set DTYPE=float16, trained with a loss scaler, or leave DTYPE unset"),
    ("bfloat16", True, T4_BF16 + "set DTYPE=float32, or leave DTYPE unset"),  # FSDP: no float16
    ("float16", False, torch.float16),
    ("float32", False, torch.float32),
    ("auto", True, torch.float32),  # FSDP, which does not train in float16: float32 on a T4
])
def test_explicit_precisions_on_a_t4(gpus, monkeypatch, requested, sharded, expected):
    monkeypatch.setattr(device.dist, "init_process_group", lambda **kwargs: None)  # FSDP's group of one
    gpus(("Tesla T4", (7, 5)))
    if isinstance(expected, str):
        with pytest.raises(UserError) as error:
            device.setup("auto", requested, sharded=sharded)
        assert str(error.value) == expected
    else:
        assert device.setup("auto", requested, sharded=sharded).dtype == expected


def test_the_settings_are_checked_without_touching_a_gpu(gpus, monkeypatch):
    gpus(H100, H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: pytest.fail("GPU queried"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: pytest.fail("GPU queried"))
    train.check_settings(TrainConfig(), device.Launch(rank=1, local_rank=1, world_size=2, local_world_size=2))
    with pytest.raises(UserError, match="PARALLEL=fsdp trains in bfloat16 or float32, not float16: on GPUs "
                                        r"without bfloat16 \(T4, V100\) set DTYPE=float32"):
        train.check_settings(TrainConfig(parallel="fsdp", dtype="float16"), device.Launch())


def test_a_single_process_on_cuda_n_makes_it_the_current_gpu(gpus):
    asked = gpus(H100, H100)
    runtime = device.setup("cuda:1", "auto")
    assert runtime.device == "cuda:1" and asked[0][:2] == ("set_device", 1)


@pytest.mark.parametrize("requested, local_rank, local_ranks, cards, torchrun, expected", [
    ("auto", 1, 2, 2, True, "cuda:1"),
    ("cuda", 1, 2, 2, True, "cuda:1"),
    ("auto", 0, 1, 2, False, "cuda:0"),
    ("cuda:1", 0, 1, 2, False, "cuda:1"),
    ("auto", 1, 1, 2, False, "cuda:1"),  # a launcher that sets LOCAL_RANK only
    ("auto", 1, 2, 1, False, "cuda:0"),  # SLURM shows each rank its own GPU as cuda:0
    ("cuda:0", 1, 2, 1, False, "cuda:0"),
    ("cuda:1", 0, 2, 2, True, "DEVICE=cuda:1 would put all 2 ranks of this machine on one GPU"),
    ("cuda:0", 0, 2, 1, True, "DEVICE=cuda:0 would put all 2 ranks of this machine on one GPU"),
    ("auto", 1, 2, 1, True, "torchrun starts 2 ranks on this machine, which has 1 GPU"),  # whatever CUDA_VISIBLE_DEVICES
    ("auto", 3, 4, 2, True, r"at most one rank per GPU \(--nproc_per_node=2\)"),
])
def test_ranks_never_share_a_gpu(gpus, requested, local_rank, local_ranks, cards, torchrun, expected):
    gpus(*[H100] * cards, visible="0" if cards == 1 else None, torchrun=torchrun)
    if expected.startswith("cuda"):
        assert device.pick_device(requested, local_rank, local_ranks) == expected
    else:
        with pytest.raises(UserError, match=expected):
            device.pick_device(requested, local_rank, local_ranks)


@pytest.mark.parametrize("preset", [{"PYTORCH_ALLOC_CONF": "backend:native"},
                                    {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}])
def test_an_allocator_setting_of_the_users_is_kept(gpus, monkeypatch, preset):
    gpus(H100)
    for name, value in preset.items():
        monkeypatch.setenv(name, value)
    device.setup("auto", "auto")
    assert {name: os.environ.get(name) for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")} == {
        "PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, **preset}


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989),
    ("NVIDIA H100 80GB HBM3", torch.float32, 494),  # float32 trains in TF32: its peak
    ("NVIDIA H100 PCIe", torch.bfloat16, 756),
    ("NVIDIA A100-PCIE-40GB", torch.float32, 156),
    ("Tesla T4", torch.float16, 65),
    ("Tesla T4", torch.float32, 8.1),  # no TF32 on Turing
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165),
    ("NVIDIA GB200", torch.bfloat16, 2500),  # not a B200's
    ("NVIDIA H100 NVL", torch.bfloat16, None),  # not an H100 SXM's: no figure rather than a wrong one
    ("NVIDIA H800 PCIe", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", torch.bfloat16, None),
])
def test_the_mfu_peak_is_the_cards_own_in_the_training_precision(monkeypatch, name, dtype, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    peak = device.peak_flops(device.Runtime("cuda:0", dtype))
    assert peak == (tflops * 1e12 if tflops else None)


def test_torchrun_on_apple_silicon_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"train in one process \(uv run train.py\), or on CPU ranks with DEVICE=cpu"):
        train.check_settings(TrainConfig(), device.Launch(world_size=2, local_world_size=2))
    train.check_settings(TrainConfig(), device.Launch())  # one process on MPS is fine
    train.check_settings(TrainConfig(device="cpu"), device.Launch(world_size=2, local_world_size=2))


def test_batches_reach_mps_by_plain_copies(monkeypatch):
    """Asynchronous copies from pageable memory can arrive corrupted on MPS: only CUDA gets them."""
    copies = []

    def record(tensor, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return tensor

    rows = [[hellaswag.encode_example({"ctx": "A man", "endings": [" runs", " sits", " eats", " jumps"], "label": 0})]]
    monkeypatch.setattr(torch.Tensor, "to", record)
    hellaswag._pack(rows, torch.device("mps"))
    device.to_device([torch.zeros(2)], "mps")
    assert copies == [False] * 5


def test_the_peak_memory_of_an_update_is_measured_on_the_cpu():
    runtime = device.Runtime("cpu", torch.float32)
    assert device.reset_peak_memory(runtime)
    before = device.peak_memory(runtime)
    size = 200 * 2**20
    with mmap.mmap(-1, size) as memory:  # fresh pages, whatever freed memory the allocator keeps
        for page in range(0, size, mmap.PAGESIZE):
            memory[page] = 1
    assert device.peak_memory(runtime) >= before + size - 10 * 2**20
    assert device.reset_peak_memory(runtime)  # the next update's peak starts from now
    assert device.peak_memory(runtime) < before + size // 2


def test_ddp_runs_on_the_gpu_the_rank_took(monkeypatch):
    """SLURM's own-GPU ranks all take cuda:0, whatever their LOCAL_RANK: DDP must use that GPU."""
    wrapped = {}
    monkeypatch.setattr(train, "DDP", lambda model, device_ids: wrapped.setdefault("device_ids", device_ids))
    runtime = device.Runtime("cuda:0", torch.bfloat16, rank=1, local_rank=1, world_size=2)
    train.parallelize(torch.nn.Linear(2, 2), runtime, "ddp", use_compile=False)
    assert wrapped["device_ids"] == [0]
