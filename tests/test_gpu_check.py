"""bench/gpu_check.py, the check of every CUDA path on a lent GPU, through its dry run: the very
sequence of steps, each a real script in its own process, with a tiny model on this CPU. One dry run
(about 35 s here, mostly the processes' start-up) serves every assertion about it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hellaswag
from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
# settings a caller's shell might hold: each would make some step fail if it leaked into it
LEAKS = {"RESUME": "1", "OPTIMIZER": "muon", "TESTING_MODEL_PATH": "/nonexistent"}


def gpu_check_sh(*arguments, out):
    """Run bench/gpu_check.sh as a user would, this test's python being python3."""
    env = {**os.environ, **LEAKS, "OUT": str(out),
           "OMP_NUM_THREADS": "1",  # a tiny model gains nothing from a second thread on a busy machine
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "bench/gpu_check.sh", *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def record(out):
    return json.loads((out / "gpu_check_dry_run.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return gpu_check_sh("--dry-run", out=out), out


def test_dry_run_passes_every_step(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = record(out)["figures"]
    assert list(steps) == gpu_check.NAMES
    assert {name: step["status"] for name, step in steps.items()} == {name: "ok" for name in gpu_check.NAMES}


def test_dry_run_figures(dry_run):
    _, out = dry_run
    steps = record(out)["figures"]
    assert steps["data"]["tokens"] > 100_000
    for name in ("train", "fp16", "fsdp"):
        assert steps[name]["tok/s"] > 0
        assert steps[name]["peak MiB"] > 0  # train.py records it on a Linux CPU too (the process's peak RSS)
    assert steps["evaluate"]["examples"] == gpu_check.DRY_RUN.hellaswag_rows
    assert steps["evaluate"]["examples/s"] > 0
    assert steps["generate"]["generation s"] > 0
    assert steps["serve"]["8 clients tok/s"] > 0 and steps["serve"]["8 / 1 client"] > 0
    assert all(step["seconds"] > 0 for step in steps.values())


def test_dry_run_prints_one_table_and_writes_it_with_the_logs(dry_run):
    result, out = dry_run
    header = result.stdout.splitlines()[-len(gpu_check.NAMES) - 3]
    assert header.split() == ["step", "status", "figures", "seconds"]
    assert result.stdout.count(header) == 1
    table = (out / "gpu_check_dry_run.txt").read_text().splitlines()
    assert table[0] == header
    assert [line.split()[:2] for line in table[2:]] == [[name, "ok"] for name in gpu_check.NAMES]
    log = (out / "gpu_check_dry_run.log").read_text()
    assert all(f"==== {name}: ok" in log for name in gpu_check.NAMES)


def test_chosen_steps_run_with_the_steps_they_need_only():
    assert [step.name for step in gpu_check.plan(["evaluate"])] == ["data", "train", "evaluate"]
    assert [step.name for step in gpu_check.plan(["fsdp", "data"])] == ["data", "fsdp"]
    assert [step.name for step in gpu_check.plan([])] == gpu_check.NAMES


def test_unknown_step_is_one_error_line_and_exit_code_2(tmp_path):
    result = gpu_check_sh("--dry-run", "data", "trian", out=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: unknown step 'trian'; the steps are {', '.join(gpu_check.NAMES)}"]


def test_a_step_whose_prerequisite_did_not_pass_is_skipped(tmp_path):
    work = gpu_check.Work(tmp_path, gpu_check.DRY_RUN, hellaswag="")
    evaluate = gpu_check.plan(["evaluate"])[-1]
    with open(tmp_path / "log", "w") as log:
        result = gpu_check.check(evaluate, work, passed={"data"}, log=log)
    assert result.status == "skipped: train did not pass"


def test_without_real_hellaswag_rows_a_few_are_written(tmp_path, monkeypatch):
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setattr(gpu_check, "REAL_HELLASWAG", ())
    rows = hellaswag.read_rows(gpu_check.hellaswag_rows(tmp_path))
    assert len(rows) >= gpu_check.DRY_RUN.hellaswag_rows


def test_a_step_after_the_checks_time_is_up_is_skipped(tmp_path):
    work = gpu_check.Work(tmp_path, gpu_check.DRY_RUN, hellaswag="")
    with open(tmp_path / "log", "w") as log:
        result = gpu_check.check(gpu_check.STEPS[0], work, passed=set(), log=log, seconds_left=5)
    assert result.status == "skipped: the check's time is up"
