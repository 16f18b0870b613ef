"""train.py end to end on a tiny model: learning, logs, metrics, checkpoints, resume, DDP, SIGKILL.

Most runs call train.main() in-process (a subprocess costs seconds of start-up here); only the
torchrun and SIGKILL tests need real processes.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import device
import metrics
import plot_metrics
import shards
import train
from model import GPT
from settings import GPTConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# every variable train.py reads, cleared before each run so the caller's shell cannot leak in
TRAIN_VARIABLES = [
    "BLOCK_SIZE", "VOCAB_SIZE", "N_LAYER", "N_HEAD", "N_EMBD", "DROPOUT", "TOTAL_BATCH_SIZE", "BATCH_SIZE",
    "SEQ_LENGTH", "MAX_LR", "MIN_LR", "WARMUP_STEPS", "MAX_STEPS", "WEIGHT_DECAY", "DATASET_PATH", "LOG_DIR",
    "EVAL_INTERVAL", "VAL_STEPS", "HELLASWAG_LIMIT", "SAMPLE_INTERVAL", "CHECKPOINT_INTERVAL",
    "KEEP_CHECKPOINTS", "SEED", "DEVICE", "DTYPE", "COMPILE", "RESUME", "FORCE", "PEAK_TFLOPS", "INIT_FROM", "PARALLEL",
    "OPTIMIZER", "ACTIVATION_CHECKPOINTING", "TRACKER", "WANDB_PROJECT",
    "RANK", "LOCAL_RANK", "WORLD_SIZE",
]
TINY = dict(
    N_LAYER="2", N_HEAD="2", N_EMBD="32", BLOCK_SIZE="64", VOCAB_SIZE="50304", BATCH_SIZE="2",
    SEQ_LENGTH="32", TOTAL_BATCH_SIZE="128", MAX_STEPS="6", WARMUP_STEPS="2", MAX_LR="3e-3",
    MIN_LR="3e-4", EVAL_INTERVAL="3", VAL_STEPS="2", SAMPLE_INTERVAL="1000", CHECKPOINT_INTERVAL="3",
    KEEP_CHECKPOINTS="0", HELLASWAG_LIMIT="-1", COMPILE="0", DTYPE="float32", DEVICE="cpu",
)
CHECKPOINT_KEYS = {"model", "optimizer", "config", "train_config", "step", "val_loss", "loader", "rng"}


def set_env(mp, dataset, log_dir, **overrides):
    for name in TRAIN_VARIABLES:
        mp.delenv(name, raising=False)
    for name, value in {**TINY, "DATASET_PATH": dataset, "LOG_DIR": str(log_dir), **overrides}.items():
        if value is not None:
            mp.setenv(name, str(value))


def run_train(mp, dataset, log_dir, **overrides):
    set_env(mp, dataset, log_dir, **overrides)
    train.main()


def read_metrics(log_dir):
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def deterministic_columns(rows):
    """What a resumed run must reproduce exactly (timings naturally differ)."""
    return [(r["step"], r["loss"], r["val_loss"], r["lr"], r["norm"]) for r in rows]


@pytest.fixture(scope="module")
def reference_run(token_dataset, tmp_path_factory):
    """6 updates with dropout (so the random state matters), checkpoints after updates 2 and 5."""
    log_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        run_train(mp, token_dataset, log_dir, DROPOUT="0.1")
    return log_dir


# ---- learning, log lines, metrics ------------------------------------------------------------

def test_loss_goes_down_with_the_original_log_lines(demo_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, str(demo_dataset), tmp_path, MAX_STEPS=15, WARMUP_STEPS=15, MAX_LR="1e-2", EVAL_INTERVAL=10,
              SAMPLE_INTERVAL=10, CHECKPOINT_INTERVAL=1000, TOTAL_BATCH_SIZE=256, BATCH_SIZE=4, PEAK_TFLOPS=1)
    out, err = capsys.readouterr()
    for line in ("Configuration from environment:", "  N_EMBD: 32", "  DEVICE: cpu (using cpu)",
                 "  DTYPE: float32 (using float32)", "  COMPILE: 0 (using off)", "total desired batch size: 256",
                 "=> calculated gradient accumulation steps: 2", "found 13 shards for split train",
                 "found 1 shards for split val", "step     0 | loss: ", "validation loss: ",
                 "rank 0 sample 0: Hello, I'm a language model,", "rank 0 sample 3: "):
        assert line in out
    assert "Warning: WARMUP_STEPS (15) >= MAX_STEPS (15)" in err  # a warning, not an error
    assert out.index("validation loss") < out.index("step     0 |")  # step 0 evaluates the untrained model
    assert out.count("rank 0 sample 0:") == 2  # at step 10 and after the last step, never at step 0
    assert "| mfu: " in out and re.search(r"\| peak mem: \d+MiB\n", out)  # the process's peak RSS on a CPU

    rows = read_metrics(tmp_path)
    assert list(rows[0]) == metrics.COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(15))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5
    measured = [int(r["step"]) for r in rows if r["val_loss"]]
    assert measured == [0, 10, 14]  # step 0, every EVAL_INTERVAL, and the final weights on the last row
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 1.5
    assert all(r["hellaswag_acc"] == "" for r in rows)
    assert all(0 < float(r["mfu"]) for r in rows)  # PEAK_TFLOPS makes MFU known even on the CPU
    assert all(100 < int(r["peak_mem_mib"]) < 10_000 for r in rows)
    assert [name for _, name in checkpoint.list_checkpoints(str(tmp_path))] == [str(tmp_path / "model_00014.pt")]


def test_cosine_schedule():
    cfg = TrainConfig(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert train.get_lr(0, cfg) == pytest.approx(0.1)
    assert train.get_lr(9, cfg) == pytest.approx(1.0)
    assert train.get_lr(60, cfg) == pytest.approx(0.55)
    assert train.get_lr(110, cfg) == pytest.approx(0.1)


# ---- bad settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, variable", [
    (dict(N_LAYER="abc"), "N_LAYER"),
    (dict(N_EMBD="30", N_HEAD="4"), "N_EMBD"),
    (dict(MAX_STEPS="-5"), "MAX_STEPS"),
    (dict(BATCH_SIZE="0"), "BATCH_SIZE"),
    (dict(MAX_LR="fast"), "MAX_LR"),
    (dict(WEIGHT_DECAY="-0.1"), "WEIGHT_DECAY"),
    (dict(WARMUP_STEPS="1.5"), "WARMUP_STEPS"),
    (dict(HELLASWAG_LIMIT="-2"), "HELLASWAG_LIMIT"),
    (dict(KEEP_CHECKPOINTS="-1"), "KEEP_CHECKPOINTS"),
    (dict(SEQ_LENGTH="128"), "SEQ_LENGTH"),
    (dict(TOTAL_BATCH_SIZE="100"), "TOTAL_BATCH_SIZE"),
    (dict(MIN_LR="0.1", MAX_LR="0.01"), "MIN_LR"),
    (dict(DEVICE="tpu"), "DEVICE"),
    (dict(DTYPE="float8"), "DTYPE"),
    (dict(COMPILE="maybe"), "COMPILE"),
    (dict(FORCE="perhaps"), "FORCE"),
    (dict(PEAK_TFLOPS="-1"), "PEAK_TFLOPS"),
    (dict(VOCAB_SIZE="1000"), "VOCAB_SIZE"),
    (dict(INIT_FROM="gpt5"), "INIT_FROM"),
    (dict(PARALLEL="zero3"), "PARALLEL"),
    (dict(PARALLEL="fsdp", DTYPE="float16"), "PARALLEL=fsdp"),
    (dict(OPTIMIZER="sgd"), "OPTIMIZER"),
    (dict(OPTIMIZER="muon", PARALLEL="fsdp"), "OPTIMIZER=muon runs with PARALLEL=ddp, not fsdp"),
    (dict(DATASET_PATH="/nonexistent/dataset"), "dataset.py"),
    (dict(RESUME="1"), "RESUME"),
    (dict(RESUME="/nonexistent/model_00001.pt"), "/nonexistent/model_00001.pt"),
])
def test_bad_settings_stop_with_one_line(token_dataset, tmp_path, monkeypatch, capsys, overrides, variable):
    log_dir = tmp_path / "log"
    with pytest.raises(SystemExit) as exit_info:
        run_train(monkeypatch, token_dataset, log_dir, **overrides)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and variable in err
    assert not log_dir.exists()  # stopped before any work


# ---- checkpoints and resume ------------------------------------------------------------------

def test_checkpoint_contents(reference_run):
    assert [step for step, _ in checkpoint.list_checkpoints(str(reference_run))] == [2, 5]
    state = torch.load(reference_run / "model_00005.pt", weights_only=True)  # plain values only
    assert set(state) == CHECKPOINT_KEYS
    assert state["step"] == 5 and isinstance(state["loader"], int)
    assert state["config"] == dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    assert state["train_config"]["max_steps"] == 6 and state["train_config"]["init_from"] == "scratch"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    assert state["val_loss"] == float(read_metrics(reference_run)[-1]["val_loss"])
    assert isinstance(state["rng"]["cpu"], torch.Tensor)
    model, _ = checkpoint.load_model(str(reference_run / "model_00005.pt"))
    assert model.config.n_embd == 32


def test_loader_position_is_saved(reference_run, token_dataset):
    """After 6 updates of 128 tokens the loader stands 768 tokens into the train stream."""
    state = checkpoint.load(str(reference_run / "model_00005.pt"))
    loader = shards.TokenLoader(token_dataset, "train", 2, 32, verbose=False)
    assert state["loader"] == 6 * 128 % loader.total


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(reference_run, token_dataset, tmp_path, monkeypatch,
                                                             capsys):
    run_train(monkeypatch, token_dataset, tmp_path, DROPOUT="0.1", RESUME=reference_run / "model_00002.pt")
    assert "continuing at step 3" in capsys.readouterr().out
    expected = read_metrics(reference_run)
    resumed = read_metrics(tmp_path)
    assert list(resumed[0]) == metrics.COLUMNS  # a new metrics.csv in a new LOG_DIR
    assert deterministic_columns(resumed) == deterministic_columns(expected[3:])
    a = checkpoint.load(str(reference_run / "model_00005.pt"))
    b = checkpoint.load(str(tmp_path / "model_00005.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_resume_in_place_drops_metrics_rows_after_the_checkpoint(reference_run, token_dataset, tmp_path, monkeypatch,
                                                                 capsys):
    # as if killed after update 5 but before its checkpoint: metrics.csv is ahead of model_00002.pt
    shutil.copy(reference_run / "model_00002.pt", tmp_path)
    shutil.copy(reference_run / "metrics.csv", tmp_path)
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("6,1.0,,,0.1,1.0,1.0")  # a torn last line
    run_train(monkeypatch, token_dataset, tmp_path, DROPOUT="0.1", RESUME="1", MAX_STEPS=6)
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'model_00002.pt'}: continuing at step 3" in out
    assert deterministic_columns(read_metrics(tmp_path)) == deterministic_columns(read_metrics(reference_run))


def test_resume_prints_changed_training_variables(reference_run, token_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, token_dataset, tmp_path, RESUME=reference_run / "model_00005.pt", MAX_STEPS=7,
              MAX_LR="2e-3", INIT_FROM="gpt2")
    out = capsys.readouterr().out
    assert "MAX_STEPS 6 -> 7" in out and "MAX_LR 0.003 -> 0.002" in out
    assert "ignoring INIT_FROM=gpt2" in out  # RESUME wins
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == [6]


@pytest.mark.parametrize("overrides, message", [
    (dict(N_LAYER="3"), "N_LAYER=3 disagrees with the checkpoint"),
    (dict(VOCAB_SIZE="50257"), "VOCAB_SIZE=50257 disagrees"),
    (dict(MAX_STEPS="6"), "nothing to train"),
    (dict(OPTIMIZER="muon", MAX_STEPS="7"), "OPTIMIZER=muon disagrees with the checkpoint"),
])
def test_resume_errors(reference_run, token_dataset, tmp_path, monkeypatch, capsys, overrides, message):
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path / "log", RESUME=reference_run / "model_00005.pt", **overrides)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_checkpoint_that_names_no_optimizer_was_trained_with_adamw(reference_run, token_dataset, tmp_path,
                                                                     monkeypatch, capsys):
    state = checkpoint.load(str(reference_run / "model_00005.pt"))
    del state["train_config"]["optimizer"]  # as checkpoints written before OPTIMIZER existed
    older = tmp_path / "model_00005.pt"
    checkpoint.save(state, str(older))
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path / "muon", RESUME=older, MAX_STEPS=7, OPTIMIZER="muon")
    assert "trained with adamw" in capsys.readouterr().err
    run_train(monkeypatch, token_dataset, tmp_path / "adamw", RESUME=older, MAX_STEPS=7)
    assert "  OPTIMIZER: adamw (from checkpoint)\n" in capsys.readouterr().out


# ---- Muon ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def muon_run(token_dataset, tmp_path_factory):
    """reference_run's 6 updates with OPTIMIZER=muon."""
    log_dir = tmp_path_factory.mktemp("muon")
    with pytest.MonkeyPatch.context() as mp:
        run_train(mp, token_dataset, log_dir, DROPOUT="0.1", OPTIMIZER="muon")
    return log_dir


