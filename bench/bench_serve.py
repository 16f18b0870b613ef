"""serve.py under 1, 4 and 8 clients streaming at once, beside plain generation at batch 1 and 8.

    uv run python -m bench.bench_serve [--repeats 2] [--new-tokens 128] [--checkpoint PATH]

A randomly initialised GPT-2 124M (or --checkpoint's model, as bench/gpu_check.py serves its own;
DTYPE auto) is served by serve.py in a process of its own; N
clients, threads of this process, each stream a completion of --new-tokens tokens at once, their
prompts generate.py's question with a number after it (of different lengths, so that the rows of
the batch differ as real clients' do). Per run: aggregate new tokens/s (every token received, over
the time from the first request to the last token), each client's time to its first token, and the
time between two of its tokens (p50, p95 over every client's gaps). In the same rounds, taking turns
with the clients, bench_generate's own measurement at batch 1 and batch 8 on the same model in this
process: sampling.stream, the same sampling (temperature 0.8, no top-k or top-p), no HTTP.
"""

import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench import processes, report
from bench.bench_generate import new_tokens_per_s
from device import setup
from documents import question_prompt
from env import ArgumentParser, UserError, cli
from generate import QUESTION
from model import GPT, GPTConfig
from tokenizer import EOT, encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = dict(temperature=0.8, top_k=0, top_p=1.0)
CLIENTS = (1, 4, 8)


def prompt(client):
    return question_prompt(f"{QUESTION} ({'1' * (client + 1)})")


def start_server(folder, port, chosen=""):
    """Serve the checkpoint `chosen`, else a random 124M one saved in `folder`; return the process
    once it answers, and the model."""
    import checkpoint

    if chosen:
        model, _ = checkpoint.load_model(chosen)
        path = chosen
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig())
        path = os.path.join(folder, "model_00000.pt")
        checkpoint.save({"model": model.state_dict(), "config": model.config.shape()}, path)
    log = os.path.join(folder, "serve.log")  # a file, not a pipe nobody reads while it runs
    with open(log, "w") as errors:  # the process keeps its own copy of the file
        process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", path, "--port", str(port),
                                    "--max-batch", str(max(CLIENTS))], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.time() + 120
    while True:
        if process.poll() is not None:
            with open(log) as f:
                raise UserError(f"serve.py did not start: {f.read().strip().splitlines()[-1:]}")
        try:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=1)) as connection:
                connection.request("GET", "/health")
                connection.getresponse().read()
            return process, model
        except OSError:
            if time.time() > deadline:
                raise UserError("serve.py did not answer within 2 minutes") from None
            time.sleep(0.2)


def clients_at_once(port, count, new_tokens):
    """Stream `count` completions at once; return aggregate tokens/s, times to first token, and the
    gaps between tokens (seconds). The clients are http.client's, which every Python has."""
    arrivals = [[] for _ in range(count)]
    ready = threading.Barrier(count + 1)

    def client(i):
        # SAMPLING without top_k, which OpenAI's API (so the server) has not
        body = {"prompt": prompt(i), "max_tokens": new_tokens, "stream": True,
                "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"]}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        ready.wait()
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        with contextlib.closing(connection):
            for line in connection.getresponse():
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    arrivals[i].append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    tokens = sum(map(len, arrivals))
    # a client whose answer ended at once (<|endoftext|> first: a trained model's --checkpoint) has no times
    end = max((times[-1] for times in arrivals if times), default=start + 1e-9)
    first = [times[0] - start for times in arrivals if times]
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    return tokens / (end - start), first, gaps


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


@cli
def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=report.positive_int, default=2)
    parser.add_argument("--new-tokens", type=report.positive_int, default=128)
    parser.add_argument("--port", type=report.non_negative_int, default=0, help="default: a free one")
    parser.add_argument("--checkpoint", default="", help="serve this checkpoint (default: a random GPT-2 124M)")
    parser.add_argument("--name", default="serve", help="the results file: bench/results/NAME.json")
    args = parser.parse_args()
    started = time.perf_counter()
    runtime = setup("auto", "auto")
    sides = [("generate", 1), *(("serve", n) for n in CLIENTS), ("generate", max(CLIENTS))]
    runs = {side: [] for side in sides}
    details = {n: {"first": [], "gaps": []} for n in CLIENTS}
    with tempfile.TemporaryDirectory() as folder:
        args.port = args.port or processes.free_port()
        server, model = start_server(folder, args.port, args.checkpoint)
        model = model.to(runtime.device).eval()
        generate_prompt = [EOT] + encode(prompt(0))
        try:
            clients_at_once(args.port, 2, 4)  # warm-up: both sides' kernels and allocators
            new_tokens_per_s(model, runtime, generate_prompt, 2, 4, True, SAMPLING)
            for repeat in range(args.repeats):
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    kind, n = side
                    if kind == "generate":
                        rate = new_tokens_per_s(model, runtime, generate_prompt, n, args.new_tokens, True, SAMPLING)
                    else:
                        rate, first, gaps = clients_at_once(args.port, n, args.new_tokens)
                        details[n]["first"] += first
                        details[n]["gaps"] += gaps
                    runs[side].append(rate)
                    print(f"  repeat {repeat + 1}: {kind} {n}: {rate:.1f} new tokens/s", flush=True)
        finally:
            server.terminate()
            server.wait()

    rows, figures = [], {}
    for kind, n in sides:
        spread = report.spread(runs[(kind, n)])
        row = [f"{kind}: {'batch' if kind == 'generate' else 'clients'} {n}", spread["min"], spread["median"], spread["max"]]
        figures[f"{kind}_{n}"] = {"tokens_per_s": spread}
        if kind == "serve":
            first, gaps = details[n]["first"], details[n]["gaps"]
            figures[f"{kind}_{n}"].update(first_token_s={"p50": percentile(first, 50), "p95": percentile(first, 95)},
                                          gap_ms={"p50": percentile(gaps, 50) * 1000, "p95": percentile(gaps, 95) * 1000})
            row += [f"{percentile(first, 50):.2f} / {percentile(first, 95):.2f}",
                    f"{percentile(gaps, 50) * 1000:.0f} / {percentile(gaps, 95) * 1000:.0f}"]
        else:
            row += ["", ""]
        rows.append(row)
    print(f"{model.num_params(non_embedding=False) / 1e6:.0f}M parameters, {runtime.device}, {runtime.dtype_name}, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens a client, {args.repeats} repeats, "
          "sides taking turns")
    report.table(["side", "tok/s min", "median", "max", "first token s p50 / p95", "between tokens ms p50 / p95"], rows)
    def median(side):
        return figures[side]["tokens_per_s"]["median"]

    goals = {"8 clients / 1 client": median("serve_8") / median("serve_1"),
             "8 clients / generate batch 8": median("serve_8") / median("generate_8"),
             "1 client / generate batch 1": median("serve_1") / median("generate_1")}
    for name, ratio in goals.items():
        print(f"{name}: {ratio:.2f}x")
    report.save(args.name, {**figures, "ratios": goals},
                {**vars(args), "sampling": SAMPLING, "seconds": round(time.perf_counter() - started, 1)}, runtime.device)


if __name__ == "__main__":
    main()
