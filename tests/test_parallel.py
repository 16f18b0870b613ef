"""PARALLEL=fsdp: FSDP2 on CPU ranks (gloo) makes DDP's updates and evaluations, and its sharded
checkpoints (model_NNNNN.dcp/) resume under any world size and read like .pt files everywhere."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

import checkpoint
import evaluate
import export_hf
import generate
from env import UserError
from test_checkpoint import RunsCode
from test_train import ROOT, read_metrics, run_train, subprocess_env

STEPS = dict(MAX_STEPS=20, TOTAL_BATCH_SIZE=256, EVAL_INTERVAL=10, CHECKPOINT_INTERVAL=10, SAMPLE_INTERVAL=10,
             HELLASWAG_LIMIT=6)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]


def torchrun(dataset, log_dir, **settings):
    result = subprocess.run(TORCHRUN, cwd=ROOT, env=subprocess_env(dataset, log_dir, **{**STEPS, **settings}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(log_dir, first=0):
    return [(int(r["step"]), float(r["loss"]), float(r["norm"])) for r in read_metrics(log_dir)[first:]]


def assert_close(a, b, tolerance=1e-4):
    assert [step for step, *_ in a] == [step for step, *_ in b]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, abs=tolerance) and norm_a == pytest.approx(norm_b, abs=tolerance)


def evaluations(log_dir):
    return [(r["step"], r["val_loss"], r["hellaswag_acc"]) for r in read_metrics(log_dir) if r["val_loss"]]


def test_fsdp_ddp_and_one_process_make_the_same_updates(runs):
    assert_close(losses(runs["fsdp"]), losses(runs["ddp"]))
    assert_close(losses(runs["fsdp"]), losses(runs["single"]))
    assert len(losses(runs["fsdp"])) == 20
    out = runs["fsdp_out"]
    assert "  PARALLEL: fsdp" in out and "=> calculated gradient accumulation steps: 2" in out
    assert out.count("rank 0 sample 0:") == 2 and "rank 1 sample" not in out


def test_evaluation_under_fsdp_equals_ddp(runs):
    fsdp, ddp, single = evaluations(runs["fsdp"]), evaluations(runs["ddp"]), evaluations(runs["single"])
    assert [step for step, _, _ in fsdp] == [step for step, _, _ in ddp] == [step for step, _, _ in single]
    assert [step for step, _, _ in fsdp] == ["0", "10", "19"]
    for (_, loss_f, acc_f), (_, loss_d, acc_d), (_, loss_s, acc_s) in zip(fsdp, ddp, single):
        assert float(loss_f) == pytest.approx(float(loss_d), abs=1e-5) == pytest.approx(float(loss_s), abs=1e-4)
        assert acc_f == acc_d == acc_s != ""  # the HellaSwag counts are the same


def test_fsdp_writes_sharded_checkpoints(runs):
    found = checkpoint.list_checkpoints(str(runs["fsdp"]))
    assert found == [(9, str(runs["fsdp"] / "model_00009.dcp")), (19, str(runs["fsdp"] / "model_00019.dcp"))]
    folder = runs["fsdp"] / "model_00019.dcp"
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    rest = torch.load(folder / "train_state.pt", weights_only=True)
    assert set(rest) == {"optimizer", "config", "train_config", "step", "val_loss", "loader", "rng"}
    assert rest["step"] == 19 and rest["train_config"]["parallel"] == "fsdp" and "state" not in rest["optimizer"]
    assert not [name for name in os.listdir(runs["fsdp"]) if ".tmp" in name]


def test_a_two_rank_fsdp_checkpoint_continues_in_one_process(runs, token_dataset, tmp_path, monkeypatch, capsys):
    run_train(monkeypatch, token_dataset, tmp_path, **{**STEPS, "HELLASWAG_LIMIT": -1}, VAL_STEPS=4,
              RESUME=runs["fsdp"] / "model_00009.dcp")
    assert "continuing at step 10" in capsys.readouterr().out
    assert_close(losses(tmp_path), losses(runs["fsdp"], first=10))


def test_a_one_process_checkpoint_continues_under_fsdp_on_two_ranks(runs, token_dataset, tmp_path):
    torchrun(token_dataset, tmp_path, PARALLEL="fsdp", HELLASWAG_LIMIT=-1, RESUME=runs["single"] / "model_00009.pt")
    assert_close(losses(tmp_path), losses(runs["single"], first=10))
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("model_00019.dcp")


# Resuming a .dcp on the same 2 ranks reproduces the run bit for bit: test_faults.py's SIGTERM test checks it.


def test_a_fsdp_checkpoint_continues_under_ddp(runs, token_dataset, tmp_path):
    torchrun(token_dataset, tmp_path, PARALLEL="ddp", HELLASWAG_LIMIT=-1, RESUME=runs["fsdp"] / "model_00009.dcp")
    assert_close(losses(tmp_path), losses(runs["fsdp"], first=10))


def test_every_reader_takes_a_sharded_checkpoint(runs, hellaswag_rows, tmp_path, monkeypatch, capsys):
    sharded = runs["fsdp"] / "model_00019.dcp"
    model, state = checkpoint.load_model(str(sharded))
    whole, _ = checkpoint.load_model(str(runs["ddp"] / "model_00019.pt"))
    assert state["step"] == 19 and "state" not in state["optimizer"]  # readers skip the optimizer's tensors
    # FSDP's weights are DDP's, up to the rounding AdamW amplifies where a gradient is near zero
    for name, tensor in whole.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-3), name
    tokens = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(tokens[:, :-1], tokens[:, 1:])[1].item() == pytest.approx(
            whole(tokens[:, :-1], tokens[:, 1:])[1].item(), abs=1e-4)

    monkeypatch.setenv("LOG_DIR", str(runs["fsdp"]))  # the newest checkpoint there is a .dcp folder
    monkeypatch.delenv("TESTING_MODEL_PATH", raising=False)
    monkeypatch.setenv("MAX_NEW_TOKENS", "4")
    monkeypatch.setenv("DEVICE", "cpu")
    generate.main()
    assert f"Loaded checkpoint from {sharded}" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--checkpoint", str(sharded), "--limit", "4"])
    monkeypatch.setenv("HELLASWAG_PATH", hellaswag_rows)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    evaluate.main()
    assert f"Loading checkpoint from {sharded}" in capsys.readouterr().out

    export_hf.main(["--checkpoint", str(sharded), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def write_metadata(folder, payload):
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    torch.save({"config": {}, "step": 1}, folder / "train_state.pt")


def test_a_metadata_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "model_00001.dcp"
    write_metadata(folder, {"metadata": RunsCode(str(marker))})
    with pytest.raises(UserError) as error:
        checkpoint.load(str(folder))
    assert "is not a safe checkpoint: unpickling its .metadata would load os.makedirs" in str(error.value)
    assert len(str(error.value).splitlines()) == 1 and not marker.exists()


def test_a_non_tensor_value_in_a_sharded_checkpoint_is_refused(tmp_path):
    """DCP unpickles non-tensor values with weights_only=False: ours hold none, so one is refused."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "model_00001.dcp"
    dcp.save({"model.w": torch.zeros(2), "extra": {"anything": [1, 2]}}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"config": {}, "step": 1}, folder / "train_state.pt")
    with pytest.raises(UserError, match="is not a safe checkpoint: extra.anything is not a tensor"):
        checkpoint.load(str(folder))


