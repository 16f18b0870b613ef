"""Checkpoints: what one holds, saving, finding, and loading it; the one owner every script goes through.

A checkpoint is `$LOG_DIR/model_{step:05d}.pt`, the state after update `step`: the weights and
shape, and everything train.py needs to continue the run exactly (`training_state`,
`restore_training_state`). It holds only tensors and plain Python values, so every reader uses
`torch.load(weights_only=True)`: a file that would run code when unpickled is refused instead of
executed. Inference scripts call `load_model`.
"""

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict

import torch

import settings
from atomic import atomic_write
from env import UserError, read, reason
from model import GPT, GPTConfig

NAME = re.compile(r"^model_(\d{5,})\.pt$")
TEMPORARY = re.compile(r"^model_\d{5,}\.pt\.tmp\d+$")  # what atomic_write leaves when killed mid-write


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """(step, path) of every checkpoint in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), os.path.join(log_dir, name)) for name in os.listdir(log_dir) if (m := NAME.match(name))]
    return sorted(found)


def latest_checkpoint(log_dir):
    """Path of the newest (largest step) checkpoint in log_dir, or None."""
    found = list_checkpoints(log_dir)
    return found[-1][1] if found else None


def save(state, path):
    """Write `state` to `path` through a temporary file: a crash mid-write never leaves a broken model_*.pt."""
    with atomic_write(path) as f:
        torch.save(state, f)


def prune(log_dir, keep):
    """Delete all but the newest `keep` checkpoints (0 keeps all). Only files named model_NNNNN.pt
    are ever considered, so nothing else in log_dir is touched."""
    for _, path in list_checkpoints(log_dir)[:-keep] if keep > 0 else []:
        os.remove(path)


def remove_stale_temporaries(log_dir):
    """Delete half-written checkpoints (model_NNNNN.pt.tmpPID) a killed run left behind."""
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            if TEMPORARY.match(name):
                os.remove(os.path.join(log_dir, name))


def load(path):
    """The checkpoint's dictionary, on the CPU. Anything that is not one of ours is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint {path} is not readable (permission denied)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols say nothing to a user
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any class or function reference instead of importing it
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:
            raise UserError(f"{path} is not a safe checkpoint: unpickling it would load {blocked.group(1)}, "
                            "so it was refused (train.py checkpoints hold only tensors and plain values)") from None
        raise UserError(f"{path} is not a checkpoint (its contents are not a PyTorch save file)") from None
    except EOFError:
        raise UserError(f"{path} is not a readable checkpoint (empty or truncated)") from None
    except (RuntimeError, zipfile.BadZipFile, OSError) as error:  # OSError: a seek past a truncated end
        why = reason(error).split(". ")[0]
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {why})") from None
    except Exception:  # bytes that are no pickle at all trip the unpickler in many ways
        raise UserError(f"{path} is not a checkpoint (its contents are not a PyTorch save file)") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (no 'model' and 'config' entries)")
    return state


def build_model(state, path="checkpoint", dropout=0.0):
    """Build a GPT with the checkpoint's shape and weights (on the CPU, in float32)."""
    try:
        config = GPTConfig(**{name: int(state["config"][name]) for name in GPTConfig.SHAPE}, dropout=dropout)
        model = GPT(config)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not hold a GPT model this code can load: {reason(error)}") from None
    return model


def load_model(path, device="cpu", say=None):
    """Load the checkpoint at `path` for inference, as every script does: return the model, in eval
    mode on `device`, and the checkpoint's dictionary. `say` prints the progress lines, if given."""
    say = say or (lambda text: None)
    state = load(path)
    say(f"Loaded checkpoint from {path}")
    say("Initializing model...")
    model = build_model(state, path).to(device).eval()
    say("Model loaded successfully!")
    return model, state


def resolve_path(path, hint):
    """Return the checkpoint file to use: `path` itself, the newest one in the folder `path`, or the
    newest in LOG_DIR when `path` is empty. `hint` ends the error when there is none."""
    if path and not os.path.isdir(path):
        return path
    folder = path or settings.shared("log_dir")
    newest = latest_checkpoint(folder)
    if newest is None:
        raise UserError(f"no checkpoint in {folder}/: {hint}")
    return newest


def model_path_from_env():
    """Return the checkpoint generate.py and prompt.py use: TESTING_MODEL_PATH (a file, or a folder
    whose newest checkpoint is taken), else the newest in LOG_DIR."""
    chosen = read(settings.SamplingConfig, only=["testing_model_path"]).testing_model_path
    return resolve_path(chosen, "train one with train.py, or set TESTING_MODEL_PATH")


# ----------------------------------------------------------------------------------------------
# the training state: what RESUME needs beyond the weights to continue a run exactly

TRAINING_KEYS = {"optimizer": dict, "step": int, "loader": int, "rng": dict, "train_config": dict}


def training_state(model, optimizer, scaler, train_config, step, val_loss, loader_position, device):
    """Everything after update `step`, as tensors and plain Python values only (weights_only=True reads it)."""
    optimizer_state = optimizer.state_dict()
    if scaler.is_enabled():
        optimizer_state["grad_scaler"] = scaler.state_dict()  # the fp16 loss scale
    return {
        "model": model.state_dict(),
        "optimizer": optimizer_state,
        "config": model.config.shape(),
        "train_config": asdict(train_config),
        "step": step,
        "val_loss": val_loss,
        "loader": loader_position,  # the global token position in the training stream
        "rng": rng_state(device),
    }


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def require_training_state(state, path):
    """Check that a loaded checkpoint can resume training, not just hold weights."""
    for key, kind in TRAINING_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise UserError(f"{path} cannot resume training: its '{key}' entry is missing or not a {kind.__name__}")
    if not isinstance(state["rng"].get("cpu"), torch.Tensor):
        raise UserError(f"{path} cannot resume training: it holds no CPU random-number state")


def restore_training_state(state, path, optimizer, scaler, loader, device, weight_decay):
    """Put the optimizer, loss scale, data position and random numbers back as they were after update `step`."""
    saved = dict(state["optimizer"])
    scaler_state = saved.pop("grad_scaler", None)
    try:
        optimizer.load_state_dict(saved)
        if scaler_state and scaler.is_enabled():
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(state["rng"]["cpu"])
        if device.startswith("cuda") and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        elif device == "mps" and "mps" in state["rng"]:
            torch.mps.set_rng_state(state["rng"]["mps"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"{path} holds an optimizer state this model cannot use: {reason(error)}") from None
    optimizer.param_groups[0]["weight_decay"] = weight_decay  # group 0 decays; WEIGHT_DECAY may have changed
    loader.position = state["loader"] % loader.total
