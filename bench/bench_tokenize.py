"""Benchmark data prep: dataset.py's threaded tokenizer against build-nanogpt's fineweb.py process pool.

    uv run python -m bench.bench_tokenize [--repeats 5] [--copies 8] [--build-copies 8 64 256]

Both sides tokenize the same documents (tiny shakespeare's paragraphs, `--copies` times, as short
documents and joined 20 at a time as long ones, natural_reasoning's typical length) into uint16
arrays with <|endoftext|> before each document, alternating over the repeats since this machine is
shared. The fineweb.py side is its recipe: a multiprocessing pool of cpu_count//2 processes,
`imap(chunksize=16)`, `encode_ordinary` per document. Then whole `dataset.py` builds of several
dataset sizes (`--build-copies`) run in fresh processes, for their throughput and peak memory:
the anonymous memory (heap) should not grow with the tokens (the shuffle's order costs 4 bytes a
record); file pages of `datasets`' memory-mapped Arrow files do, and the OS reclaims them. Prints a
table and writes bench/results/tokenize.json.
"""

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dataset
from bench import report
from env import ArgumentParser, UserError, cli
from tokenizer import EOT, get_encoding

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LONG_JOIN = 20  # paragraphs per long document, about as long as a natural_reasoning row


def fineweb_tokenize(doc):
    """Tokenize one document as build-nanogpt's fineweb.py tokenize() does: uint16 tokens led by EOT."""
    tokens = [EOT]
    tokens.extend(get_encoding().encode_ordinary(doc))
    return np.array(tokens).astype(np.uint16)


def run_fineweb(pool, docs):
    """Tokenize the documents on fineweb.py's process pool; return how many tokens they make."""
    return sum(len(tokens) for tokens in pool.imap(fineweb_tokenize, docs, chunksize=16))


def run_ours(docs, threads):
    """Tokenize the documents as dataset.py does; return how many tokens they make."""
    batches = (docs[i:i + dataset.BATCH_DOCUMENTS] for i in range(0, len(docs), dataset.BATCH_DOCUMENTS))
    return sum(len(tokens) for tokens in dataset.tokenized_batches(batches, threads))


def cpu_seconds(worker_pids):
    """Return the CPU seconds used by this process (all threads) and by the given live workers."""
    total = time.process_time()
    for pid in worker_pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def paragraphs():
    """Return tiny shakespeare's non-empty paragraphs."""
    if not SHAKESPEARE.is_file():
        raise UserError(f"{SHAKESPEARE} is absent: this benchmark tokenizes tiny shakespeare")
    return [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]


BUILD_CHILD = """
import json, sys, threading, time
import datasets, dataset, tokenizer

def resident(field):
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) / 1024

tokenizer.get_encoding()
imported = {"rss": resident("VmRSS"), "anon": resident("RssAnon")}
peak_anon = [0.0]

def sample():  # the kernel keeps no high-water mark of anonymous memory alone
    while True:
        peak_anon[0] = max(peak_anon[0], resident("RssAnon"))
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
meta = dataset.build(sys.argv[1], sys.argv[2], int(sys.argv[3]))
seconds = time.perf_counter() - start
print(json.dumps({"tokens": sum(split["tokens"] for split in meta["splits"].values()), "seconds": seconds,
                  "peak_rss_mib": resident("VmHWM"),
                  "peak_anon_mib": peak_anon[0], "imported_rss_mib": imported["rss"],
                  "imported_anon_mib": imported["anon"]}))
"""


