"""This module owns checkpoints: what one holds, saving, finding and loading it; every script goes through it.

A checkpoint is the state after update `step`: the weights and shape, and everything train.py
needs to continue the run exactly (`training_state`, `restore_training_state`). It comes in two
forms, and every reader takes both:
- `$LOG_DIR/model_{step:05d}.pt`, one file written by rank 0 (one process, or DDP);
- `$LOG_DIR/model_{step:05d}.dcp/`, written by every rank at once under FSDP: a Distributed
  Checkpoint (torch.distributed.checkpoint) of the weights' and optimizer's tensors, each rank its
  own shard, and beside them `train_state.pt` with the rest (step, configs, loader position, RNG).
Both hold only tensors and plain Python values, read with `torch.load(weights_only=True)` and a
restricted unpickler for DCP's `.metadata`: a file that would run code when unpickled is refused
instead of executed. Inference scripts call `load_model`.
"""

import io
import os
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import asdict

import torch
import torch.distributed as dist

import settings
from atomic import atomic_write
from device import setup as setup_device
from env import UserError, read, reason
from model import GPT, GPTConfig

NAME = re.compile(r"^model_(\d{5,})\.(pt|dcp)$")
# what a killed save leaves: atomic_write's file (model_NNNNN.pt.tmpPID), or the DCP folder being written
TEMPORARY = re.compile(r"^model_\d{5,}\.(pt\.tmp\d+|dcp\.tmp|dcp\.deleting)$")
TRAIN_STATE = "train_state.pt"  # in a .dcp folder: everything but the tensors


def checkpoint_path(log_dir, step, sharded=False):
    return os.path.join(log_dir, f"model_{step:05d}.{'dcp' if sharded else 'pt'}")


