"""Memory per rank on CPU ranks: what FSDP saves over DDP, what activation checkpointing saves, and
which GPT-2 shape fits a given memory.

    uv run python -m bench.bench_memory                                # 124M on 2 CPU ranks, about 3 minutes
    uv run python -m bench.bench_memory --memory-gib 80 --ranks 8      # the same, then what fits 8 x 80 GiB
    uv run python -m bench.bench_memory --large                        # gpt2-large under FSDP (about 13 minutes)

1. Ranks: train.py itself under torchrun on 2 CPU ranks (gloo), GPT-2 124M, float32, BATCH_SIZE=1
   SEQ_LENGTH=64 TOTAL_BATCH_SIZE=256 (2 micro-batches an update), 3 updates, validation before the
   first and after the last, and its checkpoint: DDP, FSDP, and FSDP with ACTIVATION_CHECKPOINTING=1,
   taking turns; and once a 1-layer, 64-wide model under FSDP, for what PyTorch and gloo cost alone.
   Each worker's peak RSS (its VmHWM, read every 50 ms) and the median time of the updates after
   the first. The persistent state is computed: 4 bytes a parameter each for the weights, the
   gradients and AdamW's two moments (under FSDP over the ranks), and DDP's gradient buckets.
2. Activations: a forward and backward pass of 124M at BATCH_SIZE=8 SEQ_LENGTH=1024 in one process
   (DTYPE auto), with and without activation checkpointing, taking turns. From glibc's own count of
   what it has handed out (mallinfo2; RSS keeps freed memory and would overstate it), above its
   level before the pass, with the gradients already there: what the forward pass holds for the
   backward one (the activations), and the most held at any moment of both (read every
   millisecond: the activations, the recomputed block and the loss's chunk buffers); and the time.
3. What fits under FSDP on CPU ranks in float32, per rank: PyTorch's own (the 1-layer run), 16
   bytes a parameter over the ranks, a block gathered whole (its weights, twice over: 8 bytes a
   block parameter), and the tied embedding with its gradients, gathered whole on every rank, at
   the bytes per embedding parameter the 124M run leaves. From those, each GPT-2 shape's peak at
   --ranks ranks, and the largest that fits --memory-gib, with micro-batches of 1 x 64 (part 2 says
   what larger ones add; GPUs add their own: bf16 weights, the loss's 8,192-token chunks, NCCL).
--large trains gpt2-large's shape (774M) as part 1 does, under FSDP with HELLASWAG_LIMIT=-1: 3
updates and a checkpoint, then RESUME=1 for 2 more; the two workers' peaks must sum to at most
16 GiB in each run (exit status 1 otherwise). It needs 18 GiB of available memory and 20 GB of free
disk, and stops a run that takes more than 15 minutes.
"""

import ctypes
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench import report
from bench.processes import descendants, error_line, kill_tree, status_bytes
from env import ArgumentParser, UserError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB, MiB = 2**30, 2**20
SHAPES = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280), "1558M": (48, 25, 1600)}
# the set-up: 2 micro-batches of 1 x 64 tokens an update on each of 2 ranks
RUN = dict(DEVICE="cpu", DTYPE="float32", COMPILE="0", BATCH_SIZE="1", SEQ_LENGTH="64", TOTAL_BATCH_SIZE="256",
           MAX_STEPS="3", WARMUP_STEPS="10", VAL_STEPS="2", EVAL_INTERVAL="1000", SAMPLE_INTERVAL="1000",
           CHECKPOINT_INTERVAL="1000", HELLASWAG_LIMIT="-1", OMP_NUM_THREADS="1")
SIDES = {"DDP": dict(PARALLEL="ddp"), "FSDP": dict(PARALLEL="fsdp"),
         "FSDP + AC": dict(PARALLEL="fsdp", ACTIVATION_CHECKPOINTING="1")}
TORCH_ALONE = dict(PARALLEL="fsdp", N_LAYER="1", N_HEAD="1", N_EMBD="64", BLOCK_SIZE="64", MAX_STEPS="1")
LARGE = dict(PARALLEL="fsdp", N_LAYER="36", N_HEAD="20", N_EMBD="1280")