def test_muon_lowers_the_loss_on_the_demo_corpus(demo_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, str(demo_dataset), tmp_path, OPTIMIZER="muon", MAX_STEPS=15, WARMUP_STEPS=2,
              MAX_LR="1e-2", MIN_LR="1e-3", EVAL_INTERVAL=1000, CHECKPOINT_INTERVAL=1, KEEP_CHECKPOINTS=2,
              TOTAL_BATCH_SIZE=256, BATCH_SIZE=4)
    out = capsys.readouterr().out
    assert "  OPTIMIZER: muon\n" in out and "num Muon parameter tensors: 8, with 24,576 parameters" in out
    rows = read_metrics(tmp_path)
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 1.5
    # Muon made the last update of each block matrix: weight decay, then an about orthogonal step of
    # match_rms_adamw's size (singular values none above 1.5, the median ~0.85; AdamW's reach ~5-12)
    before, after = (checkpoint.load(str(tmp_path / f"model_{step:05d}.pt"))["model"] for step in (13, 14))
    lr = float(rows[14]["lr"])
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        w0, w1 = before[name], after[name]
        step = (w0 * (1 - lr * 0.1) - w1) / (lr * 0.2 * math.sqrt(max(w0.shape)))
        singular_values = torch.linalg.svdvals(step)
        assert singular_values.max() < 1.5 and singular_values.median() > 0.5, singular_values


