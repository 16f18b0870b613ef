"""Saving, loading and finding checkpoints: the one owner every script goes through.

A checkpoint is `$LOG_DIR/model_{step:05d}.pt`, the state after update `step`. It holds only
tensors and plain Python values, so every reader uses `torch.load(weights_only=True)`: a file that
would run code when unpickled is refused instead of executed.
"""

import os
import pickle
import re
import warnings
import zipfile

import torch

from env import UserError, env_str
from model import GPT, GPTConfig

NAME = re.compile(r"^model_(\d{5,})\.pt$")
TEMPORARY = re.compile(r"^model_\d{5,}\.pt\.tmp\d+$")  # what save() writes before its rename


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
    """Write to a temporary name, then rename: a crash mid-write never leaves a broken model_*.pt."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        reason = str(error).split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {reason})") from None
    except Exception:  # bytes that are no pickle at all trip the unpickler in many ways
        raise UserError(f"{path} is not a checkpoint (its contents are not a PyTorch save file)") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (no 'model' and 'config' entries)")
    return state


# what train.py needs beyond the weights to continue a run exactly where it stopped
TRAINING_KEYS = {"optimizer": dict, "step": int, "loader": int, "rng": dict, "train_config": dict}


def require_training_state(state, path):
    """Check that a loaded checkpoint can resume training, not just hold weights."""
    for key, kind in TRAINING_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise UserError(f"{path} cannot resume training: its '{key}' entry is missing or not a {kind.__name__}")
    if not isinstance(state["rng"].get("cpu"), torch.Tensor):
        raise UserError(f"{path} cannot resume training: it holds no CPU random-number state")


def build_model(state, path="checkpoint", dropout=0.0):
    """A GPT with the checkpoint's shape and weights (on the CPU, in float32)."""
    try:
        config = GPTConfig(**{name: int(state["config"][name]) for name in GPTConfig.SHAPE}, dropout=dropout)
        model = GPT(config)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not hold a GPT model this code can load: {str(error).splitlines()[0]}") from None
    return model


def load_model(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dictionary)."""
    state = load(path)
    model = build_model(state, path).to(device).eval()
    return model, state


def resolve_path(path, hint):
    """The checkpoint file to use: `path` itself, the newest one in the folder `path`, or the newest
    in LOG_DIR when `path` is None. `hint` ends the error when there is none."""
    if path and not os.path.isdir(path):
        return path
    folder = path or env_str("LOG_DIR", "log")
    newest = latest_checkpoint(folder)
    if newest is None:
        raise UserError(f"no checkpoint in {folder}/: {hint}")
    return newest


def model_path_from_env():
    """The checkpoint generate.py and prompt.py use: TESTING_MODEL_PATH (a file, or a folder whose
    newest checkpoint is taken), else the newest in LOG_DIR."""
    return resolve_path(env_str("TESTING_MODEL_PATH", None), "train one with train.py, or set TESTING_MODEL_PATH")
