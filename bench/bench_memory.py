"""Memory per rank, DDP against FSDP: GPT-2 124M trained by train.py's own step on 2 CPU ranks (gloo).

    uv run python -m bench.bench_memory [--repeats 2] [--steps 3] [--config 124M]

Each repeat launches the two sides one after the other (in the opposite order every other repeat),
each as 2 fresh processes under torchrun, so that every peak RSS is that side's alone. A rank
builds the model as train.py does (train.parallelize, configure_optimizers), makes `--steps`
updates of BATCH_SIZE x SEQ_LENGTH random tokens, and reports:
- its persistent training state: the bytes of its local parameters, gradients and AdamW state
  (under FSDP its shards), with DDP's gradient buckets on a line of their own;
- its peak resident memory (VmHWM), which also counts activations, all-gathered weights, the
  allocator's kept memory and PyTorch itself;
- the median time of its updates after the first.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench import report
from env import ArgumentParser, UserError, cli

CONFIGS = {"124M": dict(n_layer=12, n_head=12, n_embd=768), "small": dict(n_layer=6, n_head=6, n_embd=384)}
SIDES = ("ddp", "fsdp")


def local_bytes(tensors):
    """Return the bytes these tensors hold on this rank (a DTensor: its local shard)."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def peak_rss():
    """Return this process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(args):
    """One rank of one side: train, measure, write its figures as JSON into args.out."""
    import device
    import shards
    import train
    from model import GPT, GPTConfig

    runtime = device.setup("cpu", "float32")
    torch.manual_seed(0)
    raw = GPT(GPTConfig(vocab_size=50304, block_size=1024, **CONFIGS[args.config]))
    model = train.parallelize(raw, runtime, args.parallel, use_compile=False)
    optimizers = raw.configure_optimizers(0.1, 6e-4, "cpu", verbose=False)
    scaler = train.grad_scaler(runtime)
    loader = shards.TokenLoader(args.dataset, "train", args.batch_size, args.seq_length, runtime.rank,
                                runtime.world_size, verbose=False)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train.train_step(model, optimizers, scaler, loader, runtime, 1, 6e-4)
        times.append(time.perf_counter() - start)
    parameters = list(raw.parameters())
    state = [t for optimizer in optimizers for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    figures = {"parameters": local_bytes(parameters), "gradients": local_bytes(p.grad for p in parameters),
               "optimizer": local_bytes(state), "peak_rss": peak_rss(), "step_s": statistics.median(times[1:])}
    if args.parallel == "ddp":  # DDP keeps a flat bucket per group of gradients, as large as they are
        figures["ddp_buckets"] = local_bytes(p for p in parameters if p.requires_grad)
    with open(os.path.join(args.out, f"{args.parallel}_{runtime.rank}.json"), "w") as f:
        json.dump(figures, f)
    device.teardown()


def launch(side, args, dataset, out):
    """Run one side on 2 fresh processes; return each rank's figures."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bench.bench_memory", "--worker", "--parallel", side, "--dataset", dataset, "--out", out,
               "--steps", str(args.steps), "--config", args.config, "--batch-size", str(args.batch_size),
               "--seq-length", str(args.seq_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"the {side} side failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"{side}_{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=report.positive_int, default=2)
    parser.add_argument("--steps", type=report.positive_int, default=3, help="updates per side (the first untimed)")
    parser.add_argument("--config", choices=CONFIGS, default="124M")
    parser.add_argument("--batch-size", type=report.positive_int, default=1)
    parser.add_argument("--seq-length", type=report.positive_int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < 2:
        raise UserError("--steps must be at least 2: the first update is not timed")
    from bench.bench_train import random_token_dataset

    started = time.perf_counter()
    runs = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as dataset, tempfile.TemporaryDirectory() as out:
        random_token_dataset(dataset)
        for repeat in range(args.repeats):
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                runs[side] += launch(side, args, dataset, out)  # both ranks: each a measurement
                print(f"  repeat {repeat + 1}: {side} done", flush=True)

    def column(side, key):
        return report.spread([rank[key] for rank in runs[side]])

    for rank in runs["ddp"] + runs["fsdp"]:
        rank["persistent"] = rank["parameters"] + rank["gradients"] + rank["optimizer"]
    mib = 2**20
    rows, figures = [], {}
    for key, label in (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "AdamW state"),
                       ("persistent", "persistent state"), ("ddp_buckets", "DDP gradient buckets"),
                       ("peak_rss", "peak RSS"), ("step_s", "step time (s)")):
        values = {side: column(side, key) for side in SIDES if key in runs[side][0]}
        figures[key] = values
        scale = 1 if key == "step_s" else mib
        cells = [f"{values[side]['median'] / scale:,.2f}" if side in values else "-" for side in SIDES]
        ratio = values["fsdp"]["median"] / values["ddp"]["median"] if len(values) == 2 else None
        rows.append([label + ("" if key == "step_s" else " (MiB)"), *cells, f"{ratio:.2f}x" if ratio else ""])
    print(f"{args.config}, 2 CPU ranks (gloo), float32, batch {args.batch_size}x{args.seq_length}, "
          f"median over {args.repeats} repeats x 2 ranks, per rank:")
    report.table(["per rank", "DDP", "FSDP", "FSDP / DDP"], rows)
    config = {**{k: v for k, v in vars(args).items() if k not in ("worker", "parallel", "dataset", "out")},
              "seconds": round(time.perf_counter() - started, 1)}
    report.save("memory", figures, config, "cpu")


if __name__ == "__main__":
    main()
