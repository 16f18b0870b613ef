"""New tokens/s of generation with and without the key/value cache, 124M configuration.

    uv run python -m bench.bench_generate [--repeats 2] [--repeats-batch-4 1] [--device auto] [--dtype auto] [--threads N]

A randomly initialised GPT-2 124M (vocabulary 50,304, block 1,024) answers generate.py's question
in the training format with prompt.py's default sampling (temperature 0.8, top-k 50, top-p 0.95),
200 new tokens a run, never stopping early, at batch 1 and 4. New tokens/s is every row's new tokens
over the whole call's time, the prompt's forward pass included. Cached and uncached runs alternate,
in the opposite order every other round, so that machine noise hits both alike; the ratio is taken
within each pair. Where the default precision is not float32 (bf16
autocast on CPUs with native bf16, CUDA), cached float32 joins the batch-1 rounds as a third side.
On a machine other processes keep busy, `--threads 1` avoids parallel kernels waiting for a thread
the OS has put aside.
"""

import dataclasses
import os
import statistics
import time

import torch

from bench import report
from device import setup
from documents import question_prompt
from env import ArgumentParser, cli
from generate import QUESTION
from model import GPT, GPTConfig
from sampling import make_generator, stream
from settings import SamplingConfig
from tokenizer import EOT, encode


def new_tokens_per_s(model, runtime, prompt, batch, new_tokens, use_cache, options=None):
    """Time one generation of `new_tokens` at `batch` rows (prompt.py's sampling, or `options`)."""
    generator = make_generator(runtime.device, 0)
    report.synchronize(runtime)
    start = time.perf_counter()
    with runtime.autocast():
        for _ in stream(model, prompt, new_tokens, num_samples=batch, generator=generator, use_cache=use_cache,
                        stop_at_eot=False, **(options or SamplingConfig().options())):
            pass
    report.synchronize(runtime)
    return batch * new_tokens / (time.perf_counter() - start)


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=report.positive_int, default=2, help="rounds at batch 1")
    parser.add_argument("--repeats-batch-4", type=report.non_negative_int, default=1, help="rounds at batch 4 (its uncached run is the longest; 0 skips it)")
    parser.add_argument("--new-tokens", type=report.positive_int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=report.non_negative_int, default=0, help="CPU threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]  # this machine is shared: say how busy
    runtime = setup(args.device, args.dtype)
    fp32 = dataclasses.replace(runtime, dtype=torch.float32)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(runtime.device).eval()
    prompt = [EOT] + encode(question_prompt(QUESTION))

    sides = {"cached": (runtime, True), "uncached": (runtime, False)}
    if runtime.dtype != torch.float32:
        sides["cached fp32"] = (fp32, True)
    repeats = {batch: count for batch, count in ((1, args.repeats), (4, args.repeats_batch_4)) if count > 0}
    runs = {(batch, side): [] for batch in repeats for side in sides if batch == 1 or side != "cached fp32"}
    for rt, use_cache in sides.values():  # warm-up: kernel choice, allocator
        new_tokens_per_s(model, rt, prompt, 4, 4, use_cache)
    print(f"124M, {runtime.device}, {runtime.dtype_name}, {torch.get_num_threads()} threads, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, repeats: {args.repeats} at batch 1, {args.repeats_batch_4} at batch 4")
    for repeat in range(max(repeats.values())):
        for (batch, side), values in runs.items() if repeat % 2 == 0 else reversed(runs.items()):
            if repeat >= repeats[batch]:
                continue
            rt, use_cache = sides[side]
            values.append(new_tokens_per_s(model, rt, prompt, batch, args.new_tokens, use_cache))
            print(f"  repeat {repeat + 1}: batch {batch} {side}: {values[-1]:.1f} new tokens/s", flush=True)

    figures, rows = {}, []
    for (batch, side), values in runs.items():
        ratios = [c / u for c, u in zip(values, runs[(batch, "uncached")])]
        figures.setdefault(f"batch_{batch}", {})[side] = {**report.spread(values), "ratio_to_uncached": report.spread(ratios)}
        rows.append([batch, side, min(values), statistics.median(values), max(values), f"{statistics.median(ratios):.2f}x"])
    print(f"new tokens/s ({runtime.dtype_name} unless marked); vs uncached ({runtime.dtype_name}): median over the pairs of a round")
    report.table(["batch", "side", "min", "median", "max", "vs uncached"], rows)
    config = {**vars(args), "model": GPTConfig().shape(), "prompt_tokens": len(prompt), "dtype": runtime.dtype_name,
              "sampling": SamplingConfig().options(), "load_average_before_after": [load_before, os.getloadavg()[0]],
              "seconds": round(time.perf_counter() - started, 1)}
    report.save("generate", figures, config, runtime.device)


if __name__ == "__main__":
    main()
