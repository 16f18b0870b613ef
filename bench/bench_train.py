"""Training speed: tokens/s and MFU of train.py's own update step, tiny and small configurations.

    uv run python -m bench.bench_train                 # tiny and small, default precision (< 3 min)
    uv run python -m bench.bench_train --parity        # does the default precision learn like fp32?
    uv run python -m bench.bench_train --profile       # where a step's time goes (torch.profiler, eager)

Each repeat times `--steps` calls of train.train_step (one update: BATCH_SIZE=8 x SEQ_LENGTH=256
tokens, AdamW, clipping, the data loader over memory-mapped shards) and as many steps of the
baseline, a build-nanogpt-style loop on the same model (see BuildNanogptStep). The configurations
take turns, and so do the two sides, in the opposite order every other repeat, so machine noise
hits all alike; "speed-up" is the ratio of each repeat's pair. MFU is against the device's matmul
peak in the training precision, measured between the repeats of this same run (bench_matmul_peak's
recorded figure is shown beside it); against PEAK_TFLOPS when set, and on a GPU otherwise its
data-sheet bf16 peak, as train.py. On CUDA "float32" means TF32 matmuls, as device.setup() sets.

--parity trains the tiny configuration 100 updates on the demo corpus in float32 and in the default
precision from the same initial weights and batches, and reports the mean loss of updates 91-100 of
each (the performance issue asks for them to agree within 0.02).
"""

import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

import device
import shards
import train
from bench import report
from bench.bench_matmul_peak import matmul_flops_per_s
from env import ArgumentParser, UserError, cli
from model import GPT, GPTConfig
from settings import TrainConfig, shared

PARITY_TOLERANCE = 0.02  # nats: the default precision must learn like float32
SHAPES = {"tiny": dict(n_layer=2, n_head=2, n_embd=128), "small": dict(n_layer=6, n_head=6, n_embd=384),
          "124M": dict(n_layer=12, n_head=12, n_embd=768)}


def random_token_dataset(path, tokens=1_000_000, seed=0):
    """Random GPT-2 ids in shards.py's format: the step's cost does not depend on what it reads."""
    ids = np.random.default_rng(seed).integers(0, 50257, tokens, dtype=np.uint16)
    names = {split: [shards.shard_name(split, 0)] for split in ("train", "val")}
    for split in names:
        np.save(os.path.join(path, names[split][0]), ids)
    shards.write_meta(path, {"splits": {split: {"shards": names[split], "tokens": tokens, "documents": 0}
                                        for split in names}})


def make_model(name, runtime, use_compile, seq_length, seed):
    """The configuration's GPT, with the same initial weights for a given seed: (raw, as stepped)."""
    torch.manual_seed(seed)
    raw = GPT(GPTConfig(block_size=max(256, seq_length), vocab_size=50304, **SHAPES[name])).to(runtime.device)
    return raw, torch.compile(raw) if use_compile else raw


class Setup:
    """One configuration ready to step: the same objects train.py builds."""

    keeps_freed_memory = True  # as device.setup() sets it for train.py (device.keep_freed_memory)

    def __init__(self, name, runtime, dataset_path, use_compile, batch_size=8, seq_length=256, seed=1337):
        self.raw, self.model = make_model(name, runtime, use_compile, seq_length, seed)
        self.optimizers = self.raw.configure_optimizers(0.1, 6e-4, runtime.device_type, verbose=False)
        self.scaler = train.grad_scaler(runtime)
        self.loader = shards.TokenLoader(dataset_path, "train", batch_size, seq_length, verbose=False)
        self.runtime = runtime
        self.B, self.T = batch_size, seq_length

    def step(self, lr=6e-4):
        loss, _ = train.train_step(self.model, self.optimizers, self.scaler, self.loader, self.runtime, 1, lr)
        return loss.item()  # waits for the device, as train.py's loop does