def test_an_fp16_overflow_in_one_optimizer_skips_the_whole_update(token_dataset):
    runtime = device.Runtime(device="cpu", dtype=torch.float16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    optimizers = model.configure_optimizers(0.1, 1e-3, "cpu", verbose=False, optimizer="muon")
    scaler = train.grad_scaler(runtime)
    scale, before = scaler.get_scale(), {k: v.clone() for k, v in model.state_dict().items()}
    # only Muon's gradients overflow; AdamW's own are finite and must not be stepped either
    model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    train.train_step(model, optimizers, scaler, shards.TokenLoader(token_dataset, "train", 2, 32, verbose=False),
                     runtime, 1, 1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == scale / 2


def test_muon_checkpoints_keep_its_state_beside_adamws(muon_run):
    state = torch.load(muon_run / "model_00005.pt", weights_only=True)
    assert set(state) == CHECKPOINT_KEYS | {"muon"} and state["train_config"]["optimizer"] == "muon"
    # Muon's momentum, one per block matrix in model order; AdamW's state for the other 2 + 18 tensors
    matrices = [state["model"][f"transformer.h.{i}.{m}.weight"] for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [s["momentum_buffer"].shape for s in state["muon"]["state"].values()] == [m.shape for m in matrices]
    assert len(state["optimizer"]["state"]) == 20


def test_muon_resume_reproduces_the_uninterrupted_run_bit_for_bit(muon_run, token_dataset, tmp_path, monkeypatch,
                                                                  capsys):
    run_train(monkeypatch, token_dataset, tmp_path, DROPOUT="0.1", RESUME=muon_run / "model_00002.pt")
    assert "  OPTIMIZER: muon (from checkpoint)\n" in capsys.readouterr().out  # with OPTIMIZER unset
    assert deterministic_columns(read_metrics(tmp_path)) == deterministic_columns(read_metrics(muon_run)[3:])
    a = checkpoint.load(str(muon_run / "model_00005.pt"))
    b = checkpoint.load(str(tmp_path / "model_00005.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["muon"]["state"][i]["momentum_buffer"], b["muon"]["state"][i]["momentum_buffer"])
               for i in a["muon"]["state"])


def test_muon_resume_with_an_explicit_other_optimizer_stops(muon_run, token_dataset, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path, RESUME=muon_run / "model_00005.pt", MAX_STEPS=7,
                  OPTIMIZER="adamw")
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"Error: OPTIMIZER=adamw disagrees with the checkpoint {muon_run / 'model_00005.pt'}, "
                                "trained with muon: unset OPTIMIZER (a resumed run keeps its optimizer), "
                                "or start a new run"]
    assert not tmp_path.joinpath("metrics.csv").exists()


@pytest.mark.parametrize("change, overrides, message", [
    (lambda state: state["train_config"].update(optimizer="sgd"), {}, "records an optimizer this train.py does not know"),
    (lambda state: state.pop("muon"), {}, "trained with Muon but holds no 'muon' entry"),
    (lambda state: None, dict(PARALLEL="fsdp"), "OPTIMIZER=muon (the optimizer of"),
])
def test_muon_checkpoint_errors(muon_run, token_dataset, tmp_path, monkeypatch, capsys, change, overrides, message):
    state = checkpoint.load(str(muon_run / "model_00005.pt"))
    change(state)
    path = tmp_path / "model_00005.pt"
    checkpoint.save(state, str(path))
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path / "log", RESUME=path, MAX_STEPS=7, **overrides)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and message in err


def test_fresh_run_refuses_a_log_dir_with_checkpoints(reference_run, token_dataset, tmp_path, monkeypatch, capsys):
    shutil.copy(reference_run / "model_00005.pt", tmp_path)
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path)
    err = capsys.readouterr().err
    assert "RESUME=1" in err and "FORCE=1" in err and "LOG_DIR" in err
    assert (tmp_path / "model_00005.pt").exists()
    # an explicit FORCE=1 starts over: the old run's checkpoints go, the new run's come
    run_train(monkeypatch, token_dataset, tmp_path, FORCE="1", MAX_STEPS=2, CHECKPOINT_INTERVAL=1)
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [0, 1]


def test_pruning_keeps_the_newest_and_never_touches_other_files(token_dataset, tmp_path, monkeypatch):
    others = ["notes.txt", "model_best.pt", "model_00001.pt.bak", "eval_results.pt", "model_1.pt"]
    for name in others:
        (tmp_path / name).write_text("not a checkpoint of this run")
    (tmp_path / "model_00001.pt.tmp4242").write_text("half-written by a killed run")
    run_train(monkeypatch, token_dataset, tmp_path, MAX_STEPS=5, CHECKPOINT_INTERVAL=1, KEEP_CHECKPOINTS=2)
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["metrics.csv", "model_00003.pt", "model_00004.pt"])


