"""metrics.csv across versions: a file written before the last column was added still resumes,
reads and plots."""

import csv
import math

import pandas
import pytest

import metrics
import plot_metrics
from env import UserError

OLD_COLUMNS = ["step", "loss", "val_loss", "hellaswag_acc", "lr", "norm", "dt_ms", "tok_per_sec", "mfu"]


def old_rows(steps):
    """Rows as the nine-column train.py wrote them: validation every other step, no HellaSwag."""
    return [[str(step), f"{10 / (1 + step / 10):.4f}", f"{10.5 / (1 + step / 10):.4f}" if step % 2 == 0 else "",
             "", f"{6e-4 * (step + 1) / 6:.6g}", "1.5", "120.5", "8500.0", "0.012"] for step in steps]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_the_new_column_is_last():
    assert metrics.COLUMNS == OLD_COLUMNS + ["peak_mem_mib"]


def test_resume_carries_an_older_files_rows_over_with_a_blank_new_cell(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, OLD_COLUMNS, old_rows(range(6)))
    f = metrics.open_for_run(str(path), keep_through=3)
    metrics.append(f, [4, 8.0, "", "", 4e-4, 1.2, 118.0, 8600.0, 0.013, 2048.5])
    f.close()
    assert read_csv(path) == [metrics.COLUMNS, *[row + [""] for row in old_rows(range(4))],
                              ["4", "8.0", "", "", "0.0004", "1.2", "118.0", "8600.0", "0.013", "2048.5"]]


def test_resume_keeps_the_current_headers_rows_as_they_are(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [row + [str(1000 + i)] for i, row in enumerate(old_rows(range(6)))]
    write_csv(path, metrics.COLUMNS, rows)
    metrics.open_for_run(str(path), keep_through=3).close()
    assert read_csv(path) == [metrics.COLUMNS, *rows[:4]]


@pytest.mark.parametrize("header", [["step", "loss", "val_loss"], ["epoch", *OLD_COLUMNS[1:]],
                                    [*metrics.COLUMNS, "later"], []])
def test_resume_keeps_nothing_of_a_header_that_is_not_ours(tmp_path, header):
    path = tmp_path / "metrics.csv"
    write_csv(path, header, [row[:len(header)] for row in old_rows(range(6))])
    metrics.open_for_run(str(path), keep_through=3).close()
    assert read_csv(path) == [metrics.COLUMNS]


def test_read_gives_an_older_file_the_new_column_as_nan(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, OLD_COLUMNS, old_rows(range(6)))
    frame = metrics.read(str(path))
    assert list(frame.columns) == metrics.COLUMNS and len(frame) == 6
    assert frame["peak_mem_mib"].isna().all() and math.isclose(frame["loss"][5], 10 / 1.5, rel_tol=1e-4)


def test_read_still_refuses_a_file_without_an_old_column(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, [name for name in metrics.COLUMNS if name != "mfu"], [["0"] * 9])
    with pytest.raises(UserError, match=r"not a metrics.csv written by train.py \(no column mfu\)"):
        metrics.read(str(path))


def test_plot_draws_an_older_file(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, OLD_COLUMNS, old_rows(range(120)))
    for name, frame in [("raw.png", pandas.read_csv(path)), ("read.png", metrics.read(str(path)))]:
        plot_metrics.plot(frame, tmp_path / name)
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