def test_sharded_checkpoints_are_listed_pruned_and_cleaned_like_files(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"model_{step:05d}.dcp").mkdir()
        (tmp_path / f"model_{step:05d}.dcp" / ".metadata").write_bytes(b"x")
    (tmp_path / "model_00002.pt").write_bytes(b"x")  # a step in both forms: the .pt is taken
    (tmp_path / "model_00004.dcp").mkdir()  # no .metadata: a save that never finished
    (tmp_path / "model_00005.dcp.tmp").mkdir()  # the temporary folder of a killed save
    found = checkpoint.list_checkpoints(str(tmp_path))
    assert found == [(1, str(tmp_path / "model_00001.dcp")), (2, str(tmp_path / "model_00002.pt")),
                     (3, str(tmp_path / "model_00003.dcp"))]
    assert checkpoint.resolve_path(str(tmp_path), "") == str(tmp_path / "model_00003.dcp")
    assert checkpoint.resolve_path(str(tmp_path / "model_00001.dcp"), "") == str(tmp_path / "model_00001.dcp")
    checkpoint.prune(str(tmp_path), 1)
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model_00003.dcp", "model_00004.dcp"]


def test_single_process_fsdp_resumes_bit_for_bit_and_leaves_no_temporary(token_dataset, tmp_path, monkeypatch):
    settings = dict(PARALLEL="fsdp", MAX_STEPS=6, CHECKPOINT_INTERVAL=3)
    run_train(monkeypatch, token_dataset, tmp_path / "whole", **settings)
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "model_00002.dcp.tmp").mkdir()  # left by a killed save: cleaned up
    run_train(monkeypatch, token_dataset, tmp_path / "resumed", **settings, FORCE=1,
              RESUME=tmp_path / "whole" / "model_00002.dcp")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole", first=3)
    assert sorted(os.listdir(tmp_path / "resumed")) == ["metrics.csv", "model_00005.dcp"]


