"""Muon's orthogonalisation on the CPU: torch's bfloat16 Newton-Schulz against model.py's float32.

    uv run python -m bench.bench_newton_schulz                 # the small model's 24 matrices (< 3 min)
    uv run python -m bench.bench_newton_schulz --config tiny --repeats 5

Each repeat orthogonalises one random gradient of every matrix Muon updates (GPT.muon_matrices)
with torch's own function and with `model.newton_schulz_float32`, the two sides taking turns in
alternating order; "bf16 / float32" is the ratio of each repeat's pair. This is the choice
`GPT.configure_optimizers` makes for CPUs without bf16 hardware (`device.cpu_has_native_bf16`).
"""

import time

import torch

from bench import report
from bench.bench_train import SHAPES
from device import cpu_has_native_bf16
from env import ArgumentParser, UserError, cli
from model import GPT, GPTConfig, newton_schulz_float32

NS = dict(ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5, eps=1e-7)  # torch.optim.Muon's defaults


def flops(shape, steps):
    """Newton-Schulz on the wide orientation (m <= n): per step X X^T, then a (m x m) square and a (m x m) @ X."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def seconds(orthogonalise, grads):
    start = time.perf_counter()
    for grad in grads:
        orthogonalise(grad, **NS)
    return time.perf_counter() - start


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=SHAPES, default="small")
    parser.add_argument("--repeats", type=report.positive_int, default=3)
    args = parser.parse_args()
    torch_newton_schulz = getattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz", None)
    if torch_newton_schulz is None:
        raise UserError(f"torch {torch.__version__} has no torch.optim._muon._zeropower_via_newtonschulz to compare")
    torch.manual_seed(0)
    shapes = [p.shape for p in GPT(GPTConfig(block_size=256, **SHAPES[args.config])).muon_matrices()]
    grads = [torch.randn(shape) for shape in shapes]
    sides = {"bf16 (torch)": torch_newton_schulz, "float32 (model.py)": newton_schulz_float32}
    runs = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name in list(sides) if repeat % 2 == 0 else list(sides)[::-1]:
            runs[name].append(seconds(sides[name], grads))
    total = sum(flops(shape, NS["ns_steps"]) for shape in shapes)
    figures = {name: report.spread(values) for name, values in runs.items()}
    figures["ratio"] = report.spread([b / f for b, f in zip(*runs.values())])
    print(f"{args.config}: {len(shapes)} matrices, {total / 1e9:.1f} GFLOP per update, {torch.get_num_threads()} "
          f"threads, native bf16: {cpu_has_native_bf16()}, {args.repeats} repeats")
    report.table(["Newton-Schulz", "s min", "median", "max", "GFLOP/s (median)"],
                 [[name, f"{f['min']:.2f}", f"{f['median']:.2f}", f"{f['max']:.2f}", total / f["median"] / 1e9]
                  for name, f in figures.items() if name != "ratio"])
    ratio = figures["ratio"]
    print(f"bf16 / float32: {ratio['min']:.1f}x / {ratio['median']:.1f}x / {ratio['max']:.1f}x (min / median / max)")
    report.save(f"newton_schulz_{args.config}", {**figures, "gflop_per_update": total / 1e9},
                {**vars(args), "native_bf16": cpu_has_native_bf16()})


if __name__ == "__main__":
    main()
