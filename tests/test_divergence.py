"""A run that diverges stops on every rank with one line naming the checkpoint to continue from, and
never writes weights that are not finite; float16 trains through its loss scaler and the chunked
loss, and a scaler that keeps skipping is a collapse."""

import re
import subprocess

import pytest
import torch

import checkpoint
import train
from test_parallel import STEPS, TORCHRUN
from test_train import ROOT, read_metrics, run_train, subprocess_env

HUGE_LR = dict(MAX_LR="1e6", MAX_STEPS=40, CHECKPOINT_INTERVAL=1, KEEP_CHECKPOINTS=2, EVAL_INTERVAL=1000)


def assert_every_checkpoint_finite(log_dir):
    saved = checkpoint.list_checkpoints(str(log_dir))
    for _, path in saved:
        model, _ = checkpoint.load_model(path)  # checks every weight
        assert all(torch.isfinite(p).all() for p in model.parameters()), path
    return [path for _, path in saved]


def diverged_line(err):
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("Error: training diverged ")
    return lines[0]


def test_a_diverging_resume_stops_and_names_the_newest_finite_checkpoint(token_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    run_train(monkeypatch, token_dataset, tmp_path, MAX_STEPS=4, CHECKPOINT_INTERVAL=2)  # healthy: 1 and 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_train(monkeypatch, token_dataset, tmp_path, RESUME=1, **HUGE_LR)
    assert exit_info.value.code == 1
    line = diverged_line(capsys.readouterr().err)
    saved = assert_every_checkpoint_finite(tmp_path)
    assert f"The newest checkpoint with finite weights is {saved[-1]}: continue from it with RESUME=1" in line
    assert "and a lower MAX_LR than 1e+06" in line
    stopped = int(read_metrics(tmp_path)[-1]["step"])
    assert stopped < 39  # long before MAX_STEPS


@pytest.mark.parametrize("parallel, healthy", [("ddp", "model_00009.pt"), ("fsdp", "model_00009.dcp")])
def test_a_diverging_torchrun_stops_every_rank_with_one_line(runs, token_dataset, tmp_path, parallel, healthy):
    env = subprocess_env(token_dataset, tmp_path, **{**STEPS, **HUGE_LR, "PARALLEL": parallel, "HELLASWAG_LIMIT": -1,
                                                     "SAMPLE_INTERVAL": 1000, "RESUME": runs[parallel] / healthy})
    result = subprocess.run(TORCHRUN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    line = diverged_line(result.stderr)  # rank 0 speaks; rank 1 exits quietly
    assert result.stderr.count("exitcode  : 1 ") == 2  # both ranks exit 1: neither is killed by torchrun's SIGTERM
    saved = assert_every_checkpoint_finite(tmp_path)
    named = re.search(r"The newest checkpoint with finite weights is (\S+): continue from it with (RESUME=\S+)", line)
    if saved:  # the run's own newest, in its LOG_DIR
        assert named.groups() == (saved[-1], "RESUME=1")
    else:  # the one it resumed from, elsewhere
        assert named.groups() == (str(runs[parallel] / healthy), f"RESUME={runs[parallel] / healthy}")
    checkpoint.load_model(named[1])


def test_a_validation_loss_of_nan_stops_the_run(token_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "validation_loss", lambda *args: float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        run_train(monkeypatch, token_dataset, tmp_path)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "Error: training diverged before update 0: the validation loss is nan. No checkpoint with finite "
        "weights was saved: start again with a lower MAX_LR than 0.003")
    assert checkpoint.list_checkpoints(str(tmp_path)) == []


def test_float16_learns_through_the_loss_scaler(demo_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, str(demo_dataset), tmp_path, DTYPE="float16", MAX_STEPS=15, WARMUP_STEPS=15,
              MAX_LR="1e-2", EVAL_INTERVAL=14, CHECKPOINT_INTERVAL=1000, TOTAL_BATCH_SIZE=256, BATCH_SIZE=4)
    assert "  DTYPE: float16 (using float16)" in capsys.readouterr().out
    rows = read_metrics(tmp_path)
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 1.5
    state = checkpoint.load(str(tmp_path / "model_00014.pt"))
    assert state["optimizer"]["grad_scaler"]["scale"] > 0  # the loss scale is saved for RESUME


def test_a_float16_loss_scaler_that_keeps_skipping_is_a_collapse(token_dataset, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(monkeypatch, token_dataset, tmp_path, DTYPE="float16", MAX_LR="1e6", MAX_STEPS=200,
                  CHECKPOINT_INTERVAL=1000, EVAL_INTERVAL=1000, TOTAL_BATCH_SIZE=64)
    assert exit_info.value.code == 1
    line = diverged_line(capsys.readouterr().err)
    assert "the float16 loss scaler has skipped 51 updates in a row" in line
    assert "No checkpoint with finite weights was saved" in line
    skipped = [r for r in read_metrics(tmp_path) if r["norm"] in ("nan", "inf")]
    assert len(skipped) >= 50  # the 51st row is not written: the run stopped first
