"""Time to a target loss: AdamW against Muon (OPTIMIZER=muon), on tiny shakespeare.

    uv run python -m bench.bench_time_to_loss                 # the full comparison (see below)
    uv run python -m bench.bench_time_to_loss --quick         # one learning rate each, 12 updates (< 3 min)
    uv run python -m bench.bench_time_to_loss path/to/input.txt

The small configuration (N_LAYER=6 N_HEAD=6 N_EMBD=384), batch 8 x 256, in the precision train.py
chooses, trains `--updates` updates (150) with train.py's own update step, from the same initial
weights on the same batches, with each optimizer at each of two learning rates of the same shape:
a base MAX_LR and twice it (AdamW 5e-4 and 1e-3, Muon 1e-3 and 2e-3). The schedule is train.py's:
10 warm-up updates, then cosine to MAX_LR / 10. The validation loss is measured before the first
update and after every 10th, on the same 8 validation batches.

The runs advance together, one update each in turn, the order reversed every other update, so
the machine's noise hits them alike. Each optimizer's better learning rate is the one with the lower
final validation loss. The target is AdamW's final loss: the first evaluation at which Muon's is at or
below it (no interpolation) gives the ratio of updates, and of training time, the sum of the steps'
dt as train.py times them (evaluations excluded). The curves are drawn beside the JSON.
"""

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

import dataset
import device
import shards
import train
from bench import report
from bench.bench_train import make_model
from env import ArgumentParser, UserError, cli
from settings import TrainConfig

TINY_SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                "tinyshakespeare", "input.txt")
BASE_LR = {"adamw": 5e-4, "muon": 1e-3}  # the sweep: each base and twice it
WARMUP = 10
BATCH_SIZE, SEQ_LENGTH = 8, 256
GOALS = {"updates": 0.35, "time": 0.45, "nats": 0.5}  # the targets Muon was set on this kit's CPU hosts


@dataclass
class Run:
    """One optimizer at one learning rate, with its own model and position in the data."""

    optimizer: str
    max_lr: float
    raw: torch.nn.Module
    model: torch.nn.Module
    optimizers: list
    scaler: torch.amp.GradScaler  # its own: under fp16 one run's overflow must not shrink the others' scale
    loader: shards.TokenLoader
    schedule: TrainConfig
    step_seconds: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # (updates made, validation loss)

    @property
    def name(self):
        return f"{self.optimizer} {self.max_lr:g}"


def start(optimizer, max_lr, updates, runtime, dataset_path, use_compile):
    raw, model = make_model("small", runtime, use_compile, SEQ_LENGTH, seed=1337)
    optimizers = raw.configure_optimizers(0.1, max_lr, runtime.device_type, verbose=False, optimizer=optimizer)
    loader = shards.TokenLoader(dataset_path, "train", BATCH_SIZE, SEQ_LENGTH, verbose=False)
    schedule = TrainConfig(max_lr=max_lr, min_lr=max_lr / 10, warmup_steps=WARMUP, max_steps=updates)
    return Run(optimizer, max_lr, raw, model, optimizers, train.grad_scaler(runtime), loader, schedule)


def step(run, update, runtime):
    """One update, timed as train.py times it: until the loss is back on the CPU."""
    t0 = time.perf_counter()
    loss, _ = train.train_step(run.model, run.optimizers, run.scaler, run.loader, runtime, 1,
                               train.get_lr(update, run.schedule))
    loss.item()
    run.step_seconds.append(time.perf_counter() - t0)


def evaluate(run, updates_made, val_loader, runtime, batches):
    run.curve.append((updates_made, train.validation_loss(run.raw, val_loader, runtime, batches)))


def reached(run, target):
    """Return the updates after which `run` first evaluated at or below `target`, or None."""
    return next((updates for updates, loss in run.curve if loss <= target), None)


def compare(runs, updates, compiled):
    """Each optimizer's better run, and the ratios of the Muon one reaching AdamW's final loss. Under
    torch.compile update 0 also compiles: its dt is then left out of every sum."""
    first = 1 if compiled and updates > 1 else 0
    final = lambda run: math.inf if math.isnan(run.curve[-1][1]) else run.curve[-1][1]  # a diverged run loses
    best = {name: min((r for r in runs if r.optimizer == name), key=final) for name in BASE_LR}
    adamw, muon = best["adamw"], best["muon"]
    target = adamw.curve[-1][1]
    figures = {"target": target, "adamw_best_lr": adamw.max_lr, "muon_best_lr": muon.max_lr,
               "adamw_final": target, "muon_final": muon.curve[-1][1], "nats_below": target - muon.curve[-1][1],
               "adamw_train_s": sum(adamw.step_seconds[first:]), "muon_updates_to_target": reached(muon, target),
               "step_time_ratio": statistics.median(m / a for m, a in zip(muon.step_seconds, adamw.step_seconds))}
    if figures["muon_updates_to_target"] is not None:
        n = figures["muon_updates_to_target"]
        figures["update_ratio"] = n / updates
        figures["muon_train_s_to_target"] = sum(muon.step_seconds[first:n])
        figures["time_ratio"] = figures["muon_train_s_to_target"] / figures["adamw_train_s"]
    return best, figures


