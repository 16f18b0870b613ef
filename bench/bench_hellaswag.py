"""HellaSwag scoring speed: hellaswag.evaluate's packed batches vs one example per forward pass.

    uv run python -m bench.bench_hellaswag [--rows 96] [--repeats 3] [--configs small,124M]

The one-example side is build-nanogpt's way (bench/build_nanogpt.py's reference_scores: four
padded rows, logits at every position). Both sides score the same real rows from
../shared/data/hellaswag (or HELLASWAG_PATH) with a randomly initialised model in the same
precision (--dtype, default: what device.setup picks, bf16 autocast on a CPU with native bf16),
alternating sides every repeat. Also reports how often the batched path's predictions in that
precision agree with its fp32 ones.
"""

import dataclasses
import os
import time
from pathlib import Path

import torch

import device
import hellaswag
from bench import report
from bench.build_nanogpt import reference_scores
from env import ArgumentParser, UserError, cli
from settings import HellaSwagFiles
from model import GPT, GPTConfig

CONFIGS = {  # block 1024: HellaSwag contexts can be long
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384),
    "124M": GPTConfig(),
}
SHARED_ROWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"


def one_at_a_time(model, runtime, rows):
    for row in rows:
        reference_scores(model, row, runtime=runtime)


def matmul_gflop_per_example(rows, config):
    """The work each way does per example, in matmul GFLOP (attention aside). One example per
    forward runs four rows of context + longest ending through every layer and the vocabulary
    projection; the packed rows run each context once and project only the positions that predict
    an ending token (the context's last, and each ending's own but its last). The count pads each
    packed row to ROW_WIDTH and projects onto the whole 50,304 vocabulary: on HellaSwag's rows,
    within a fraction of a percent of what hellaswag.evaluate does."""
    layer = 2 * 12 * config.n_layer * config.n_embd**2  # per token: attention and MLP weights
    head = 2 * config.n_embd * config.vocab_size
    encoded = {i: hellaswag.encode_example(row, block_size=config.block_size) for i, row in enumerate(rows)}
    one = sum(4 * max(len(e.context) + len(x) for x in e.endings) * (layer + head) for e in encoded.values())
    packed_tokens = sum(max(hellaswag.ROW_WIDTH, sum(hellaswag._length(encoded[i]) for i in row))
                        for row in hellaswag._fill_rows(encoded, hellaswag.ROW_WIDTH))
    scored = sum(1 + sum(len(x) - 1 for x in e.endings) for e in encoded.values())
    return {"one example per forward": one / len(rows) / 1e9,
            "batched": (packed_tokens * layer + scored * head) / len(rows) / 1e9}


def examples_per_s(run, rows, runtime):
    start = time.perf_counter()
    run()
    report.synchronize(runtime)
    return len(rows) / (time.perf_counter() - start)


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=report.positive_int, default=96, help="real rows scored per repeat, spread over the file")
    parser.add_argument("--repeats", type=report.positive_int, default=3)
    parser.add_argument("--configs", default="small,124M")
    parser.add_argument("--batch-size", type=report.positive_int, default=None, help="examples per forward (default: hellaswag's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (as evaluate.py chooses), float32, bfloat16, float16")
    args = parser.parse_args()
    configs = [name.strip() for name in args.configs.split(",")]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}: choose from {', '.join(CONFIGS)}")
    if not HellaSwagFiles.from_env().hellaswag_path:
        if not SHARED_ROWS.is_file():
            raise UserError(f"no HellaSwag rows at {SHARED_ROWS}: set HELLASWAG_PATH to a hellaswag_val.jsonl")
        os.environ["HELLASWAG_PATH"] = str(SHARED_ROWS)
    everything = hellaswag.load_examples()
    rows = everything[::max(1, len(everything) // args.rows)][:args.rows]
    runtime = device.setup(args.device, args.dtype)
    fp32 = dataclasses.replace(runtime, dtype=torch.float32)
    batch_size = args.batch_size or hellaswag.default_batch_size(runtime.device_type)
    print(f"HellaSwag scoring, {len(rows)} real rows, {runtime.device} {runtime.dtype_name}, "
          f"{torch.get_num_threads()} threads, batch {batch_size}, examples/s over {args.repeats} repeats")

    figures, table = {}, []
    for name in configs:
        torch.manual_seed(0)
        model = GPT(CONFIGS[name]).to(runtime.device).eval()
        sides = {
            "one example per forward": lambda subset=rows: one_at_a_time(model, runtime, subset),
            "batched": lambda subset=rows: hellaswag.evaluate(model, runtime, subset, batch_size),
        }
        for run in sides.values():  # warm-up on a quarter batch of rows: allocator, kernel selection
            run(rows[:max(1, batch_size // 4)])
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
        work = matmul_gflop_per_example(rows, CONFIGS[name])
        figures[name]["matmul_gflop_per_example"] = work
        for side in sides:
            f = figures[name][side]
            table.append([name, side, f["min"], f["median"], f["max"], work[side], ""])
        r = figures[name]["ratio"]
        table.append([name, "ratio batched / one", r["min"], r["median"], r["max"],
                      f"{work['one example per forward'] / work['batched']:.2f}x less",
                      f"acc {agreement['acc']:.3f} acc_norm {agreement['acc_norm']:.3f}"])
    report.table(["config", "side", "min", "median", "max", "GFLOP/example", f"{runtime.dtype_name} agrees with fp32"], table)
    config = {**vars(args), "rows": len(rows), "batch_size": batch_size, "dtype": runtime.dtype_name,
              "models": {name: CONFIGS[name].shape() for name in configs}}
    report.save("hellaswag", figures, config, runtime.device)


if __name__ == "__main__":
    main()
