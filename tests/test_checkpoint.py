"""checkpoint.py: finding, pruning and refusing checkpoints; nothing unsafe is ever unpickled."""

import os
import pickle
import random

import pytest
import torch

import checkpoint
import train
from env import UserError
from model import GPT, GPTConfig

SHAPE = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8)


class RunsCode:
    """Unpickling this calls os.makedirs(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture
def good(tmp_path):
    """A small checkpoint in train.py's format, and its state."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    [optimizer] = model.configure_optimizers(0.1, 1e-3, "cpu", verbose=False)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": dict(SHAPE),
             "train_config": {"max_steps": 10}, "step": 4, "val_loss": 3.5, "loader": 1234,
             "rng": {"cpu": torch.get_rng_state()}}
    path = tmp_path / "model_00004.pt"
    checkpoint.save(state, str(path))
    return path, state


def test_save_and_load_round_trip(good):
    path, state = good
    assert os.listdir(path.parent) == ["model_00004.pt"]  # no temporary left behind
    loaded = checkpoint.load(str(path))
    checkpoint.require_training_state(loaded, str(path))
    assert loaded["step"] == 4 and loaded["loader"] == 1234 and loaded["val_loss"] == 3.5
    model = checkpoint.build_model(loaded, str(path), dropout=0.2)
    assert model.config.dropout == 0.2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())


def test_listing_takes_only_this_naming_scheme(tmp_path):
    for name in ["model_00010.pt", "model_00002.pt", "model_123456.pt", "model_best.pt", "model_1.pt",
                 "model_00003.pt.tmp77", "model_00004.pt.bak", "notes.txt"]:
        (tmp_path / name).write_text("x")
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [2, 10, 123456]
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model_123456.pt")
    assert checkpoint.latest_checkpoint(str(tmp_path / "missing")) is None

    checkpoint.prune(str(tmp_path), 2)
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model_00004.pt.bak", "model_00010.pt", "model_1.pt",
                                           "model_123456.pt", "model_best.pt", "notes.txt"]
    checkpoint.prune(str(tmp_path), 0)  # 0 keeps them all
    assert len(checkpoint.list_checkpoints(str(tmp_path))) == 2


def write_truncated(path, good_path):
    data = good_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "truncated": (write_truncated, "corrupt or truncated"),
    "empty": (lambda p, g: p.write_bytes(b""), "empty or truncated"),
    "garbage": (lambda p, g: p.write_bytes(random.Random(0).randbytes(4096)), "not a"),
    "text": (lambda p, g: p.write_text("hello, I am not a checkpoint\n"), "not a"),
    "a list": (lambda p, g: torch.save([1, 2, 3], p), "not a checkpoint written by train.py"),
    "nanoGPT's keys": (lambda p, g: torch.save({"model": {}, "model_args": {}, "iter_num": 3}, p),
                       "not a checkpoint written by train.py"),
    "wrong shapes": (lambda p, g: torch.save({"model": {"lm_head.weight": torch.zeros(3, 3)}, "config": SHAPE}, p),
                     "does not hold a GPT model"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_corrupt_truncated_and_foreign_files_are_refused(good, tmp_path, kind):
    write, message = BAD_FILES[kind]
    path = tmp_path / "bad.pt"
    write(path, good[0])
    with pytest.raises(UserError) as error:
        checkpoint.load_model(str(path))
    assert message in str(error.value) and str(path) in str(error.value)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("how, message", [
    ("torch.save", "not a safe checkpoint: unpickling it would load os.makedirs"),
    ("legacy torch.save", "not a safe checkpoint: unpickling it would load os.makedirs"),
    ("plain pickle", "not a checkpoint"),
])
def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, how, message):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model_00001.pt"
    payload = {"model": RunsCode(str(marker)), "config": SHAPE}
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch.save")
    with pytest.raises(UserError) as error:
        checkpoint.load(str(path))
    assert message in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("name, value", [("transformer.h.0.attn.c_attn.weight", "nan"),
                                         ("transformer.h.0.mlp.c_proj.bias", "inf"),
                                         ("transformer.ln_f.weight", "-inf")])
def test_weights_that_are_not_finite_are_refused_by_name(good, tmp_path, name, value):
    path, state = good
    weights = {key: tensor.clone() for key, tensor in state["model"].items()}
    weights[name].view(-1)[3] = float(value)  # one element is enough
    diverged = tmp_path / "model_00029.pt"
    checkpoint.save({**state, "model": weights}, str(diverged))
    with pytest.raises(UserError) as error:
        checkpoint.load_model(str(diverged))
    assert str(error.value) == (f"{diverged} holds weights that are not finite ({name} has {value.lstrip('-')}): "
                                "it was saved by a run that diverged; use an earlier checkpoint")
    with pytest.raises(UserError, match=f"not finite \\({name} has"):  # train.py's resume builds its model here
        checkpoint.build_model(checkpoint.load(str(diverged)), str(diverged))
    checkpoint.load_model(str(path))  # the healthy one still loads


def test_weights_only_file_cannot_resume(good, tmp_path):
    path, state = good
    slim = tmp_path / "weights.pt"
    torch.save({"model": state["model"], "config": state["config"]}, slim)
    checkpoint.load_model(str(slim))  # fine for generate.py and friends
    with pytest.raises(UserError, match="cannot resume training: its 'optimizer' entry"):
        checkpoint.require_training_state(checkpoint.load(str(slim)), str(slim))


@pytest.mark.parametrize("kind", ["malicious", "truncated", "weights only"])
def test_train_refuses_to_resume_from_a_bad_checkpoint(good, tmp_path, monkeypatch, capsys, kind):
    marker = tmp_path / "code_ran"
    path = tmp_path / "resume_me.pt"
    if kind == "malicious":
        torch.save({"model": RunsCode(str(marker)), "config": SHAPE}, path)
    elif kind == "truncated":
        write_truncated(path, good[0])
    else:
        torch.save({"model": good[1]["model"], "config": SHAPE}, path)
    monkeypatch.setenv("RESUME", str(path))
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "log"))
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"Error: {path}")
    assert not marker.exists() and not (tmp_path / "log").exists()


def test_model_path_from_env_takes_a_file_a_folder_or_log_dir(tmp_path, monkeypatch):
    for step in (4, 12):
        open(checkpoint.checkpoint_path(tmp_path, step), "wb").close()
    monkeypatch.delenv("TESTING_MODEL_PATH", raising=False)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    assert checkpoint.model_path_from_env() == checkpoint.checkpoint_path(tmp_path, 12)
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TESTING_MODEL_PATH", str(tmp_path))  # a folder: its newest checkpoint
    assert checkpoint.model_path_from_env() == checkpoint.checkpoint_path(tmp_path, 12)
    monkeypatch.setenv("TESTING_MODEL_PATH", checkpoint.checkpoint_path(tmp_path, 4))
    assert checkpoint.model_path_from_env() == checkpoint.checkpoint_path(tmp_path, 4)
    monkeypatch.setenv("TESTING_MODEL_PATH", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.model_path_from_env()
