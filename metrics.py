"""metrics.csv: one row per update, written by train.py, drawn by plot_metrics.py.

Its columns are COLUMNS; `val_loss` and `hellaswag_acc` are filled where they were measured,
`peak_mem_mib` (the update's peak memory) where it is known. Columns are only ever added at the
end, so a file from an older version still reads, and a resumed run carries its rows over.
"""

import csv
import io
import os

from atomic import atomic_write
from env import UserError, reason

FIRST = ["step", "loss", "val_loss", "hellaswag_acc", "lr", "norm", "dt_ms", "tok_per_sec", "mfu"]  # the first file's
COLUMNS = FIRST + ["peak_mem_mib"]


def is_ours(header):
    """Return True for a header train.py wrote: COLUMNS, or an older version's, which COLUMNS extends."""
    return len(FIRST) <= len(header) <= len(COLUMNS) and header == COLUMNS[:len(header)]


def open_for_run(path, keep_through=None):
    """Open metrics.csv for appending: a new file, or (on resume) the rows up to `keep_through`,
    those of an older header given blank cells in the columns added since.

    The kept rows are written through a temporary file that replaces the old one, so a crash here
    never leaves a half-written metrics.csv.
    """
    rows = []
    if keep_through is not None and os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if is_ours(header):
                blanks = [""] * (len(COLUMNS) - len(header))
                rows = [row + blanks for row in reader if len(row) == len(header) and row[0].isdigit()
                        and int(row[0]) <= keep_through]
    try:
        with atomic_write(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
    except OSError as error:
        raise UserError(f"cannot write {path} in LOG_DIR {os.path.dirname(path) or '.'}: {reason(error)}") from None
    return open(path, "ab", buffering=0)  # unbuffered: append() knows exactly what reached the file


def last_step(path):
    """Return the step of metrics.csv's last row, or None (no file, or no rows): what a tracker
    was sent up to, before a resume cuts the rows past its checkpoint."""
    try:
        with open(path, newline="") as f:
            steps = [row[0] for row in csv.reader(f) if row and row[0].isdigit()]
    except OSError:
        return None
    return int(steps[-1]) if steps else None


def append(f, row):
    """Append one row to metrics.csv opened by open_for_run, whole or not at all: a write that
    fails (a full disk, a quota) is cut off again, so the file ends with its last whole row."""
    text = io.StringIO()
    csv.writer(text).writerow(row)
    data = text.getvalue().encode()
    end = f.seek(0, os.SEEK_END)
    try:
        while data:
            data = data[f.write(data):]
    except OSError as error:
        f.truncate(end)
        raise UserError(f"cannot write {f.name} in LOG_DIR {os.path.dirname(f.name) or '.'}: "
                        f"{reason(error)}") from None


def read(path):
    """Return metrics.csv as a DataFrame with every column of COLUMNS (NaN where an older file lacks
    one); raise a UserError when it is missing, empty or not train.py's."""
    import pandas  # only plot_metrics.py reads it back: train.py starts without pandas

    if not os.path.isfile(path):
        raise UserError(f"no metrics at {path}: run train.py first (it writes metrics.csv into LOG_DIR)")
    try:
        frame = pandas.read_csv(path)
    except pandas.errors.EmptyDataError:
        frame = pandas.DataFrame()
    except (pandas.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a metrics.csv written by train.py: {reason(error)}") from None
    if frame.empty:
        raise UserError(f"{path} holds no rows yet: let train.py finish at least one step")
    missing = [name for name in FIRST if name not in frame.columns]
    if missing:
        raise UserError(f"{path} is not a metrics.csv written by train.py (no column {missing[0]})")
    for name in COLUMNS[len(FIRST):]:
        if name not in frame.columns:
            frame[name] = float("nan")
    return frame
