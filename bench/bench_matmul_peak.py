"""The matmul peak of this device: the denominator of every MFU figure the other benchmarks print.

    uv run python -m bench.bench_matmul_peak [--size 2048] [--repeats 7] [--device cuda]

Square matmuls, large enough to run at full speed, in each precision the training loop can use:
fp32 and bf16 everywhere; also fp16 and TF32 on CUDA.
"""

import time

import torch

from bench import report
from device import pick_device
from env import ArgumentParser, cli


def matmul_flops_per_s(size, dtype, device, tf32=False, seconds=0.5):
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 and cuda
    try:
        a @ b  # warm-up: kernel selection, caches
        sync()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            calls += 1
            if cuda and calls % 10:
                continue
            sync()
        sync()
        return 2 * size**3 * calls / (time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before  # callers (bench_train) keep their setting


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=report.positive_int, default=2048)
    parser.add_argument("--repeats", type=report.positive_int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    kinds = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False)}
    if device.startswith("cuda"):
        kinds.update({"float16": (torch.float16, False), "tf32": (torch.float32, True)})
    runs = {name: [] for name in kinds}
    for _ in range(args.repeats):  # alternate the precisions so machine noise hits all alike
        for name, (dtype, tf32) in kinds.items():
            runs[name].append(matmul_flops_per_s(args.size, dtype, device, tf32))
    figures = {name: report.spread(values) for name, values in runs.items()}
    print(f"matmul {args.size}x{args.size}, {device}, {torch.get_num_threads()} threads, GFLOP/s over {args.repeats} repeats")
    report.table(["dtype", "min", "median", "max"],
                 [[name, f["min"] / 1e9, f["median"] / 1e9, f["max"] / 1e9] for name, f in figures.items()])
    report.save("matmul_peak", figures, vars(args), device)


if __name__ == "__main__":
    main()