# ---- the data loader -------------------------------------------------------------------------

def test_loader_reads_across_shards_and_wraps(token_dataset):
    stream = np.concatenate([np.load(p) for p in shards.shard_paths(token_dataset, "train")]).astype(np.int64)
    loader = shards.TokenLoader(token_dataset, "train", 4, 64, verbose=False)
    start = loader.ends[0] - 100  # the next batch straddles the first shard boundary
    loader.position = start
    x, y = loader.next_batch()
    assert x.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.from_numpy(stream[start:start + 256]))
    assert torch.equal(y.flatten(), torch.from_numpy(stream[start + 1:start + 257]))
    loader.position = len(stream) - 10  # ... and this one the end of the stream
    x, _ = loader.next_batch()
    assert torch.equal(x.flatten(), torch.from_numpy(np.concatenate([stream[-10:], stream[:246]])))
    assert loader.position == 246


def test_loader_ranks_stride_and_positions_carry_across_world_sizes(token_dataset):
    def loaders(world_size):
        return [shards.TokenLoader(token_dataset, "train", 2, 32, rank, world_size, verbose=False)
                for rank in range(world_size)]

    single, = loaders(1)
    reference = [single.next_batch()[0] for _ in range(12)]
    pair = loaders(2)
    for group in range(3):  # rank r takes micro-batch r of every group of two
        for rank, loader in enumerate(pair):
            assert torch.equal(loader.next_batch()[0], reference[2 * group + rank])
    # the saved global position continues the same stream under three ranks, then one
    trio = loaders(3)
    for loader in trio:
        loader.position = pair[0].position
    assert all(torch.equal(trio[r].next_batch()[0], reference[6 + r]) for r in range(3))
    single.position = trio[0].position
    assert all(torch.equal(single.next_batch()[0], reference[9 + i]) for i in range(3))