def parameters(n_layer, n_head, n_embd):
    """Count a GPT-2 shape's parameters (built on the meta device: no memory, no time)."""
    from model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    return sum(p.numel() for p in model.parameters()), model.transformer.wte.weight.numel()


# ----------------------------------------------------------------------------------------------
# 1. train.py under torchrun, watched from outside

def train(settings, dataset, log_dir, ranks=2, seconds=None):
    """Run train.py under torchrun with `settings` (stopped after `seconds`, if given); return each
    worker's peak RSS (bytes) and the median seconds of the updates after the first."""
    from settings import cleared_environment

    env = cleared_environment(**{**RUN, "DATASET_PATH": dataset, "LOG_DIR": log_dir, **settings})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "train.py"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    peaks = {}
    errors = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr))
    reader.start()
    deadline = time.perf_counter() + (seconds or float("inf"))
    while process.poll() is None:  # VmHWM only grows: the last reading is the worker's peak
        workers = descendants(process.pid)
        for pid in workers:
            peaks[pid] = max(peaks.get(pid, 0), status_bytes(pid, "VmHWM") or 0)
        if time.perf_counter() > deadline:
            kill_tree(process)
            raise UserError(f"train.py took more than {seconds} s ({' '.join(f'{k}={v}' for k, v in settings.items())})")
        time.sleep(0.05)
    reader.join()
    if process.returncode != 0:
        why = error_line(errors, process.returncode)
        raise UserError(f"train.py failed ({' '.join(f'{k}={v}' for k, v in settings.items())}): {why}")
    import metrics

    times = metrics.read(os.path.join(log_dir, "metrics.csv"))["dt_ms"].tolist()[1:]
    return sorted(peaks.values(), reverse=True)[:ranks], statistics.median(times) / 1000 if times else None


def ranks_part(args, dataset, folder):
    """Part 1: every side `args.repeats` times, taking turns; returns {side: {"peaks": [...], "step_s": [...]}}."""
    runs = {side: {"peaks": [], "step_s": []} for side in SIDES}
    order = list(SIDES)
    for repeat in range(args.repeats):
        for side in order if repeat % 2 == 0 else order[::-1]:
            log_dir = os.path.join(folder, f"{side}_{repeat}".replace(" ", "").replace("+", "_"))
            peaks, step_s = train(SIDES[side], dataset, log_dir)
            runs[side]["peaks"] += peaks
            runs[side]["step_s"].append(step_s)
            print(f"  repeat {repeat + 1}: {side} done", flush=True)
    alone, _ = train(TORCH_ALONE, dataset, os.path.join(folder, "alone"))
    runs["alone"] = {"peaks": alone}
    return runs


# ----------------------------------------------------------------------------------------------
# 2. activation memory, from glibc's own count of what it has handed out

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def mallinfo2():
    function = ctypes.CDLL("libc.so.6").mallinfo2
    function.restype = MallInfo2
    return function


def heap_in_use():
    """Return the bytes glibc's allocator has handed out and not had back: in its heaps and in
    mappings of their own."""
    info = mallinfo2()()
    return info.uordblks + info.hblkhd


def forward_backward(model, runtime, x, y):
    """Run one forward and backward pass into gradients that already exist (zeroed, so that their
    memory is counted before the start). Return (what the allocator holds for the backward pass
    once the loss is computed, the most it held at any moment of both passes, seconds), in bytes
    above its level before; the peak is read every millisecond."""
    for p in model.parameters():
        p.grad.zero_()
    before, peak, done = heap_in_use(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], heap_in_use())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    with runtime.autocast():
        _, loss = model(x, y, return_logits=False)
    held = heap_in_use() - before
    loss.backward()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return held, max(peak[0], heap_in_use()) - before, seconds