def plot(runs, best, eval_batches, path):
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"adamw": "tab:blue", "muon": "tab:orange"}
    swept = len(runs) > len(best)
    for run in runs:
        chosen = run is best[run.optimizer]
        ax.plot(*zip(*run.curve), color=colours[run.optimizer], linewidth=2.2 if chosen else 1, marker="o",
                markersize=3, alpha=1 if chosen else 0.45, label=run.name + (" (better)" if chosen and swept else ""))
    ax.axhline(best["adamw"].curve[-1][1], color="grey", linestyle=":", linewidth=1, label="AdamW's final loss")
    ax.set_xlabel("updates (8 x 256 tokens)")
    ax.set_ylabel(f"validation loss ({eval_batches} fixed batches)")
    ax.set_title("small GPT-2 on tiny shakespeare: AdamW vs Muon")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(runs, best, figures, updates, runtime, goals):
    print(f"\nsmall (6/6/384), batch {BATCH_SIZE}x{SEQ_LENGTH}, {runtime.device} {runtime.dtype_name}, "
          f"{torch.get_num_threads()} threads, {updates} updates, warm-up {WARMUP}, cosine to MAX_LR/10")
    evals = [u for u, _ in runs[0].curve]
    shown = sorted({evals[min(i, len(evals) - 1)] for i in (1, 3, len(evals) - 1)})
    swept = len(runs) > len(best)
    rows = []
    for run in runs:
        losses = dict(run.curve)
        ms = [1000 * s for s in run.step_seconds]
        rows.append([run.name + (" *" if swept and run is best[run.optimizer] else ""),
                     *(f"{losses[u]:.3f}" for u in shown),
                     f"{min(ms):,.0f} / {statistics.median(ms):,.0f} / {max(ms):,.0f}",
                     f"{sum(run.step_seconds):,.1f}"])
    report.table(["optimizer MAX_LR", *(f"val @{u}" for u in shown), "step ms min / median / max", "train s"], rows)
    if swept:
        print("* the better learning rate of the two")
    a, m = figures["adamw_best_lr"], figures["muon_best_lr"]
    goal = lambda name, relation, unit: f" (goal {relation} {GOALS[name]}{unit})" if goals else ""
    print(f"target: AdamW's final validation loss {figures['target']:.3f} (MAX_LR {a:g}, {updates} updates, "
          f"{figures['adamw_train_s']:,.1f} s of steps)")
    if figures["muon_updates_to_target"] is None:
        print(f"Muon (MAX_LR {m:g}) did not reach it within {updates} updates")
    else:
        print(f"Muon (MAX_LR {m:g}) reached it after {figures['muon_updates_to_target']} updates: "
              f"{figures['update_ratio']:.2f}x the updates{goal('updates', '<=', 'x')}, "
              f"{figures['time_ratio']:.2f}x the training time{goal('time', '<=', 'x')}")
    print(f"Muon's final validation loss {figures['muon_final']:.3f}: {figures['nats_below']:.2f} nats below "
          f"AdamW's{goal('nats', '>=', '')}")
    print(f"time per update, Muon / AdamW (median of the pairs): {figures['step_time_ratio']:.2f}x")


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=TINY_SHAKESPEARE, help="a text file (default: tiny shakespeare "
                        "in ../shared/data)")
    parser.add_argument("--quick", action="store_true", help="no sweep (AdamW 1e-3, Muon 2e-3), 12 updates, "
                        "evaluations on 2 batches every 4 (a smoke test: the goals are the full run's)")
    parser.add_argument("--updates", type=report.positive_int, help="updates per run (150; --quick 12)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (as train.py chooses), float32, bfloat16, float16")
    args = parser.parse_args()
    if not os.path.isfile(args.text):
        raise UserError(f"no text file at {os.path.normpath(args.text)}: pass tiny shakespeare's input.txt (from "
                        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt) "
                        "as the argument")
    updates = args.updates or (12 if args.quick else 150)
    eval_every, eval_batches = (4, 2) if args.quick else (10, 8)
    sweep = [(name, 2 * lr) for name, lr in BASE_LR.items()] if args.quick else \
        [(name, factor * lr) for factor in (1, 2) for name, lr in BASE_LR.items()]
    runtime = device.setup(args.device, args.dtype)
    use_compile = runtime.compiles  # as train.py's COMPILE=auto
    with tempfile.TemporaryDirectory() as dataset_path:
        dataset.build(args.text, dataset_path, 10**8)  # tokenized as train.py's data is
        val_loader = shards.TokenLoader(dataset_path, "val", BATCH_SIZE, SEQ_LENGTH, verbose=False)
        runs = [start(name, lr, updates, runtime, dataset_path, use_compile) for name, lr in sweep]
        for run in runs:
            evaluate(run, 0, val_loader, runtime, eval_batches)
        for update in range(updates):
            for run in runs if update % 2 == 0 else runs[::-1]:
                step(run, update, runtime)
            if (update + 1) % eval_every == 0 or update + 1 == updates:
                for run in runs:
                    evaluate(run, update + 1, val_loader, runtime, eval_batches)
                print(f"after {update + 1:3d} updates: " + ", ".join(f"{r.name} {r.curve[-1][1]:.3f}" for r in runs),
                      flush=True)
    best, figures = compare(runs, updates, use_compile)
    print_results(runs, best, figures, updates, runtime, goals=not args.quick)
    figures["runs"] = {run.name: {"curve": run.curve, "step_s": report.spread(run.step_seconds),
                                  "step_seconds": run.step_seconds} for run in runs}
    config = {**vars(args), "updates": updates, "sweep": sweep, "warmup": WARMUP, "eval_every": eval_every,
              "eval_batches": eval_batches, "batch": [BATCH_SIZE, SEQ_LENGTH], "dtype": runtime.dtype_name,
              "compile": use_compile, "goals": GOALS}
    path = report.save("time_to_loss_quick" if args.quick else "time_to_loss", figures, config, runtime.device)
    plot(runs, best, eval_batches, path[:-len(".json")] + ".png")
    print(f"curves drawn in {os.path.relpath(path[:-len('.json')] + '.png')}")


if __name__ == "__main__":
    main()