# ---- processes: torchrun and SIGKILL ---------------------------------------------------------

def subprocess_env(dataset, log_dir, **overrides):
    env = {k: v for k, v in os.environ.items() if k not in TRAIN_VARIABLES}
    env.update({**TINY, "DATASET_PATH": dataset, "LOG_DIR": str(log_dir), "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# Muon's Newton-Schulz amplifies the gradients' reduction-order noise: in float32 (and with bf16
# Newton-Schulz) the gap here stays near 1e-5; bf16 autocast on a GPU may reach 1e-3
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_torchrun_matches_one_process(token_dataset, tmp_path, monkeypatch, optimizer):
    settings = dict(MAX_STEPS=5, TOTAL_BATCH_SIZE=256, EVAL_INTERVAL=1000, CHECKPOINT_INTERVAL=1000,
                    OPTIMIZER=optimizer)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(token_dataset, tmp_path / "ddp", **settings),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=> calculated gradient accumulation steps: 2" in result.stdout
    assert result.stdout.count("Configuration from environment:") == 1  # rank 0 logs
    assert ("num Muon parameter tensors" in result.stdout) == (optimizer == "muon")
    # VAL_STEPS counts batches per rank: 2 ranks x 2 batches are the single process's 4
    run_train(monkeypatch, token_dataset, tmp_path / "single", **settings, VAL_STEPS=4)
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert len(ddp) == 5
    for a, b in zip(ddp, single):
        for column in ("loss", "norm"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4)
    assert float(ddp[-1]["val_loss"]) == pytest.approx(float(single[-1]["val_loss"]), abs=1e-4)


def test_sigkill_mid_run_then_resume(token_dataset, tmp_path, monkeypatch, capsys):
    env = subprocess_env(token_dataset, tmp_path, MAX_STEPS=10_000, CHECKPOINT_INTERVAL=3, KEEP_CHECKPOINTS=2,
                         EVAL_INTERVAL=1000)
    process = subprocess.Popen([sys.executable, "train.py"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while len(checkpoint.list_checkpoints(str(tmp_path))) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the middle of a later update (or checkpoint)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    saved = checkpoint.list_checkpoints(str(tmp_path))
    for _, path in saved:  # every checkpoint that exists is complete
        checkpoint.require_training_state(checkpoint.load(path), path)
    last = saved[-1][0]
    rows_before = read_metrics(tmp_path)
    assert int(rows_before[-1]["step"]) >= last

    run_train(monkeypatch, token_dataset, tmp_path, RESUME="1", MAX_STEPS=last + 3, CHECKPOINT_INTERVAL=3,
              KEEP_CHECKPOINTS=2, EVAL_INTERVAL=1000)
    assert f"continuing at step {last + 1}" in capsys.readouterr().out
    rows = read_metrics(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(last + 3))
    assert deterministic_columns(rows[:last + 1]) == deterministic_columns(rows_before[:last + 1])
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith(f"model_{last + 2:05d}.pt")


# ---- INIT_FROM (fine-tuning from a Hugging Face GPT-2) -----------------------------------------

@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_gpt2")
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=50257)).save_pretrained(path)
    return path


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # under FSDP rank 0 loads the weights and hands them out
def test_init_from_a_local_gpt2_directory(hf_directory, token_dataset, tmp_path, monkeypatch, capsys, parallel):
    from transformers import GPT2LMHeadModel

    run_train(monkeypatch, token_dataset, tmp_path, INIT_FROM=hf_directory, MAX_STEPS=2, VOCAB_SIZE=None,
              N_LAYER=None, N_HEAD=None, N_EMBD=None, BLOCK_SIZE=None, DROPOUT="0.1", PARALLEL=parallel)
    out = capsys.readouterr().out
    assert f"  VOCAB_SIZE: 50257 (from {hf_directory})" in out and f"fine-tuning from {hf_directory}" in out
    state = checkpoint.load(checkpoint.latest_checkpoint(str(tmp_path)))
    assert state["config"] == dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    assert state["train_config"]["init_from"] == str(hf_directory)
    # the untrained step-0 validation loss is the Hugging Face model's own loss on those batches
    model = train.GPT.from_hf(GPT2LMHeadModel.from_pretrained(hf_directory)).eval()
    loader = shards.TokenLoader(token_dataset, "val", 2, 32, verbose=False)
    runtime = train.device.setup("cpu", "float32")
    expected = train.validation_loss(model, loader, runtime, 2)
    assert float(read_metrics(tmp_path)[0]["val_loss"]) == pytest.approx(expected, abs=1e-5)


def test_init_from_errors(hf_directory, token_dataset, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):  # the shape comes from the weights: a disagreeing variable is an error
        run_train(monkeypatch, token_dataset, tmp_path / "a", INIT_FROM=hf_directory, VOCAB_SIZE=None, N_LAYER="4")
    assert "N_LAYER=4 disagrees with INIT_FROM=" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        run_train(monkeypatch, token_dataset, tmp_path / "b", INIT_FROM="gpt2", VOCAB_SIZE=None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err and "DIR" in err


# ---- HellaSwag during training --------------------------------------------------------------

def test_hellaswag_is_logged_and_recorded(token_dataset, tmp_path, monkeypatch, capsys):
    rows = [{"ctx": f"Question: What is {i} plus {i}?", "label": i % 4,
             "endings": [f"Answer: {i + i + k}." for k in range(4)]} for i in range(6)]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("HELLASWAG_PATH", str(path))
    run_train(monkeypatch, token_dataset, tmp_path / "log", HELLASWAG_LIMIT=5, MAX_STEPS=2)
    out = capsys.readouterr().out
    assert out.count("HellaSwag accuracy: ") == 2 and re.search(r"HellaSwag accuracy: \d/5=0\.\d{4}\n", out)
    accuracies = [r["hellaswag_acc"] for r in read_metrics(tmp_path / "log")]
    assert accuracies[1] != "" and 0 <= float(accuracies[1]) <= 1 and accuracies[0] != ""


def test_no_hellaswag_data_is_one_warning_and_training_goes_on(token_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_train(monkeypatch, token_dataset, tmp_path / "log", HELLASWAG_LIMIT=0, MAX_STEPS=2)
    out, err = capsys.readouterr()
    assert err.count("Warning: HellaSwag evaluation skipped") == 1 and "HellaSwag accuracy" not in out
    assert len(read_metrics(tmp_path / "log")) == 2


# ---- plot_metrics.py -------------------------------------------------------------------------

def test_plot_metrics_writes_a_png(reference_run, tmp_path, monkeypatch):
    shutil.copy(reference_run / "metrics.csv", tmp_path)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    plot_metrics.main()
    png = (tmp_path / "training_metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


@pytest.mark.parametrize("content", [None, "", ",".join(metrics.COLUMNS) + "\n"])
def test_plot_metrics_on_a_missing_or_empty_csv(tmp_path, monkeypatch, capsys, content):
    if content is not None:
        (tmp_path / "metrics.csv").write_text(content)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        plot_metrics.main()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.csv" in err and "train.py" in err
    assert not (tmp_path / "training_metrics.png").exists()
