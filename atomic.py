"""A file written here is either complete or absent: checkpoints, shards, meta.json, metrics.csv
and the HellaSwag download all go through `atomic_write`.

A crash, a kill or a full disk in the middle of a write leaves at most a temporary file
(`NAME.tmpPID`, which the next run may delete), never a half-written file under the real name.
"""

import contextlib
import os


def temporary_name(path):
    """Return where `atomic_write` writes before the rename: beside `path`, unique to this process."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_args):
    """Open a temporary file for writing; once the block ends, flush it to disk and rename it to
    `path`. If the block raises, the temporary file is deleted and `path` is left as it was."""
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