def is_sharded(path):
    """Return True for a .dcp checkpoint folder (DCP's .metadata is written last, so a complete one has it)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def list_checkpoints(log_dir):
    """Return (step, path) of every checkpoint in log_dir, oldest first. A step saved in both forms
    is listed once, as its .pt file."""
    if not os.path.isdir(log_dir):
        return []
    found = {}
    for name in sorted(os.listdir(log_dir)):  # "model_N.pt" after "model_N.dcp": the .pt wins
        path = os.path.join(log_dir, name)
        if (m := NAME.match(name)) and (m.group(2) == "pt" or is_sharded(path)):
            found[int(m.group(1))] = path
    return sorted(found.items())


def latest_checkpoint(log_dir):
    """Return the path of the newest (largest step) checkpoint in log_dir, or None."""
    found = list_checkpoints(log_dir)
    return found[-1][1] if found else None


def delete(path):
    """Delete a checkpoint of either form. A folder is renamed first, so that a kill halfway through
    leaves a temporary the next run removes, never a .dcp folder with some of its shards gone."""
    if os.path.isdir(path):
        doomed = path + ".deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    else:
        os.remove(path)


def delete_step(log_dir, step):
    """Delete the checkpoint of update `step`, in both forms."""
    for sharded in (False, True):
        if os.path.exists(path := checkpoint_path(log_dir, step, sharded)):
            delete(path)


def prune(log_dir, keep):
    """Delete all but the newest `keep` checkpoints (0 keeps all), both forms of each step. Only
    names of the form model_NNNNN.pt and model_NNNNN.dcp are ever considered, so nothing else in
    log_dir is touched."""
    for step, _ in list_checkpoints(log_dir)[:-keep] if keep > 0 else []:
        delete_step(log_dir, step)


def remove_stale_temporaries(log_dir):
    """Delete the half-written checkpoints a killed run left behind."""
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            if TEMPORARY.match(name):
                path = os.path.join(log_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)


# ----------------------------------------------------------------------------------------------
# saving

def save(state, path):
    """Write the training state to `path`: a .pt file (call it on rank 0 only), or a .dcp folder
    (call it on every rank: each writes its shards). Either is written under a temporary name and
    renamed when complete, so a crash mid-write never leaves a broken checkpoint. A write that
    fails (a full disk, a quota, a revoked permission) leaves no temporary behind, every earlier
    checkpoint as it was, and stops with one UserError naming LOG_DIR and the cause."""
    path = os.fspath(path)
    if not path.endswith(".dcp"):
        writer = None
        try:
            with atomic_write(path) as f:
                writer = WriteErrors(f)
                torch.save(state, writer)
        except (OSError, RuntimeError) as error:  # torch.save turns the write's OSError into a RuntimeError
            raise cannot_write(path, writer.error if writer and writer.error else error) from None
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tensors, rest = split_tensors(state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = path + ".tmp"  # one name every rank agrees on
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # the old temporary is gone before anyone writes
    failure = None
    try:
        # returns on rank 0 only after every rank has written its shards and rank 0 the .metadata;
        # a failure on any rank reaches every rank as a CheckpointException
        dcp.save(tensors, checkpoint_id=tmp)
        if rank == 0:
            with atomic_write(os.path.join(tmp, TRAIN_STATE)) as f:
                torch.save(rest, f)
            if os.path.exists(path):
                delete(path)
            os.replace(tmp, path)
    except CheckpointException as error:  # DCP wraps each rank's own exception
        failure = next(iter(error.failures.values()))[0] if error.failures else error
    except Exception as error:  # whatever it is, the other ranks must hear of it, not wait for rank 0
        failure = error
    if dist.is_initialized():  # rank 0's train_state.pt may fail alone: every rank must hear of it
        rank_0_failure = [reason(failure) if failure else None]
        dist.broadcast_object_list(rank_0_failure, src=0)
        dist.barrier()  # nobody goes on (to prune, or to the next save) before the rename
        failure = failure or rank_0_failure[0]
    if failure:
        error = cannot_write(path, failure)  # before the temporary goes: a full disk is still full
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error from None


class WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write, whose message says why
    (No space left on device, File too large, ...), where torch.save's own error does not."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.f.flush()


def cannot_write(path, cause):
    """Return the UserError for a checkpoint that could not be written, naming LOG_DIR and the cause.
    torch.save inside DCP reports a failed write without the OS's reason: the usual ones are checked."""
    log_dir = os.path.dirname(path) or "."
    why = reason(cause) if isinstance(cause, BaseException) else cause
    if not isinstance(cause, OSError) and hasattr(os, "statvfs"):  # (not on Windows)
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        disk = os.statvfs(log_dir)
        if disk.f_bavail * disk.f_frsize < 2**20:
            why = "No space left on device"
        elif limit != resource.RLIM_INFINITY:
            why = f"File too large (the file size limit, ulimit -f, is {limit:,} bytes)"
    return UserError(f"cannot write checkpoint {os.path.basename(path)} in LOG_DIR {log_dir}: {why}")


def split_tensors(state):
    """Split a training state into the tensors DCP writes ({flat name: tensor}: the weights and the
    optimizer's per-parameter state) and the rest, plain values for train_state.pt."""
    rest = {key: value for key, value in state.items() if key not in ("model", "optimizer")}
    tensors = {f"model.{name}": tensor for name, tensor in state["model"].items()}
    for index, per_parameter in state["optimizer"]["state"].items():
        tensors.update({f"optimizer.{index}.{key}": value for key, value in per_parameter.items()})
    rest["optimizer"] = {key: value for key, value in state["optimizer"].items() if key != "state"}
    return tensors, rest


# ----------------------------------------------------------------------------------------------
# loading

def load(path, with_optimizer=True, lazily=False):
    """Return the checkpoint's dictionary, on the CPU, whatever its form: the same keys for both.
    A .dcp's optimizer tensors are read only `with_optimizer` (a .pt file is read whole). Anything
    that is not one of ours is a UserError.

    lazily (FSDP resuming, where no rank should hold the whole training state): a .pt file's tensors
    are mapped from the file and read only where used; a .dcp's are not read at all (no "model"
    entry, no optimizer "state"): load_into_shards reads each rank's part once the model is sharded."""
    if os.path.isdir(path):
        state = load_sharded(path, with_optimizer, read_tensors=not lazily)
    else:
        state = torch_load(path, mmap=lazily)
    if not isinstance(state, dict) or "config" not in state or not ("model" in state or lazily and is_sharded(path)):
        raise UserError(f"{path} is not a checkpoint written by train.py (no 'model' and 'config' entries)")
    return state