def test_force_deletes_sharded_checkpoints_and_a_trailing_slash_resumes_in_place(token_dataset, tmp_path,
                                                                                  monkeypatch, capsys):
    run_train(monkeypatch, token_dataset, tmp_path, PARALLEL="fsdp", MAX_STEPS=3, CHECKPOINT_INTERVAL=1)
    # continuing from update 1 in its own LOG_DIR (as shell completion writes it): update 2's is in the way
    run_train(monkeypatch, token_dataset, tmp_path, PARALLEL="fsdp", MAX_STEPS=3, CHECKPOINT_INTERVAL=1, FORCE=1,
              RESUME=f"{tmp_path / 'model_00001.dcp'}/")
    out = capsys.readouterr().out
    assert f"FORCE=1: deleting {tmp_path / 'model_00002.dcp'}" in out and "continuing at step 2" in out
    run_train(monkeypatch, token_dataset, tmp_path, MAX_STEPS=2, CHECKPOINT_INTERVAL=1, FORCE=1)  # a fresh run
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "model_00000.pt", "model_00001.pt"]


# ---- activation checkpointing and sharded resuming -----------------------------------------------

@pytest.fixture(scope="module")
def checkpointed_runs(runs, token_dataset, hellaswag_rows):
    """The runs of `runs` again with ACTIVATION_CHECKPOINTING=1, scoring 1 HellaSwag row: under FSDP
    rank 1 has none, and must still make rank 0's forward passes with it."""
    root = runs["root"]
    for parallel in ("fsdp", "ddp"):
        torchrun(token_dataset, root / f"{parallel}_ac", PARALLEL=parallel, ACTIVATION_CHECKPOINTING=1,
                 HELLASWAG_PATH=hellaswag_rows, HELLASWAG_LIMIT=1)
    return {"fsdp": root / "fsdp_ac", "ddp": root / "ddp_ac"}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_activation_checkpointing_makes_the_same_updates_on_two_ranks(runs, checkpointed_runs, parallel):
    assert_close(losses(checkpointed_runs[parallel]), losses(runs[parallel]), tolerance=1e-6)
    with_ac, without = evaluations(checkpointed_runs[parallel]), evaluations(runs[parallel])
    assert [(step, loss) for step, loss, _ in with_ac] == [(step, loss) for step, loss, _ in without]


def test_hellaswag_in_lockstep_with_a_rank_that_has_no_rows(checkpointed_runs):
    fsdp, ddp = evaluations(checkpointed_runs["fsdp"]), evaluations(checkpointed_runs["ddp"])
    assert fsdp and [acc for _, _, acc in fsdp] == [acc for _, _, acc in ddp] and all(acc != "" for _, _, acc in fsdp)


def test_activation_checkpointing_in_one_process_and_interchangeable_checkpoints(token_dataset, tmp_path, monkeypatch):
    settings = dict(MAX_STEPS=10, DROPOUT="0.1", CHECKPOINT_INTERVAL=5)  # dropout: recomputed with the same masks
    run_train(monkeypatch, token_dataset, tmp_path / "plain", **settings)
    run_train(monkeypatch, token_dataset, tmp_path / "ac", **settings, ACTIVATION_CHECKPOINTING=1)
    assert_close(losses(tmp_path / "ac"), losses(tmp_path / "plain"), tolerance=1e-6)
    # a checkpoint of either continues under the other
    run_train(monkeypatch, token_dataset, tmp_path / "mixed", **settings, RESUME=tmp_path / "ac" / "model_00004.pt")
    assert_close(losses(tmp_path / "mixed"), losses(tmp_path / "plain", first=5), tolerance=1e-6)


