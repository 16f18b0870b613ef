"""The on-disk token dataset: `.npy` uint16 shards plus a `meta.json` written last.

dataset.py writes it; train.py and peek_dataset.py read it. Readers take the shard list from
meta.json, never from a glob, so a half-written dataset (no meta.json) is never trained on.
"""

import json
import os

import numpy as np

from env import UserError

META = "meta.json"
SPLITS = ("train", "val")


def shard_name(split, index):
    return f"{split}_{index:06d}.npy"


def write_meta(dataset_path, meta):
    """Atomically write meta.json: its presence is what marks the dataset complete."""
    tmp = os.path.join(dataset_path, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(dataset_path, META))


def read_meta(dataset_path):
    """meta.json of a complete dataset, or a UserError telling the user to run dataset.py."""
    path = os.path.join(dataset_path, META)
    if not os.path.isfile(path):
        hint = "it is incomplete (no meta.json)" if os.path.isdir(dataset_path) else "it does not exist"
        raise UserError(f"no complete dataset at {dataset_path} ({hint}): run `uv run dataset.py` first "
                        f"(HF_DATASET_NAME=demo for the offline demo corpus), or set DATASET_PATH")
    try:
        with open(path) as f:
            meta = json.load(f)
        for split in SPLITS:
            meta["splits"][split]["shards"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is corrupt: rebuild the dataset with FORCE=1 uv run dataset.py") from None
    return meta


def shard_paths(dataset_path, split, meta=None):
    """Paths of a split's shards, in order, as listed in meta.json; each must exist."""
    meta = meta or read_meta(dataset_path)
    paths = [os.path.join(dataset_path, name) for name in meta["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"dataset at {dataset_path} is missing {missing[0]}: rebuild it with FORCE=1 uv run dataset.py")
    return paths


def load_shard(path):
    """A shard as a read-only memory map: no copy, and the OS pages it in as needed."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise UserError(f"shard {path} is unreadable ({error}): rebuild with FORCE=1 uv run dataset.py") from None