def activations_part(args, dataset):
    """Part 2: {"without": [(held, peak, s), ...], "with": [...]}, the two taking turns after one
    pass that warms the allocator up."""
    import device
    import shards
    from model import GPT, GPTConfig

    runtime = device.setup("cpu", "auto")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x, y = shards.TokenLoader(dataset, "train", args.batch_size, args.seq_length, verbose=False).next_batch()
    forward_backward(model, runtime, x, y)
    results = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for side in ("without", "with") if repeat % 2 == 0 else ("with", "without"):
            model.checkpoint_activations(side == "with")
            results[side].append(forward_backward(model, runtime, x, y))
    return results, runtime.dtype_name


# ----------------------------------------------------------------------------------------------
# 3. what fits

def fits_part(runs, memory_gib, ranks):
    """Part 3: per shape, the predicted FSDP peak per rank at `ranks` ranks; and the constants."""
    def block(shape):  # the parameters of one transformer block: four matrices (12 C^2), biases, LayerNorms
        return 12 * shape[2] ** 2 + 13 * shape[2]

    params_124m, embedding_124m = parameters(*SHAPES["124M"])
    alone = statistics.median(runs["alone"]["peaks"])
    fsdp = statistics.median(runs["FSDP"]["peaks"])
    # the 124M run had 2 ranks
    per_embedding = (fsdp - alone - 16 * params_124m / 2 - 8 * block(SHAPES["124M"])) / embedding_124m
    rows, predicted = [], {}
    for name, shape in SHAPES.items():
        count, embedding = parameters(*shape)
        peak = alone + 16 * count / ranks + 8 * block(shape) + per_embedding * embedding
        predicted[name] = peak
        rows.append([name, f"{count / 1e6:,.0f}M", f"{peak / GiB:,.2f}", "yes" if peak <= memory_gib * GiB else "no"])
    largest = next((name for name in reversed(SHAPES) if predicted[name] <= memory_gib * GiB), None)
    return rows, {"torch_alone": alone, "bytes_per_embedding_parameter": per_embedding, "predicted": predicted,
                  "largest": largest}