def test_a_sharded_resume_reads_only_each_ranks_part(token_dataset, tmp_path, monkeypatch):
    """Resuming under FSDP builds no whole model and reads no whole training state: a .pt file is
    mapped, not read, a .dcp's tensors are left to DCP; the updates are those of the run resumed."""
    settings = dict(MAX_STEPS=6, CHECKPOINT_INTERVAL=3)
    run_train(monkeypatch, token_dataset, tmp_path / "whole", **settings)
    run_train(monkeypatch, token_dataset, tmp_path / "sharded", **settings, PARALLEL="fsdp")
    mapped, dcp_reads = [], []
    torch_load, load_sharded = torch.load, checkpoint.load_sharded
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: mapped.append(k.get("mmap")) or torch_load(*a, **k))
    monkeypatch.setattr(checkpoint, "load_sharded",
                        lambda path, *a, **k: dcp_reads.append(k.get("read_tensors")) or load_sharded(path, *a, **k))
    monkeypatch.setattr(checkpoint, "build_model", lambda *a, **k: pytest.fail("a whole model was built"))
    for source in ("whole", "sharded"):
        log_dir = tmp_path / f"from_{source}"
        resumed = checkpoint.checkpoint_path(tmp_path / source, 2, sharded=source == "sharded")
        run_train(monkeypatch, token_dataset, log_dir, **settings, PARALLEL="fsdp", RESUME=resumed)
        assert_close(losses(log_dir), losses(tmp_path / source, first=3), tolerance=1e-6)
    assert mapped[0] is True and dcp_reads == [False]  # the .pt mapped; the .dcp's train_state.pt alone read whole


class Shard:
    """What local_rows asks of an FSDP parameter: its mesh's size and this rank's place in it."""

    def __init__(self, rank, ranks):
        self.device_mesh = type("Mesh", (), {"size": lambda _: ranks, "get_local_rank": lambda _: rank})()


@pytest.mark.parametrize("rows, ranks", [(10, 2), (10, 3), (2, 3), (50304, 4)])
def test_each_rank_reads_the_rows_fsdp_gives_it(rows, ranks):
    """FSDP cuts a parameter along its first dimension as torch.chunk does; a rank past the last
    chunk holds none. Together the ranks' rows are the whole tensor, each row once."""
    whole = torch.arange(rows * 3).view(rows, 3)
    parts = [checkpoint.local_rows(whole, Shard(rank, ranks)) for rank in range(ranks)]
    assert torch.equal(torch.cat(parts), whole)
    assert [len(part) for part in parts] == [len(chunk) for chunk in whole.chunk(ranks)] + [0] * (ranks - len(whole.chunk(ranks)))
    # views, not copies: of a tensor mapped from a file, only these rows are ever read
    assert all(part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr() for part in parts)


def test_a_two_rank_fsdp_checkpoint_continues_under_fsdp_in_one_process(runs, token_dataset, tmp_path, monkeypatch):
    """DCP reshards the .dcp's chunks into one process's shards."""
    run_train(monkeypatch, token_dataset, tmp_path, **{**STEPS, "HELLASWAG_LIMIT": -1}, VAL_STEPS=4, PARALLEL="fsdp",
              RESUME=runs["fsdp"] / "model_00009.dcp")
    assert_close(losses(tmp_path), losses(runs["fsdp"], first=10))


def test_fsdp_in_bfloat16_gathers_in_bfloat16_and_trains_like_one_process(token_dataset, hellaswag_rows, tmp_path,
                                                                          monkeypatch, capsys):
    """Under FSDP bf16 comes from FSDP's mixed precision, not from autocast's cached copies: the
    updates, the evaluation and the samples all run, close to one process's in bf16."""
    settings = dict(DTYPE="bfloat16", MAX_STEPS=4, EVAL_INTERVAL=2, SAMPLE_INTERVAL=2, HELLASWAG_LIMIT=6,
                    HELLASWAG_PATH=hellaswag_rows)
    run_train(monkeypatch, token_dataset, tmp_path / "one", **settings)
    run_train(monkeypatch, token_dataset, tmp_path / "fsdp", **settings, PARALLEL="fsdp")
    assert capsys.readouterr().out.count("rank 0 sample 0:") == 4
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), tolerance=3e-2)
