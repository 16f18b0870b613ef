"""Runs that die lose no work: RESUME=auto, SIGTERM and Ctrl-C save and exit, torchrun restarts a
killed group that then continues, a full disk stops with one line, and the compiled path works."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from test_parallel import STEPS, TORCHRUN, evaluations, losses
from test_train import ROOT, read_metrics, run_train, subprocess_env


SLOW = dict(MAX_STEPS=12, CHECKPOINT_INTERVAL=1000, TOTAL_BATCH_SIZE=1024)  # updates long enough to signal into


def start(command, env):
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, what, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def rows_written(log_dir, count):
    path = log_dir / "metrics.csv"
    return lambda: path.is_file() and path.read_text().count("\n") > count


def final_weights(path):
    return checkpoint.load(str(path))["model"]


def assert_same_weights(a, b, tolerance=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=tolerance), name


# ---- RESUME=auto -------------------------------------------------------------------------------

def test_resume_auto_starts_fresh_continues_and_knows_when_it_is_done(token_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, token_dataset, tmp_path / "whole")
    log_dir = tmp_path / "auto"
    run_train(monkeypatch, token_dataset, log_dir, RESUME="auto")
    assert "RESUME=auto: no checkpoint in" in capsys.readouterr().out
    checkpoint.delete(str(log_dir / "model_00005.pt"))  # as if stopped after update 2's checkpoint
    run_train(monkeypatch, token_dataset, log_dir, RESUME="auto")
    assert f"resuming from {log_dir / 'model_00002.pt'}: continuing at step 3" in capsys.readouterr().out
    assert losses(log_dir) == losses(tmp_path / "whole")
    with pytest.raises(SystemExit) as exit_info:  # launched once more: nothing left, and no error
        run_train(monkeypatch, token_dataset, log_dir, RESUME="auto")
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"RESUME=auto: {log_dir / 'model_00005.pt'} already holds the last update (5): nothing to train"
    assert err == ""


# ---- SIGTERM and Ctrl-C ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(token_dataset, tmp_path_factory):
    """12 updates of 8 micro-batches in one process, the run the interrupted ones must reproduce."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        run_train(mp, token_dataset, log_dir, **SLOW)
    return log_dir


def test_sigterm_twice_saves_once_exits_143_and_resumes_to_the_same_weights(token_dataset, uninterrupted, tmp_path,
                                                                           monkeypatch, capsys):
    process = start([sys.executable, "train.py"], subprocess_env(token_dataset, tmp_path, **SLOW))
    wait_for(rows_written(tmp_path, 3), process, "three updates")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # two signals at once would reach Python's handler as one
    process.send_signal(signal.SIGTERM)  # launchers may deliver it twice: ignored
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    saved = checkpoint.list_checkpoints(str(tmp_path))
    assert len(saved) == 1 and 3 <= saved[0][0] < 11
    assert out.strip().splitlines()[-1] == f"interrupted: saved checkpoint {saved[0][1]}; continue with RESUME=1"
    run_train(monkeypatch, token_dataset, tmp_path, **SLOW, RESUME=1)
    assert losses(tmp_path) == losses(uninterrupted)
    assert_same_weights(final_weights(tmp_path / "model_00011.pt"), final_weights(uninterrupted / "model_00011.pt"))