class BuildNanogptStep:
    """The baseline: build-nanogpt's update as it runs on this device. The same model and autocast
    precision, but the full (tokens x 50,304) logits and F.cross_entropy on them, AdamW fused only on
    CUDA, the token stream as one torch tensor, and on the CPU glibc's allocator as an untuned process
    has it (set_allocator(keep_freed=False))."""

    keeps_freed_memory = False

    def __init__(self, name, runtime, dataset_path, use_compile, batch_size=8, seq_length=256, seed=1337):
        raw, self.model = make_model(name, runtime, use_compile, seq_length, seed)
        params = list(raw.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = runtime.device_type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        ids = np.load(os.path.join(dataset_path, shards.shard_name("train", 0)))
        self.tokens = torch.tensor(ids.astype(np.int32), dtype=torch.long)
        self.B, self.T, self.position = batch_size, seq_length, 0
        self.runtime = runtime

    def step(self, lr=6e-4):
        B, T = self.B, self.T
        buf = self.tokens[self.position:self.position + B * T + 1]
        x, y = buf[:-1].view(B, T).to(self.runtime.device), buf[1:].view(B, T).to(self.runtime.device)
        self.position = self.position + B * T if self.position + 2 * B * T + 1 <= len(self.tokens) else 0
        self.model.train()
        self.optimizer.zero_grad()
        with self.runtime.autocast():
            _, loss = self.model(x, y)  # the logits in full, then F.cross_entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return loss.item()


def set_allocator(keep_freed):
    """glibc's allocator as train.py sets it (keep_freed: device.keep_freed_memory), or as an untuned
    process has it: the defaults at the most their self-adjustment reaches (the thresholds rise with
    the buffers a process frees, up to 32 MiB mapped fresh each time), so that if anything the
    baseline is flattered. They are set explicitly because any earlier mallopt of the trim or mmap
    thresholds, as keep_freed_memory makes, stops that self-adjustment."""
    if keep_freed:
        return device.keep_freed_memory()
    return device.mallopt({device.M_MMAP_MAX: 65536, device.M_MMAP_THRESHOLD: 32 * 2**20,
                           device.M_TRIM_THRESHOLD: 64 * 2**20})


def timed_tokens_per_s(setup, steps, runtime):
    """One untimed step (the allocator settles after the other side ran), then `steps` timed ones."""
    set_allocator(setup.keeps_freed_memory)
    setup.step()
    report.synchronize(runtime)
    start = time.perf_counter()
    for _ in range(steps):
        setup.step()
    return steps * setup.B * setup.T / (time.perf_counter() - start)


def speed(args, runtime):
    use_compile = runtime.compiles if args.compile == "auto" else args.compile == "1"
    sides = {"ours": Setup} | ({"baseline": BuildNanogptStep} if args.baseline else {})
    with tempfile.TemporaryDirectory() as dataset_path:
        random_token_dataset(dataset_path)
        setups = {(name, side): make(name, runtime, dataset_path, use_compile, args.batch_size, args.seq_length)
                  for name in args.configs for side, make in sides.items()}
        for setup in setups.values():
            set_allocator(setup.keeps_freed_memory)
            for _ in range(args.warmup):
                setup.step()
        runs = {key: [] for key in setups}
        peaks = []
        for repeat in range(args.repeats):
            device.keep_freed_memory()
            peaks.append(matmul_flops_per_s(2048, runtime.dtype, runtime.device, seconds=0.3))
            for name in args.configs:
                for side in list(sides) if repeat % 2 == 0 else list(sides)[::-1]:
                    runs[name, side].append(timed_tokens_per_s(setups[name, side], args.steps, runtime))
        device.keep_freed_memory()
    # PEAK_TFLOPS, else a GPU's data-sheet bf16 peak (as train.py), else the best matmul rate of this run
    peak = device.peak_flops(runtime, shared("peak_tflops")) or max(peaks)
    figures = {}
    for name in args.configs:
        raw = setups[name, "ours"].raw
        flops = raw.flops_per_token(args.seq_length)
        figures[name] = {"params": raw.num_params(), "flops_per_token": flops}
        for side in sides:
            values = runs[name, side]
            figures[name][side] = {"tok_per_sec": report.spread(values), "mfu": report.spread([v * flops / peak for v in values])}
        if args.baseline:
            figures[name]["speedup"] = report.spread([a / b for a, b in zip(runs[name, "ours"], runs[name, "baseline"])])
    dtype = runtime.dtype_name
    print(f"train.train_step, {runtime.device} {dtype}, compile {'on' if use_compile else 'off'}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}x{args.seq_length}, "
          f"{args.repeats} repeats of {args.steps} steps")
    recorded = report.read_peak(runtime.device, dtype)
    print(f"MFU against a peak of {peak / 1e9:,.0f} GFLOP/s; the best 2048x2048 {dtype} matmul during this run: "
          f"{max(peaks) / 1e9:,.0f}" + (f"; bench_matmul_peak recorded {recorded / 1e9:,.0f}" if recorded else ""))
    headers = ["config", "tok/s min", "median", "max", "MFU % min", "median", "max"]
    if args.baseline:
        headers += ["baseline tok/s", "MFU %", "speed-up min", "median", "max"]
    rows = []
    for name, f in figures.items():
        ours = f["ours"]
        row = [name, ours["tok_per_sec"]["min"], ours["tok_per_sec"]["median"], ours["tok_per_sec"]["max"],
               100 * ours["mfu"]["min"], 100 * ours["mfu"]["median"], 100 * ours["mfu"]["max"]]
        if args.baseline:
            row += [f["baseline"]["tok_per_sec"]["median"], 100 * f["baseline"]["mfu"]["median"],
                    f"{f['speedup']['min']:.2f}x", f"{f['speedup']['median']:.2f}x", f"{f['speedup']['max']:.2f}x"]
        rows.append(row)
    report.table(headers, rows)
    if args.baseline:
        print("baseline: build-nanogpt-style step (full logits + F.cross_entropy, AdamW fused only on CUDA, "
              "glibc's allocator untuned)")
    config = {**vars(args), "dtype": dtype, "compile": use_compile, "peak_flops": peak, "peak_runs": report.spread(peaks)}
    report.save("train", figures, config, runtime.device)


def profile(args, runtime):
    """torch.profiler's table of the operators that take a train_step's time, per configuration."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device_type == "cuda" else [])
    sort_by = "self_device_time_total" if runtime.device_type == "cuda" else "self_cpu_time_total"
    with tempfile.TemporaryDirectory() as dataset_path:
        random_token_dataset(dataset_path)
        for name in args.configs:
            setup = Setup(name, runtime, dataset_path, use_compile=False, batch_size=args.batch_size,
                          seq_length=args.seq_length)
            for _ in range(args.warmup):
                setup.step()
            with profiler(activities=activities) as prof:
                for _ in range(args.steps):
                    setup.step()
            print(f"\n{name}: {args.steps} steps of batch {args.batch_size}x{args.seq_length}, "
                  f"{runtime.device} {runtime.dtype_name}, eager")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=15))


def demo_dataset_path():
    """The demo corpus, built once into bench/results/ (ignored by git)."""
    import dataset

    path = os.path.join(report.RESULTS, "demo_dataset")
    if not os.path.isfile(os.path.join(path, shards.META)):
        dataset.build("demo", path, 10**8)
    return path


def parity(args):
    """Mean loss of updates 91-100 of the tiny configuration in float32 and the default precision."""
    default = device.setup(args.device, args.dtype)
    if default.dtype == torch.float32:
        raise UserError(f"the precision here ({default.device}, --dtype {args.dtype}) is float32 already: "
                        "nothing to compare; pass --dtype bfloat16 or float16")
    dataset_path = demo_dataset_path()
    schedule = TrainConfig(max_lr=3e-3, min_lr=3e-4, warmup_steps=10, max_steps=100)
    results = {}
    for runtime in (dataclasses.replace(default, dtype=torch.float32), default):
        print(f"{runtime.dtype_name}: {schedule.max_steps} updates of the tiny configuration...", flush=True)
        setup = Setup("tiny", runtime, dataset_path, use_compile=False)
        start = time.perf_counter()
        losses = [setup.step(train.get_lr(step, schedule)) for step in range(schedule.max_steps)]
        results[runtime.dtype_name] = {"mean_loss_91_100": float(np.mean(losses[90:])),
                                       "seconds": time.perf_counter() - start, "losses": losses}
    print("tiny configuration, 100 updates of 2,048 demo tokens, MAX_LR 3e-3, warm-up 10, cosine to 3e-4")
    report.table(["dtype", "mean loss 91-100", "seconds"],
                 [[name, f"{r['mean_loss_91_100']:.4f}", r["seconds"]] for name, r in results.items()])
    difference = abs(results["float32"]["mean_loss_91_100"] - results[default.dtype_name]["mean_loss_91_100"])
    verdict = "within" if difference <= PARITY_TOLERANCE else "NOT within"
    print(f"difference: {difference:.4f}, {verdict} the {PARITY_TOLERANCE} the performance issue allows")
    report.save("train_parity", {**results, "difference": difference}, {**vars(args), "dtype": default.dtype_name},
                default.device)
    if difference > PARITY_TOLERANCE:
        raise SystemExit(1)


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small, 124M")
    parser.add_argument("--batch-size", type=report.positive_int, default=8, help="BATCH_SIZE (sequences per step)")
    parser.add_argument("--seq-length", type=report.positive_int, default=256, help="SEQ_LENGTH")
    parser.add_argument("--steps", type=report.positive_int, default=3, help="updates per timed repeat")
    parser.add_argument("--repeats", type=report.positive_int, default=4)
    parser.add_argument("--warmup", type=report.non_negative_int, default=2, help="untimed updates first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (as train.py chooses), float32, bfloat16, float16")
    parser.add_argument("--compile", default="auto", choices=["auto", "0", "1"])
    parser.add_argument("--baseline", type=int, default=1, choices=[0, 1], help="also time the build-nanogpt-style loop (1)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators instead of timing (eager)")
    parser.add_argument("--parity", action="store_true", help="fp32 against the default precision: tiny, batch 8x256, 100 updates (ignores the shape options)")
    args = parser.parse_args()
    args.configs = [name.strip() for name in args.configs.split(",")]
    unknown = [name for name in args.configs if name not in SHAPES]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}: choose from {', '.join(SHAPES)}")
    if args.parity:
        parity(args)
    elif args.profile:
        profile(args, device.setup(args.device, args.dtype))
    else:
        speed(args, device.setup(args.device, args.dtype))


if __name__ == "__main__":
    main()