def measure_build(text_path, shard_size, workdir):
    """Run a whole dataset.py build in a fresh process; return its tokens, seconds (after imports)
    and peak memory."""
    out = os.path.join(workdir, f"built_{Path(text_path).stem}")
    result = subprocess.run([sys.executable, "-c", BUILD_CHILD, str(text_path), out, str(shard_size)],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@cli
def main():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=report.positive_int, default=5)
    parser.add_argument("--copies", type=report.positive_int, default=8, help="copies of tiny shakespeare to tokenize")
    parser.add_argument("--build-copies", type=report.positive_int, nargs="+", default=[8, 64, 256],
                        help="dataset sizes of the builds, in copies of tiny shakespeare")
    parser.add_argument("--shard-size", type=report.positive_int, default=2**20, help="SHARD_SIZE of the builds")
    args = parser.parse_args()

    short_docs = paragraphs() * args.copies
    long_docs = ["\n\n".join(short_docs[i:i + LONG_JOIN]) for i in range(0, len(short_docs), LONG_JOIN)]
    threads = dataset.default_threads()
    processes = max(1, os.cpu_count() // 2)  # fineweb.py's choice
    get_encoding()  # built once here; the pool's workers build theirs in the warm-up below

    load_before = os.getloadavg()[0]  # other work on the machine caps what threads can gain
    rates = {(shape, side): [] for shape in ("short", "long") for side in ("ours", "fineweb")}
    per_cpu = {key: [] for key in rates}  # tokens per CPU-second: what the machine's load cannot change
    with mp.Pool(processes, initializer=get_encoding) as pool:
        workers = [worker.pid for worker in pool._pool]  # multiprocessing has no public way to list them
        run_fineweb(pool, short_docs[:1000])
        run_ours(short_docs[:1000], threads)
        for repeat in range(args.repeats):
            for shape, docs in (("short", short_docs), ("long", long_docs)):
                # alternate, in the opposite order every other repeat: both sides see the same load
                for side in ("ours", "fineweb") if repeat % 2 == 0 else ("fineweb", "ours"):
                    start, cpu = time.perf_counter(), cpu_seconds(workers)
                    tokens = run_ours(docs, threads) if side == "ours" else run_fineweb(pool, docs)
                    rates[shape, side].append(tokens / (time.perf_counter() - start))
                    per_cpu[shape, side].append(tokens / (cpu_seconds(workers) - cpu))
    load_after = os.getloadavg()[0]
    counts = {"short": run_ours(short_docs, threads), "long": run_ours(long_docs, threads)}

    with tempfile.TemporaryDirectory() as workdir:
        builds = []
        for copies in args.build_copies:
            text_path = Path(workdir) / f"shakespeare_x{copies}.txt"
            text_path.write_text("\n\n".join(paragraphs() * copies))
            builds.append({"copies": copies, **measure_build(text_path, args.shard_size, workdir)})

    print(f"tokenization, tokens/s over {args.repeats} alternating repeats "
          f"(ours: {threads} threads; fineweb.py: pool of {processes} process(es); "
          f"1-min load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs)")
    figures, rows = {}, []
    for shape in ("short", "long"):
        label = f"{shape} ({len(short_docs if shape == 'short' else long_docs):,} docs, {counts[shape]:,} tok)"
        for side in ("ours", "fineweb"):
            stats = report.spread(rates[shape, side])
            figures[f"{shape}_{side}_tokens_per_s"] = stats
            figures[f"{shape}_{side}_tokens_per_cpu_s"] = report.spread(per_cpu[shape, side])
            rows.append([label, side] + [f"{stats[key]:,.0f}" for key in ("min", "median", "max")]
                        + [f"{statistics.median(per_cpu[shape, side]):,.0f}"])
        ratios = report.spread([a / b for a, b in zip(rates[shape, "ours"], rates[shape, "fineweb"])])
        figures[f"{shape}_ratio"] = ratios
        rows.append(["", "ratio"] + [f"{ratios[key]:.2f}" for key in ("min", "median", "max")] + [""])
    report.table(["documents", "side", "min", "median", "max", "tok/CPU-s"], rows)
    print(f"\nwhole dataset.py builds (SHARD_SIZE={args.shard_size:,}, fresh process each)")
    report.table(["tokens", "tokens/s", "peak RSS MiB", "peak anon MiB", "anon growth"],
                 [[f"{b['tokens']:,}", f"{b['tokens'] / b['seconds']:,.0f}", f"{b['peak_rss_mib']:,.0f}",
                   f"{b['peak_anon_mib']:,.0f}", f"{b['peak_anon_mib'] - b['imported_anon_mib']:,.0f}"] for b in builds])
    print("(anon growth: over the process after imports; the rest of RSS is file pages, the Arrow "
          "memory maps the OS reclaims)")

    config = {**vars(args), "batch_documents": dataset.BATCH_DOCUMENTS, "long_join": LONG_JOIN,
              "ours_threads": threads, "fineweb_processes": processes, "fineweb_chunksize": 16,
              "load_average_before_after": [load_before, load_after]}
    print()
    report.save("tokenize", {**figures, "builds": builds}, config)


if __name__ == "__main__":
    main()
