"""HellaSwag scoring speed: hellaswag.evaluate's packed batches vs one example per forward pass.

    uv run python -m bench.bench_hellaswag [--rows 96] [--repeats 3] [--configs small,124M]

The one-example side is build-nanogpt's way (hellaswag.reference_scores: four padded rows, logits
at every position). Both sides score the same real rows from ../shared/data/hellaswag (or
HELLASWAG_PATH) with a randomly initialised model in the same precision (DTYPE, default: what
device.setup picks, bf16 autocast on a CPU with native bf16), alternating sides every repeat. Also
reports how often the batched path's predictions in that precision agree with its fp32 ones.
"""

import argparse
import os
import time
from pathlib import Path

import torch

import device
import hellaswag
from bench import report
from model import GPT, GPTConfig

CONFIGS = {  # block 1024: HellaSwag contexts can be long
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384),
    "124M": GPTConfig(),
}
SHARED_ROWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"


def one_at_a_time(model, runtime, rows):
    for row in rows:
        hellaswag.reference_scores(model, row, runtime=runtime)


def examples_per_s(run, rows, runtime):
    start = time.perf_counter()
    run()
    runtime.synchronize()
    return len(rows) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=report.positive_int, default=96, help="real rows scored per repeat, spread over the file")
    parser.add_argument("--repeats", type=report.positive_int, default=3)
    parser.add_argument("--configs", default="small,124M")
    parser.add_argument("--batch-size", type=report.positive_int, default=None, help="examples per forward (default: hellaswag's)")
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"))
    parser.add_argument("--dtype", default=os.environ.get("DTYPE", "auto"))
    args = parser.parse_args()
    if not os.environ.get("HELLASWAG_PATH"):
        if not SHARED_ROWS.is_file():
            raise SystemExit(f"no HellaSwag rows at {SHARED_ROWS}: set HELLASWAG_PATH to a hellaswag_val.jsonl")
        os.environ["HELLASWAG_PATH"] = str(SHARED_ROWS)
    everything = hellaswag.load_examples()
    rows = everything[::max(1, len(everything) // args.rows)][:args.rows]
    runtime = device.setup(args.device, args.dtype)
    fp32 = device.Runtime(runtime.device, torch.float32)
    batch_size = args.batch_size or hellaswag.default_batch_size(runtime.device_type)
    print(f"HellaSwag scoring, {len(rows)} real rows, {runtime.device} {runtime.dtype_name}, "
          f"{torch.get_num_threads()} threads, batch {batch_size}, examples/s over {args.repeats} repeats")

    figures, table = {}, []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        model = GPT(CONFIGS[name]).to(runtime.device).eval()
        sides = {
            "one example per forward": lambda subset=rows: one_at_a_time(model, runtime, subset),
            "batched": lambda subset=rows: hellaswag.evaluate(model, runtime, subset, batch_size),
        }
        for run in sides.values():  # warm-up: allocator, kernel selection
            run(rows[:batch_size // 4])
        speeds = {side: [] for side in sides}
        for repeat in range(args.repeats):  # alternate the order: machine noise hits both alike
            for side in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
                speeds[side].append(examples_per_s(sides[side], rows, runtime))
        ratios = [b / o for b, o in zip(speeds["batched"], speeds["one example per forward"])]
        low = hellaswag.evaluate(model, runtime, rows, batch_size)
        exact = hellaswag.evaluate(model, fp32, rows, batch_size)
        agreement = {"acc": (low.pred == exact.pred).float().mean().item(),
                     "acc_norm": (low.pred_norm == exact.pred_norm).float().mean().item()}
        figures[name] = {side: report.spread(v) for side, v in speeds.items()}
        figures[name]["ratio"] = report.spread(ratios)
        figures[name][f"{runtime.dtype_name}_agreement_with_fp32"] = agreement
        for side in sides:
            f = figures[name][side]
            table.append([name, side, f["min"], f["median"], f["max"], ""])
        r = figures[name]["ratio"]
        table.append([name, "ratio batched / one", r["min"], r["median"], r["max"],
                      f"acc {agreement['acc']:.3f} acc_norm {agreement['acc_norm']:.3f}"])
    report.table(["config", "side", "min", "median", "max", f"{runtime.dtype_name} agrees with fp32"], table)
    config = {**vars(args), "rows": len(rows), "batch_size": batch_size, "dtype": runtime.dtype_name,
              "models": {name: CONFIGS[name].shape() for name in args.configs.split(",")}}
    report.save("hellaswag", figures, config, runtime.device)


if __name__ == "__main__":
    main()