def torch_load(path, mmap=False):
    """Read a file torch.save wrote, refusing anything but tensors and plain values (with `mmap`,
    its tensors are mapped from the file: read as they are used)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint {path} is not readable (permission denied)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols say nothing to a user
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def load_sharded(path, with_optimizer, read_tensors=True):
    """Read a .dcp folder whole, with no process group (DCP reassembles the shards), into the
    dictionary a .pt file holds; without `read_tensors`, only train_state.pt (the metadata is
    checked all the same)."""
    import torch.distributed.checkpoint as dcp
    if not is_sharded(path):
        raise UserError(f"{path} is not a checkpoint (a folder without DCP's .metadata: an unfinished save?)")
    reader = safe_reader(path)
    metadata = reader.read_metadata().state_dict_metadata
    state = torch_load(os.path.join(path, TRAIN_STATE))
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (its {TRAIN_STATE} is no dictionary)")
    if not read_tensors:
        return state
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in metadata.items()
               if key.startswith("model.") or with_optimizer}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's note that it loads in one process: that is the intent
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as error:  # a missing or truncated shard file
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {reason(error)})") from None
    state["model"] = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
    if with_optimizer and isinstance(state.get("optimizer"), dict):
        per_parameter = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                index, name = key[len("optimizer."):].split(".", 1)
                per_parameter.setdefault(int(index), {})[name] = value
        state["optimizer"]["state"] = per_parameter
    return state


# DCP's .metadata is a pickle; these are the only things it may name
SAFE_METADATA = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "torch": {"Size"},
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP's metadata classes, torch dtypes and nothing else."""

    def find_class(self, module, name):
        if name in SAFE_METADATA.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def safe_reader(path):
    """DCP's file reader, but its .metadata goes through SafeUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self):
            try:
                with open(os.path.join(path, ".metadata"), "rb") as f:
                    metadata = SafeUnpickler(io.BytesIO(f.read())).load()
            except pickle.UnpicklingError as error:
                blocked = re.search(r"GLOBAL (\S+)", str(error))
                what = f"unpickling its .metadata would load {blocked.group(1)}" if blocked else "its .metadata is corrupt"
                raise UserError(f"{path} is not a safe checkpoint: {what}, so it was refused") from None
            except Exception as error:
                raise UserError(f"{path} is not a readable checkpoint (its .metadata: {reason(error)})") from None
            if not isinstance(metadata, Metadata):
                raise UserError(f"{path} is not a checkpoint (its .metadata holds no DCP metadata)")
            # checked at every read, dcp.load's own included: DCP would unpickle a non-tensor value,
            # running whatever it holds
            for key, item in metadata.state_dict_metadata.items():
                if not isinstance(item, TensorStorageMetadata):
                    raise UserError(f"{path} is not a safe checkpoint: {key} is not a tensor, so it was refused")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def model_config(state, path="checkpoint", dropout=0.0):
    """Return the GPTConfig of the checkpoint's model."""
    try:
        return GPTConfig(**{name: int(state["config"][name]) for name in GPTConfig.SHAPE}, dropout=dropout)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} does not hold a GPT model this code can load: {reason(error)}") from None