def large_part(dataset, folder):
    """--large: gpt2-large's shape, 3 updates and a checkpoint, then 2 more resumed."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    if available < 18 * GiB:
        raise UserError(f"--large needs 18 GiB of available memory, this machine has {available / GiB:.1f} GiB")
    free = shutil.disk_usage(folder).free
    if free < 20e9:
        raise UserError(f"--large needs 20 GB of free disk in {folder} for its checkpoint, it has {free / 1e9:.1f} GB")
    log_dir = os.path.join(folder, "large")
    runs = {}
    for name, settings in (("3 updates, checkpoint", dict(LARGE, MAX_STEPS="3")),
                           ("RESUME=1, 2 more", dict(LARGE, MAX_STEPS="5", RESUME="1"))):
        start = time.perf_counter()
        peaks, step_s = train(settings, dataset, log_dir, seconds=15 * 60)
        runs[name] = {"peaks": peaks, "sum": sum(peaks), "step_s": step_s, "seconds": time.perf_counter() - start}
        print(f"  {name} done", flush=True)
    import checkpoint

    first = Path(checkpoint.checkpoint_path(log_dir, 2, sharded=True))  # the first run's, kept by the second
    on_disk = sum(f.stat().st_size for f in first.iterdir() if f.is_file())
    runs["3 updates, checkpoint"]["checkpoint_bytes"] = on_disk
    return runs


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=report.positive_int, default=1, help="runs of each side (2 ranks each)")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="memory per rank, for what fits")
    parser.add_argument("--ranks", type=report.positive_int, default=2, help="ranks, for what fits")
    parser.add_argument("--batch-size", type=report.positive_int, default=8, help="activations: sequences")
    parser.add_argument("--seq-length", type=report.positive_int, default=1024, help="activations: tokens each")
    parser.add_argument("--large", action="store_true", help="gpt2-large's shape under FSDP instead (about 13 min)")
    args = parser.parse_args()
    from bench.bench_train import random_token_dataset

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as dataset, tempfile.TemporaryDirectory() as folder:
        random_token_dataset(dataset)
        if args.large:
            runs = large_part(dataset, folder)
            print("gpt2-large's shape (774M), PARALLEL=fsdp on 2 CPU ranks, float32, batch 1 x 64, 2 micro-batches:")
            report.table(["run", "rank peaks (GiB)", "sum (GiB)", "within 16 GiB", "update (s)", "run (s)"],
                         [[name, " + ".join(f"{p / GiB:.2f}" for p in run["peaks"]), f"{run['sum'] / GiB:.2f}",
                           "yes" if run["sum"] <= 16 * GiB else "NO", f"{run['step_s']:.1f}", f"{run['seconds']:.0f}"]
                          for name, run in runs.items()])
            print(f"the sharded checkpoint: {runs['3 updates, checkpoint']['checkpoint_bytes'] / 1e9:.1f} GB on disk; "
                  f"both runs: {sum(run['seconds'] for run in runs.values()) / 60:.1f} minutes")
            report.save("memory_large", runs, {**vars(args), "settings": {**RUN, **LARGE},
                                               "seconds": round(time.perf_counter() - started, 1)}, "cpu")
            if any(run["sum"] > 16 * GiB for run in runs.values()):
                raise UserError("the two workers' peaks summed to more than 16 GiB")
            return
        runs = ranks_part(args, dataset, folder)
        activations, dtype = activations_part(args, dataset)
    params, _ = parameters(*SHAPES["124M"])
    persistent = {"DDP": 20 * params, "FSDP": 16 * params / 2, "FSDP + AC": 16 * params / 2}
    ddp_peak = statistics.median(runs["DDP"]["peaks"])
    rows = []
    for side in SIDES:
        peaks, steps = report.spread(runs[side]["peaks"]), report.spread(runs[side]["step_s"])
        rows.append([side, f"{persistent[side] / MiB:,.0f}", f"{peaks['min'] / MiB:,.0f} / {peaks['median'] / MiB:,.0f} / "
                     f"{peaks['max'] / MiB:,.0f}", f"{peaks['median'] / ddp_peak:.2f}x", f"{steps['median']:.2f}"])
    print(f"\n1. GPT-2 124M, 2 CPU ranks (gloo), float32, train.py with batch 1 x 64 and 2 micro-batches an update, "
          f"per rank ({args.repeats} repeat(s) x 2 ranks); PyTorch and gloo alone: "
          f"{statistics.median(runs['alone']['peaks']) / MiB:,.0f} MiB")
    report.table(["side", "persistent state (MiB)", "peak RSS min / median / max (MiB)", "peak / DDP's",
                  "update (s, median)"], rows)

    def median(side, index):
        return statistics.median(measured[index] for measured in activations[side])

    print(f"\n2. Activations: one forward and backward pass of 124M, batch {args.batch_size} x {args.seq_length}, "
          f"{dtype}, one process, median of {args.repeats}: what the allocator holds above the step's start")
    rows = [[name, f"{median(side, 0) / MiB:,.0f}", f"{median(side, 1) / MiB:,.0f}", f"{median(side, 2):.1f}"]
            for name, side in (("off", "without"), ("on", "with"))]
    rows.append(["on / off", *(f"{median('with', i) / median('without', i):.2f}x" for i in range(3))])
    report.table(["activation checkpointing", "held for backward (MiB)", "peak of both passes (MiB)", "time (s)"], rows)

    fit_rows, fits = fits_part(runs, args.memory_gib, args.ranks)
    print(f"\n3. Under FSDP on {args.ranks} ranks of {args.memory_gib:g} GiB each (batch 1 x 64; "
          f"{fits['bytes_per_embedding_parameter']:.1f} bytes per embedding parameter gathered): largest that fits: "
          f"{fits['largest'] or 'none'}")
    report.table(["GPT-2", "parameters", "predicted peak per rank (GiB)", "fits"], fit_rows)
    config = {**vars(args), "settings": RUN, "seconds": round(time.perf_counter() - started, 1)}
    report.save("memory", {"ranks": runs, "activations": activations, "fits": fits},
                config, "cpu")


if __name__ == "__main__":
    main()