def test_ctrl_c_saves_and_exits_130_and_a_second_one_stops_at_once(token_dataset, tmp_path):
    env = subprocess_env(token_dataset, tmp_path / "once", **SLOW)
    process = start([sys.executable, "train.py"], env)
    wait_for(rows_written(tmp_path / "once", 3), process, "three updates")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted: saved checkpoint" in out, err[-2000:]
    assert len(checkpoint.list_checkpoints(str(tmp_path / "once"))) == 1

    # longer updates (16 micro-batches), so that the second Ctrl-C comes while the first waits for one to end
    env = subprocess_env(token_dataset, tmp_path / "twice", **{**SLOW, "TOTAL_BATCH_SIZE": 8192})
    process = start([sys.executable, "train.py"], env)
    wait_for(rows_written(tmp_path / "twice", 1), process, "an update")
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals at once would reach Python's handler as one
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().endswith("Interrupted.") and "interrupted: saved" not in out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sigterm_under_torchrun_saves_and_resumes_to_the_same_weights(runs, token_dataset, hellaswag_rows, tmp_path,
                                                                     parallel):
    """torchrun forwards SIGTERM to every worker; they agree on the update to stop after and save."""
    env = subprocess_env(token_dataset, tmp_path, **{**STEPS, "HELLASWAG_PATH": hellaswag_rows, "PARALLEL": parallel})
    process = start(TORCHRUN, env)
    wait_for(rows_written(tmp_path, 1), process, "the first update")  # early: 20 updates go fast
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "interrupted: saved checkpoint" in out, (out[-2000:], err[-2000:])
    stopped_after = checkpoint.list_checkpoints(str(tmp_path))[-1][0]
    assert 0 <= stopped_after < 19  # the signal may land before the first update's stop check
    result = subprocess.run(TORCHRUN, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "RESUME": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(tmp_path) == losses(runs[parallel])
    assert evaluations(tmp_path) == evaluations(runs[parallel])  # validation and HellaSwag too
    final = checkpoint.list_checkpoints(str(tmp_path))[-1][1]
    assert_same_weights(final_weights(final), final_weights(checkpoint.latest_checkpoint(str(runs[parallel]))))


# ---- elastic restarts --------------------------------------------------------------------------

def test_torchrun_restarts_a_killed_group_twice_and_the_run_completes(runs, token_dataset, hellaswag_rows, tmp_path):
    env = subprocess_env(token_dataset, tmp_path, **{**STEPS, "HELLASWAG_PATH": hellaswag_rows, "RESUME": "auto",
                                                     "CHECKPOINT_INTERVAL": 5})
    process = start(TORCHRUN[:-1] + ["--max-restarts=3", "train.py"], env)
    for kill_after in (4, 9):  # each time: SIGKILL one worker once this checkpoint exists
        wait_for(lambda: os.path.exists(checkpoint.checkpoint_path(tmp_path, kill_after)), process,
                 f"checkpoint {kill_after}")
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert out.count("resuming from") == 2
    assert_same_weights(final_weights(tmp_path / "model_00019.pt"), final_weights(runs["ddp"] / "model_00019.pt"))
    assert losses(tmp_path) == losses(runs["ddp"])


# ---- a full disk -------------------------------------------------------------------------------

def limit_file_size(size):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(token_dataset, tmp_path, monkeypatch, parallel):
    run_train(monkeypatch, token_dataset, tmp_path, PARALLEL=parallel)  # checkpoints after updates 2 and 5
    checkpoint.delete(checkpoint.latest_checkpoint(str(tmp_path)))
    earlier = checkpoint.latest_checkpoint(str(tmp_path))
    before = {name: tensor.clone() for name, tensor in final_weights(earlier).items()}
    env = subprocess_env(token_dataset, tmp_path, PARALLEL=parallel, RESUME=1)
    result = subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, preexec_fn=limit_file_size(1_000_000))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("Error: cannot write checkpoint model_00005.")
    assert f"in LOG_DIR {tmp_path}: " in error[0]
    # a .pt write keeps the OS's own error; inside DCP torch.save loses it, and the file size limit is named
    cause = "[Errno 27] File too large" if parallel == "ddp" else "File too large (the file size limit, ulimit -f"
    assert cause in error[0]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", os.path.basename(earlier)]  # no temporary left
    assert_same_weights(final_weights(earlier), before)
    assert [row["step"] for row in read_metrics(tmp_path)] == [str(step) for step in range(6)]


def test_a_metrics_row_that_cannot_be_written_is_cut_off(token_dataset, tmp_path):
    env = subprocess_env(token_dataset, tmp_path, MAX_STEPS=200, CHECKPOINT_INTERVAL=1000)
    result = subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, preexec_fn=limit_file_size(1000))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"Error: cannot write {tmp_path / 'metrics.csv'} in LOG_DIR")
    text = (tmp_path / "metrics.csv").read_text()
    assert text.endswith("\n")
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [str(step) for step in range(len(rows))] and len(rows) > 3


# ---- the compiled path -------------------------------------------------------------------------

def test_compiled_training_evaluates_samples_saves_and_resumes_with_activation_checkpointing(token_dataset, tmp_path,
                                                                                            monkeypatch, capsys):
    """The compiled path end to end; resumed with ACTIVATION_CHECKPOINTING=1, which neither changes the
    checkpoint's names nor, over 8 updates, the losses."""
    settings = dict(COMPILE=1, MAX_STEPS=10, EVAL_INTERVAL=5, SAMPLE_INTERVAL=5, CHECKPOINT_INTERVAL=2)
    run_train(monkeypatch, token_dataset, tmp_path / "whole", **settings)
    out = capsys.readouterr().out
    assert "  COMPILE: 1 (using on)" in out and out.count("validation loss") == 3 and "rank 0 sample 0:" in out
    run_train(monkeypatch, token_dataset, tmp_path / "resumed", **settings, ACTIVATION_CHECKPOINTING=1,
              RESUME=tmp_path / "whole" / "model_00001.pt")
    for (step, loss, norm), (step_whole, loss_whole, norm_whole) in zip(losses(tmp_path / "resumed"),
                                                                        losses(tmp_path / "whole", first=2), strict=True):
        assert step == step_whole and loss == pytest.approx(loss_whole, abs=1e-6) and norm == pytest.approx(norm_whole, abs=1e-6)
    assert final_weights(tmp_path / "resumed" / "model_00009.pt").keys() == final_weights(
        tmp_path / "whole" / "model_00009.pt").keys()