def build_model(state, path="checkpoint", dropout=0.0):
    """Build a GPT with the checkpoint's shape and weights (on the CPU, in float32). Weights with a
    nan or inf are refused here, naming the first such tensor, rather than sampled or trained from."""
    try:
        model = GPT(model_config(state, path, dropout))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not hold a GPT model this code can load: {reason(error)}") from None
    for name, tensor in state["model"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "nan" if tensor.isnan().any() else "inf"
            raise UserError(f"{path} holds weights that are not finite ({name} has {kind}): it was saved by a "
                            "run that diverged; use an earlier checkpoint")
    return model


def load_model(path, device="cpu", say=None, say_loaded=False):
    """Load the checkpoint at `path` (a .pt file or a .dcp folder) for inference, as every script
    does: return the model, in eval mode on `device`, and the checkpoint's dictionary (a .dcp's
    without the optimizer's tensors). `say` prints the progress lines, if given; `say_loaded` adds the line
    that names the file once it is read."""
    say = say or (lambda text: None)
    state = load(path, with_optimizer=False)
    if say_loaded:
        say(f"Loaded checkpoint from {path}")
    say("Initializing model...")
    model = build_model(state, path).to(device).eval()
    say("Model loaded successfully!")
    return model, state


def resolve_path(path, hint):
    """Return the checkpoint to use: `path` itself (a .pt file or a .dcp folder), the newest one in
    the folder `path`, or the newest in LOG_DIR when `path` is empty. `hint` ends the error when
    there is none."""
    if path and (not os.path.isdir(path) or path.rstrip("/").endswith(".dcp")):
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


def load_testing_model(chosen=""):
    """Load the model generate.py, prompt.py and serve.py talk to, printing their progress lines:
    the checkpoint `chosen` (a file, or a folder's newest), else that of TESTING_MODEL_PATH (or the
    newest in LOG_DIR), on DEVICE, in DTYPE. Returns (model, runtime, its path)."""
    runtime = setup_device(settings.shared("device"), settings.shared("dtype"))
    print(f"Using device: {runtime.device}")
    path = resolve_path(chosen, "train one with train.py") if chosen else model_path_from_env()
    print("Loading checkpoint...")
    model, _ = load_model(path, runtime.device, say=print, say_loaded=True)
    return model, runtime, path


# ----------------------------------------------------------------------------------------------
# the training state: what RESUME needs beyond the weights to continue a run exactly

TRAINING_KEYS = {"optimizer": dict, "step": int, "loader": int, "rng": dict, "train_config": dict}


def optimizer_key(optimizer):
    """Return the checkpoint key of an optimizer's state: "optimizer" is AdamW's, as it always was,
    and Muon's goes beside it under "muon"."""
    return "muon" if isinstance(optimizer, torch.optim.Muon) else "optimizer"


def training_state(model, optimizers, scaler, train_config, step, val_loss, loader_position, device, wandb_run=None):
    """Return everything after update `step`, as tensors and plain Python values only (weights_only=True reads it);
    with TRACKER=wandb, the W&B run ({"id", "group", "name"}) that a resume continues."""
    optimizer_states = {optimizer_key(optimizer): optimizer.state_dict() for optimizer in optimizers}
    if scaler.is_enabled():
        optimizer_states["optimizer"]["grad_scaler"] = scaler.state_dict()  # the fp16 loss scale
    return {
        "model": model.state_dict(),
        **optimizer_states,
        "config": model.config.shape(),
        "train_config": asdict(train_config),
        "step": step,
        "val_loss": val_loss,
        "loader": loader_position,  # the global token position in the training stream
        "rng": rng_state(device),
        **({"wandb_run": wandb_run} if wandb_run else {}),
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
    if state["train_config"].get("optimizer") == "muon" and not isinstance(state.get("muon"), dict):
        raise UserError(f"{path} cannot resume training: it was trained with Muon but holds no 'muon' entry")


def restore_training_state(state, path, optimizers, scaler, loader, device, weight_decay):
    """Put the optimizers, loss scale, data position and random numbers back as they were after update `step`."""
    scaler_state = state["optimizer"].get("grad_scaler")
    try:
        for optimizer in optimizers:
            saved = {key: value for key, value in state[optimizer_key(optimizer)].items() if key != "grad_scaler"}
            optimizer.load_state_dict(shard_like_parameters(saved, optimizer))
            optimizer.param_groups[0]["weight_decay"] = weight_decay  # group 0 decays; WEIGHT_DECAY may have changed
        if scaler_state and scaler.is_enabled():
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(state["rng"]["cpu"])
        if device.startswith("cuda") and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        elif device == "mps" and "mps" in state["rng"]:
            torch.mps.set_rng_state(state["rng"]["mps"])
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as error:
        raise UserError(f"{path} holds an optimizer state this model cannot use: {reason(error)}") from None
    loader.position = state["loader"] % loader.total


def shard_like_parameters(optimizer_state, optimizer):
    """The optimizer state with each whole per-parameter tensor (exp_avg, ...) cut into this rank's
    shard of its parameter, where FSDP has sharded the parameters (a DTensor); unchanged otherwise.
    Each rank reads its own rows only: of tensors mapped from a file, nothing more is read."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(hasattr(p, "device_mesh") for p in parameters):  # no DTensor (whose modules take 2 s to import)
        return optimizer_state
    from torch.distributed.tensor import DTensor

    def cut(value, p):
        if type(value) is not torch.Tensor:  # a DTensor a .dcp filled in already, or a number
            return value
        if isinstance(p, DTensor) and value.shape == p.shape:  # exp_avg, exp_avg_sq
            rows = local_rows(value, p).to(p.device, copy=True)
            return DTensor.from_local(rows, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return value.clone()  # step: a copy, so that nothing keeps a mapped file open

    sharded = {index: {key: cut(value, parameters[index]) for key, value in per_parameter.items()}
               for index, per_parameter in optimizer_state["state"].items()}
    return {**optimizer_state, "state": sharded}


def local_rows(whole, sharded):
    """Return this rank's rows of the whole tensor `whole`, as FSDP cuts the DTensor `sharded`
    (along the first dimension, as torch.chunk does; a rank past the last chunk holds none). A view:
    of a tensor mapped from a file, only those rows are ever read."""
    chunks = whole.chunk(sharded.device_mesh.size(), dim=0)
    rank = sharded.device_mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else whole[:0]


def load_into_shards(state, path, model, optimizers):
    """Fill a model built on the meta device and sharded by FSDP, from a checkpoint loaded lazily
    (load(lazily=True)), each rank reading its own part only, never the whole training state: a .pt
    file's weights as the rows of its tensors mapped from the file (restore_training_state cuts the
    optimizer's the same way); a .dcp's weights and optimizer tensors through DCP, which reads each
    rank's chunks straight into its shards, resharding when the number of ranks changed. The
    optimizer's tensors are left in state, where restore_training_state takes them."""
    if "model" in state:
        try:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.to_local().copy_(local_rows(state["model"][name], p))
        except (KeyError, RuntimeError) as error:
            raise UserError(f"{path} does not hold a GPT model this code can load: {reason(error)}") from None
        return
    import torch.distributed.checkpoint as dcp

    reader = safe_reader(path)
    wanted = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}  # the shards themselves
    (optimizer,) = optimizers  # under FSDP AdamW alone
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = {}
    metadata = reader.read_metadata().state_dict_metadata
    try:
        for key, item in metadata.items():
            if key.startswith("optimizer."):
                index, name = key[len("optimizer."):].split(".", 1)
                p = parameters[int(index)]
                like_p = tuple(item.size) == tuple(p.shape)  # exp_avg and exp_avg_sq, cut as p is; step is a scalar
                value = torch.empty_like(p) if like_p else torch.empty(item.size, dtype=item.properties.dtype)
                wanted[key] = per_parameter.setdefault(int(index), {})[name] = value
        dcp.load(wanted, storage_reader=reader)
    except (IndexError, ValueError) as error:
        raise UserError(f"{path} holds an optimizer state this model cannot use: {reason(error)}") from None
    except Exception as error:  # DCP's CheckpointException: a missing or truncated shard file
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {reason(error)})") from None
    state["optimizer"]["state"] = per_parameter
