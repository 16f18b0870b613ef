"""Write and read the on-disk token dataset: `.npy` uint16 shards plus a `meta.json` written last.

dataset.py writes it; train.py (through `TokenLoader`) and peek_dataset.py read it. Readers take the
shard list from meta.json, never from a glob, so a half-written dataset (no meta.json) is never
trained on.
"""

import json
import os

import numpy as np

from atomic import atomic_write
from env import UserError, reason

META = "meta.json"
SPLITS = ("train", "val")


def shard_name(split, index):
    """Return the file name of a split's shard number `index`."""
    return f"{split}_{index:06d}.npy"


def write_meta(dataset_path, meta):
    """Atomically write meta.json: its presence is what marks the dataset complete."""
    with atomic_write(os.path.join(dataset_path, META), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(dataset_path):
    """Return meta.json of a complete dataset; raise a UserError telling the user to run dataset.py
    when there is none, or to rebuild it when it is corrupt."""
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
    """Return the paths of a split's shards, in order, as listed in meta.json; each must exist."""
    meta = meta or read_meta(dataset_path)
    paths = [os.path.join(dataset_path, name) for name in meta["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"dataset at {dataset_path} is missing {missing[0]}: rebuild it with FORCE=1 uv run dataset.py")
    return paths


def load_shard(path):
    """Open a shard as a read-only memory map: no copy, and the OS pages it in as needed."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise UserError(f"shard {path} is unreadable ({reason(error)}): "
                        "rebuild with FORCE=1 uv run dataset.py") from None


class TokenLoader:
    """Serves batches of (inputs, targets) from one split, read straight from the memory-mapped shards.

    The split's shards form one token stream that wraps around at its end. `position` is the global
    token position: where the next group of micro-batches starts, counted over all ranks together.
    Rank r takes micro-batch r of every group of `world_size`, so 2 ranks see together exactly what 1
    rank sees in 2 consecutive micro-batches, and a saved position resumes the same stream under any
    world size.
    """

    def __init__(self, dataset_path, split, batch_size, seq_length, rank=0, world_size=1, verbose=True):
        paths = shard_paths(dataset_path, split)
        if verbose:
            print(f"found {len(paths)} shards for split {split}")
        self.shards = [load_shard(path) for path in paths]
        self.ends = np.cumsum([len(shard) for shard in self.shards])  # stream offset where each shard ends
        self.total = int(self.ends[-1]) if paths else 0
        if self.total < 2:
            raise UserError(f"split {split} of {dataset_path} holds no tokens: "
                            "rebuild it with FORCE=1 uv run dataset.py")
        self.batch_size, self.seq_length = batch_size, seq_length
        self.rank, self.world_size = rank, world_size
        self.position = 0

    def _read(self, start, count):
        """Return `count` tokens of the stream from `start`, crossing shard ends and wrapping at the end."""
        pieces = []
        start %= self.total
        while count > 0:
            index = int(np.searchsorted(self.ends, start, side="right"))
            offset = start - (int(self.ends[index - 1]) if index else 0)
            piece = self.shards[index][offset:offset + count]
            pieces.append(piece)
            count -= len(piece)
            start = (start + len(piece)) % self.total
        return np.concatenate(pieces).astype(np.int64)

    def next_batch(self):
        import torch  # here, not at the top: dataset.py and peek_dataset.py never need torch

        B, T = self.batch_size, self.seq_length
        tokens = torch.from_numpy(self._read(self.position + self.rank * B * T, B * T + 1))
        self.position = (self.position + B * T * self.world_size) % self.total
        return tokens[:-1].view(B, T), tokens[1:].view(B, T)  # the targets are the next tokens
