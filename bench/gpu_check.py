"""Check every CUDA path of the real scripts in one short run on a lent GPU.

Each step runs a script in a process of its own, as a user would, on GPT-2 124M (the default shape):

    data      the demo corpus as token shards (dataset.py's writers: dataset.py itself needs `datasets`)
    train     20 updates compiled, in bf16 (DTYPE auto), a checkpoint at the end: tok/s, MFU, peak memory
    fp16      5 updates in float16 through the GradScaler: tok/s, peak memory; the loss must stay finite and fall
    fsdp      5 updates with PARALLEL=fsdp under torchrun, one rank: tok/s, peak memory
    resume    3 more updates from train's checkpoint, which must say where it continues
    evaluate  evaluate.py on the first 1,000 real HellaSwag rows: examples/s
    generate  generate.py's two answers: the seconds they take once the model is loaded
    prompt    prompt.py fed a scripted conversation, which must end with Goodbye
    serve     serve.py under 1, 4 and 8 streaming clients (bench/bench_serve.py), beside generation

    bash bench/gpu_check.sh                  # on the lent GPU: every step, stopped at 4 minutes
    bash bench/gpu_check.sh train evaluate   # some steps, with the steps they need
    bash bench/gpu_check.sh --dry-run        # the very same sequence, tiny, on this machine's CPU

A step is `ok`, or says why not (the script's `Error:` line, else its last stderr line); a step whose
prerequisite did not pass is skipped. The table at the end, a JSON record and every step's output go
to bench/results/gpu_check.{txt,json,log} (gpu_check_dry_run.* for a dry run), and to $OUT when set.
A new step is a function that returns its Job, one that reads its figures, and a line in STEPS.
"""

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import demo_corpus
import settings
from bench import processes
from documents import qa_document

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# real HellaSwag rows, where HELLASWAG_PATH names none: carried to the GPU (bench/gpu_env.sh), or beside the checkout
REAL_HELLASWAG = (ROOT / ".gpu_data" / "hellaswag_val.jsonl",
                  ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl")
RESUMED_UPDATES = 3
CONVERSATION = "temp 0.5\nWhat is 12 + 30?\ntokens 20\nHow far does a car go at 10 m/s for 5 s?\nquit\n"


@dataclass(frozen=True)
class Scale:
    """How big the steps run: GPT-2 124M on the GPU, a tiny model on a CPU for the dry run."""

    device: dict  # variables of every step: where it runs
    shape: dict  # the model's shape, for the training steps
    batch: dict  # BATCH_SIZE, SEQ_LENGTH, TOTAL_BATCH_SIZE
    compile: str  # COMPILE of the train step
    updates: int  # of the train step
    compiling_updates: int  # train's first updates, which compile: left out of its speed
    short_updates: int  # of fp16 and fsdp
    val_steps: int
    documents: int  # of the demo corpus
    hellaswag_rows: int
    new_tokens: int  # generate.py's MAX_NEW_TOKENS
    seconds: int  # for the whole check: a step that would start later is skipped, one running then is stopped


# 124M, an update of 4 micro-batches of 16 x 1024 tokens (build-nanogpt's sequences, an eighth of its
# batch): short updates, so that compiling (about a minute) is the only long part of the check
GPU = Scale(device={}, shape={}, batch=dict(BATCH_SIZE="16", SEQ_LENGTH="1024", TOTAL_BATCH_SIZE="65536"),
            compile="1", updates=20, compiling_updates=3, short_updates=5, val_steps=4,
            documents=demo_corpus.DOCUMENTS, hellaswag_rows=1000, new_tokens=32, seconds=240)
# compiling even this model adds 20 s on a 2-core CPU: the dry run checks the sequence, not the compiler
DRY_RUN = Scale(device=dict(DEVICE="cpu"), shape=dict(N_LAYER="2", N_HEAD="2", N_EMBD="64", BLOCK_SIZE="128"),
                batch=dict(BATCH_SIZE="4", SEQ_LENGTH="128", TOTAL_BATCH_SIZE="1024"), compile="0", updates=4,
                compiling_updates=1, short_updates=3, val_steps=2, documents=4000, hellaswag_rows=8, new_tokens=8,
                seconds=300)


class Failed(Exception):
    """A step's output is not what a working script prints: the message becomes the step's status."""


@dataclass
class Job:
    """A step's process: its command line, its own variables, and what it reads on stdin."""

    command: list
    variables: dict
    stdin: str = ""


@dataclass
class Output:
    """What a step's process did: its exit code (None: killed at its time limit), how long it ran,
    and its lines as (seconds since its start, "out" or "err", text)."""

    returncode: int | None
    seconds: float
    lines: list

    def stdout(self):
        return "\n".join(text for _, stream, text in self.lines if stream == "out")

    def times(self, start):
        """Seconds from the start to each stdout line that begins with `start` (at least one)."""
        found = [t for t, stream, text in self.lines if stream == "out" and text.startswith(start)]
        if not found:
            raise Failed(f"no line starting {start!r} in its output")
        return found


@dataclass
class Work:
    """One check's files, in a temporary folder, and how big its steps run."""

    folder: Path
    scale: Scale
    hellaswag: str  # the HellaSwag rows evaluate.py scores

    @property
    def dataset(self):
        return str(self.folder / "demo")

    def log_dir(self, step):
        return str(self.folder / step)

    def trained(self):
        """The checkpoint the train step saves after its last update."""
        import checkpoint  # imports torch: not needed to check the steps' names

        return checkpoint.checkpoint_path(self.log_dir("train"), self.scale.updates - 1)

    def variables(self, step, **chosen):
        """A step's own variables: its LOG_DIR, the device, the HellaSwag rows, and `chosen`."""
        return {"LOG_DIR": self.log_dir(step), "HELLASWAG_PATH": self.hellaswag, **self.scale.device, **chosen}

    def training(self, step, updates, **chosen):
        """The variables of a short training run: validation before the first update and after the
        last, no HellaSwag (evaluate scores it), a warm-up short enough for the loss to move."""
        return self.variables(step, DATASET_PATH=self.dataset, MAX_STEPS=str(updates), WARMUP_STEPS="2",
                              EVAL_INTERVAL=str(updates), VAL_STEPS=str(self.scale.val_steps), HELLASWAG_LIMIT="-1",
                              **self.scale.shape, **self.scale.batch, **chosen)


@dataclass
class Step:
    """One check: the process to run, then what its output must show and the figures it gives."""

    name: str
    job: Callable[[Work], Job]
    figures: Callable[[Work, Output], dict]  # raises Failed when the output is wrong
    needs: str | None = None  # the step whose files it uses
    timeout_s: int = 90


@dataclass
class Result:
    """A step's line in the table."""

    step: str
    status: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# the steps


def write_demo_shards(path, documents):
    """Write the demo corpus's first `documents` rows at `path` as token shards, through dataset.py's
    own documents, tokenizer and shard writer: dataset.py loads its rows through `datasets`, which the
    lent GPU machine lacks. (Unshuffled: the rows come from a seeded random generator already.)"""
    import dataset  # numpy and tiktoken: only in the data step's own process
    import shards

    texts = [qa_document(row["question"], row["reference_answer"]) for row in demo_corpus.rows(documents)]
    batches = [texts[i:i + dataset.BATCH_DOCUMENTS] for i in range(0, len(texts), dataset.BATCH_DOCUMENTS)]
    os.makedirs(path)
    shard_size = settings.DataConfig.shard_size
    splits = dataset.write_shards(dataset.tokenized_batches(batches), path, shard_size)
    shards.write_meta(path, {"source": "demo", "tokenizer": "gpt2", "shard_size": shard_size, "splits": splits})
    print(f"demo corpus at {path}: " + ", ".join(f"{split} {info['tokens']:,} tokens" for split, info in splits.items()))


def data_job(work):
    call = f"from bench.gpu_check import write_demo_shards; write_demo_shards({work.dataset!r}, {work.scale.documents})"
    return Job([PYTHON, "-c", call], work.variables("data"))


def data_figures(work, output):
    with open(os.path.join(work.dataset, "meta.json")) as f:
        splits = json.load(f)["splits"]
    return {"tokens": sum(info["tokens"] for info in splits.values())}


def train_job(work):
    return Job([PYTHON, "train.py"], work.training("train", work.scale.updates, COMPILE=work.scale.compile))


def train_figures(work, output):
    return training_figures(work.log_dir("train"), skip=work.scale.compiling_updates)


def fp16_job(work):
    return Job([PYTHON, "train.py"], work.training("fp16", work.scale.short_updates, DTYPE="float16", COMPILE="0"))


def fp16_figures(work, output):
    """The losses must be finite, and at least one update applied: the loss scaler skips those whose
    gradients overflowed (a few at first, while it finds its scale), but not every one."""
    rows = read_metrics(work.log_dir("fp16"))
    losses = [float(row[column]) for row in rows for column in ("loss", "val_loss") if row[column]]
    if not all(map(math.isfinite, losses)):
        raise Failed(f"a float16 loss is not finite: {losses}")
    if not any(math.isfinite(float(row["norm"])) for row in rows):
        raise Failed("the loss scaler skipped every float16 update")
    return training_figures(work.log_dir("fp16"), skip=1)


def fsdp_job(work):
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return Job([*torchrun, "train.py"], work.training("fsdp", work.scale.short_updates, PARALLEL="fsdp", COMPILE="0"))


def fsdp_figures(work, output):
    return training_figures(work.log_dir("fsdp"), skip=1)


def resume_job(work):
    # COMPILE=0: train has checked the compiled updates; what is new here is restoring the checkpoint,
    # and a second compile would cost another minute of the loan
    variables = work.training("resume", work.scale.updates + RESUMED_UPDATES, RESUME=work.trained(), COMPILE="0")
    return Job([PYTHON, "train.py"], variables)


def resume_figures(work, output):
    expected = f"continuing at step {work.scale.updates}"
    if expected not in output.stdout():
        raise Failed(f"no {expected!r} in its output")
    return {}


def evaluate_job(work):
    command = [PYTHON, "evaluate.py", "--checkpoint", work.trained(), "--limit", str(work.scale.hellaswag_rows)]
    return Job(command, work.variables("evaluate"))


def evaluate_figures(work, output):
    """The examples scored over the seconds hellaswag.evaluate took (encoding and scoring, between
    the two lines evaluate.py prints around it): no start-up, no model loading."""
    total = re.search(r"^Total Accuracy: [\d.]+ \(\d+/(\d+)\)$", output.stdout(), re.MULTILINE)
    if not total:
        raise Failed("no 'Total Accuracy' line in its output")
    examples = int(total[1])
    seconds = output.times("Overall Results:")[0] - output.times("Evaluating on HellaSwag")[0]
    return {"examples": examples, "examples/s": examples / seconds}


def generate_job(work):
    variables = work.variables("generate", TESTING_MODEL_PATH=work.trained(), MAX_NEW_TOKENS=str(work.scale.new_tokens))
    return Job([PYTHON, "generate.py"], variables)


def generate_figures(work, output):
    """The seconds from the loaded model to its second answer. (No tokens/s: an answer may end early,
    at <|endoftext|>, and generate.py does not say where.)"""
    answers = output.times("Response:")
    if len(answers) != 2:
        raise Failed(f"{len(answers)} responses instead of 2")
    return {"generation s": answers[-1] - output.times("Model loaded successfully!")[0]}


def prompt_job(work):
    return Job([PYTHON, "prompt.py"], work.variables("prompt", TESTING_MODEL_PATH=work.trained()), CONVERSATION)


def prompt_figures(work, output):
    stdout = output.stdout()
    if stdout.count("Bot: ") != 2:
        raise Failed(f"{stdout.count('Bot: ')} answers instead of 2")
    if "Goodbye!" not in stdout:
        raise Failed("no Goodbye at the end of the conversation")
    return {}


def serve_job(work):
    """bench_serve on the trained model: serve.py on the GPU under 1, 4 and 8 streaming clients."""
    arguments = ["--checkpoint", work.trained(), "--repeats", "1", "--new-tokens", str(work.scale.new_tokens),
                 "--name", "gpu_check_serve"]
    return Job([PYTHON, "-m", "bench.bench_serve", *arguments], work.variables("serve"))


def serve_figures(work, output):
    """Aggregate tokens/s at 8 clients, and its ratio to one client's."""
    stdout = output.stdout()
    rate = re.search(r"^ *serve: clients 8 +([\d.]+)", stdout, re.MULTILINE)
    ratio = re.search(r"^8 clients / 1 client: ([\d.]+)x", stdout, re.MULTILINE)
    if not (rate and ratio):
        raise Failed("no table of clients in its output")
    return {"8 clients tok/s": float(rate.group(1)), "8 / 1 client": float(ratio.group(1))}


STEPS = [
    Step("data", data_job, data_figures, timeout_s=60),
    Step("train", train_job, train_figures, needs="data", timeout_s=180),
    Step("fp16", fp16_job, fp16_figures, needs="data"),
    Step("fsdp", fsdp_job, fsdp_figures, needs="data"),
    Step("resume", resume_job, resume_figures, needs="train"),
    Step("evaluate", evaluate_job, evaluate_figures, needs="train"),
    Step("generate", generate_job, generate_figures, needs="train"),
    Step("prompt", prompt_job, prompt_figures, needs="train"),
    Step("serve", serve_job, serve_figures, needs="train"),
]
NAMES = [step.name for step in STEPS]


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def training_figures(log_dir, skip):
    """tok/s and MFU, medians over the updates after the first `skip`, and the peak memory, from
    metrics.csv (MFU only where the device's peak is known, the peak where train.py records it)."""
    rows = read_metrics(log_dir)
    timed = rows[skip:] or rows
    figures = {"tok/s": statistics.median(float(row["tok_per_sec"]) for row in timed)}
    if timed[0]["mfu"]:
        figures["MFU %"] = 100 * statistics.median(float(row["mfu"]) for row in timed)
    peaks = [int(float(row["peak_mem_mib"])) for row in rows if row.get("peak_mem_mib")]
    figures["peak MiB"] = max(peaks) if peaks else None
    return figures


# ----------------------------------------------------------------------------------------------
# running them


def plan(names):
    """The steps to run for the chosen names (every step when none), with the steps they need, in
    STEPS' order."""
    wanted = set(names or NAMES)
    for step in reversed(STEPS):  # a step's prerequisite comes before it: added before it is reached
        if step.name in wanted and step.needs:
            wanted.add(step.needs)
    return [step for step in STEPS if step.name in wanted]


def hellaswag_rows(folder):
    """The real HellaSwag rows where there are some (HELLASWAG_PATH, .gpu_data/, ../shared/data),
    else a few rows in their format written into `folder`, so that the dry run passes anywhere."""
    for path in (os.environ.get("HELLASWAG_PATH"), *REAL_HELLASWAG):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    path = folder / "hellaswag_val.jsonl"
    rows = [{"ctx": f"What is {i} plus {i}?", "label": i % 4, "endings": [f"{i + i + k}." for k in range(4)]}
            for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def environment(variables):
    """A step's environment: this process's, less every variable of ours the caller's shell may hold,
    plus the step's own."""
    # unbuffered: each line is timed as it is printed; offline: the GPU machine has no network to wait for
    return settings.cleared_environment(**{"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **variables})


def collect(pipe, stream, lines, start):
    for text in pipe:
        lines.append((time.perf_counter() - start, stream, text.rstrip("\n")))


def run(job, timeout_s):
    """Run a job; at its time limit, or when this process is interrupted, kill it with every process
    it started."""
    start = time.perf_counter()
    process = subprocess.Popen(job.command, cwd=ROOT, env=environment(job.variables), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    readers = [threading.Thread(target=collect, args=(pipe, stream, lines, start))
               for pipe, stream in ((process.stdout, "out"), (process.stderr, "err"))]
    for reader in readers:
        reader.start()
    try:
        with contextlib.suppress(BrokenPipeError):  # a script that failed before reading its input
            process.stdin.write(job.stdin)
            process.stdin.close()
        returncode = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if process.poll() is None:
            processes.kill_tree(process)
    for reader in readers:
        reader.join()
    return Output(returncode, time.perf_counter() - start, lines)


def error_line(output):
    """The script's own one-line error (the last `Error:` line on stderr), else its last stderr line."""
    return processes.error_line([text for _, stream, text in output.lines if stream == "err"], output.returncode)


def check(step, work, passed, log, seconds_left=math.inf):
    """Run one step, unless its prerequisite did not pass or the check's time is up; log its output,
    return its Result."""
    if step.needs and step.needs not in passed:
        return Result(step.name, f"skipped: {step.needs} did not pass")
    if seconds_left < 10:
        return Result(step.name, "skipped: the check's time is up")
    job = step.job(work)
    timeout_s = min(step.timeout_s, int(seconds_left))
    output = run(job, timeout_s)
    if output.returncode is None:
        status, figures = f"timed out after {timeout_s} s", {}
    elif output.returncode != 0:
        status, figures = error_line(output), {}
    else:
        try:
            status, figures = "ok", step.figures(work, output)
        except Failed as failure:
            status, figures = str(failure), {}
        except Exception as error:  # a script that prints its figures differently now: say so, and go on
            status, figures = f"cannot read its figures: {type(error).__name__}: {error}", {}
    print(f"==== {step.name}: {status} ({output.seconds:.1f} s)", file=log)
    print(" ".join(f"{name}={shlex.quote(value)}" for name, value in job.variables.items()),
          shlex.join(job.command), file=log)
    for t, stream, text in output.lines:
        print(f"{t:7.2f} {stream} {text}", file=log)
    return Result(step.name, status, output.seconds, figures)


def shown(figures):
    """The figures as the table shows them; one that was not measured (None) is left blank."""
    return "  ".join(f"{name} {value:,.1f}" if isinstance(value, float) else f"{name} {value:,}"
                     for name, value in figures.items() if value is not None)


def table(results):
    """The one table of the check, as text."""
    from bench import report  # imports torch: see main
    rows = [[r.step, r.status if len(r.status) <= 100 else r.status[:97] + "...", shown(r.figures), r.seconds]
            for r in results]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        report.table(["step", "status", "figures", "seconds"], rows)
    return text.getvalue()


def save(results, text, record, config, device):
    """Write the JSON record and the table beside the log in bench/results/, and copy all three to $OUT."""
    from bench import report  # imports torch: see main
    figures = {r.step: {"status": r.status, "seconds": round(r.seconds, 2), **r.figures} for r in results}
    paths = [report.save(record, figures, config, device), os.path.join(report.RESULTS, f"{record}.txt"),
             os.path.join(report.RESULTS, f"{record}.log")]
    Path(paths[1]).write_text(text)
    for path in paths:
        to_out(path)


def to_out(path):
    """Copy a file to $OUT, when it is set: what the lent machine sends back."""
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])


def main():
    sys.stdout.reconfigure(line_buffering=True)  # each step's line as it ends, through a pipe too
    parser = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", metavar="STEP",
                        help=f"{', '.join(NAMES)} (default: all); a step's prerequisites run too")
    parser.add_argument("--dry-run", action="store_true", help="the same sequence with a tiny model on the CPU")
    args = parser.parse_args()
    unknown = [name for name in args.steps if name not in NAMES]
    if unknown:
        print(f"Error: unknown step {unknown[0]!r}; the steps are {', '.join(NAMES)}", file=sys.stderr)
        sys.exit(2)  # argparse's status for a wrong command line

    import torch  # slow to import (so is bench.report, which imports it): only once the command line is good

    from bench import report

    if shutil.which("nvidia-smi"):  # the GPU's name, memory and driver
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not args.dry_run and not torch.cuda.is_available():
        print("Error: no CUDA device here: check the sequence on the CPU with --dry-run", file=sys.stderr)
        sys.exit(1)
    scale, record, device = (DRY_RUN, "gpu_check_dry_run", "cpu") if args.dry_run else (GPU, "gpu_check", "cuda")
    steps = plan(args.steps)
    os.makedirs(report.RESULTS, exist_ok=True)
    results, passed = [], set()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder, \
            open(os.path.join(report.RESULTS, f"{record}.log"), "w") as log:
        work = Work(Path(folder), scale, hellaswag_rows(Path(folder)))
        deadline = time.perf_counter() + scale.seconds
        for step in steps:
            result = check(step, work, passed, log, deadline - time.perf_counter())
            print(f"{result.step}: {result.status} ({result.seconds:.1f} s) {shown(result.figures)}".rstrip())
            log.flush()
            to_out(log.name)  # a check cut off at the loan's end still sends back what it has done
            results.append(result)
            if result.status == "ok":
                passed.add(step.name)
    text = table(results)
    print(f"\n{text}", end="")
    config = {"dry_run": args.dry_run, "steps": [step.name for step in steps], "hellaswag": work.hellaswag,
              "scale": asdict(scale)}
    save(results, text, record, config, device)
    sys.exit(0 if len(passed) == len(steps) else 1)


if __name__ == "__main__":
    main()
