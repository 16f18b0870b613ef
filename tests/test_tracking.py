"""tracking.py: train.py's numbers in TensorBoard and in W&B (offline), read back with each tool's
own reader, through a resume after a crash that lost the newest checkpoint."""

import glob
import json
import struct
import time

import numpy as np
import pytest
import torch

import checkpoint
import metrics
import tracking
from model import GPT
from settings import GPTConfig, TrainConfig
from test_train import read_metrics, run_train


def tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} as TensorBoard shows them (its reader hides purged points)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def csv_scalars(log_dir):
    """metrics.csv the same way: every column's measured values, as float32."""
    rows = read_metrics(log_dir)
    columns = {column: [(int(r["step"]), np.float32(r[column])) for r in rows if r[column]] for column in metrics.COLUMNS[1:]}
    return {column: points for column, points in columns.items() if points}


def test_tensorboard_has_metrics_csv_and_after_a_lost_checkpoint_each_step_once(token_dataset, tmp_path, monkeypatch):
    run_train(monkeypatch, token_dataset, tmp_path, TRACKER="tensorboard", SAMPLE_INTERVAL=3)
    scalars, events = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == csv_scalars(tmp_path) and {"loss", "val_loss", "lr", "tok_per_sec"} <= set(scalars)
    assert {"configuration/text_summary", "samples/text_summary"} <= set(events.Tags()["tensors"])
    assert "| n_layer | 2 |" in events.Tensors("configuration/text_summary")[0].tensor_proto.string_val[0].decode()

    (tmp_path / "model_00005.pt").unlink()  # the crash: updates 3 to 5 are in the curves, not in a checkpoint
    run_train(monkeypatch, token_dataset, tmp_path, TRACKER="tensorboard", RESUME="1", MAX_LR="2e-3")
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == csv_scalars(tmp_path)  # steps 0 to 5 once each, 3 to 5 the resumed run's
    assert [step for step, _ in scalars["loss"]] == list(range(6))

    run_train(monkeypatch, token_dataset, tmp_path, TRACKER="tensorboard", FORCE="1", MAX_STEPS=2)  # starting over
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == csv_scalars(tmp_path) and [step for step, _ in scalars["loss"]] == [0, 1]


def wandb_runs(log_dir):
    """Every offline run under log_dir/wandb, oldest first, read from its .wandb file with W&B's own
    protobuf records: {"id", "group", "name", "config", "summary", "steps"}."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(glob.glob(str(log_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, position, pending, records = open(path, "rb").read(), 7, b"", []
        while position + 7 <= len(data):  # LevelDB's log format: 32 KiB blocks of checksummed pieces
            if 32768 - position % 32768 < 7:
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # whole, or the last piece
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
        run = {"config": {}, "summary": {}, "steps": [], "logged": {}}
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, name=record.run.display_name,
                           started=record.run.start_time.ToNanoseconds())
                run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                keys = {item.key or item.nested_key[0]: item.value_json for item in record.history.item}
                run["steps"].append(int(keys["_step"]))
                run["logged"][int(keys["_step"])] = set(keys)
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
            elif kind == "summary":
                for item in record.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    run["summary"][key] = json.loads(item.value_json)
        runs.append(run)
    return sorted(runs, key=lambda run: run["started"])  # (folder names tell the second only)


def test_wandb_offline_resumes_its_run_and_after_a_lost_checkpoint_starts_one_beside_it(token_dataset, tmp_path,
                                                                                         monkeypatch, capsys):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not logged in: offline, without trying the network
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    log_dir = tmp_path / "log"
    run_train(monkeypatch, token_dataset, log_dir, TRACKER="wandb", MAX_STEPS=3, WANDB_PROJECT="tests")
    out = capsys.readouterr().out
    assert "W&B: not logged in (wandb login, or WANDB_API_KEY): logging offline; upload the run later with: " \
           "uv run --extra wandb wandb sync " in out
    run_train(monkeypatch, token_dataset, log_dir, TRACKER="wandb", RESUME="1", WANDB_PROJECT="tests")  # to step 5
    (log_dir / "model_00005.pt").unlink()  # the crash: W&B holds updates 3 to 5, no checkpoint does
    run_train(monkeypatch, token_dataset, log_dir, TRACKER="wandb", RESUME="1", WANDB_PROJECT="tests")

    first, resumed, beside = wandb_runs(log_dir)
    assert resumed["id"] == first["id"] == first["group"]  # nothing replayed: the same W&B run goes on
    assert (first["steps"], resumed["steps"]) == ([0, 1, 2], [3, 4, 5])
    assert beside["id"] != first["id"] and beside["group"] == first["group"]
    assert beside["name"] == f"{first['id']} from step 3" and beside["steps"] == [3, 4, 5]  # replayed, not dropped
    assert first["config"]["n_layer"] == 2 and first["config"]["tracker"] == "wandb" and first["config"]["parameters"] > 0
    assert [run["exit_code"] for run in (first, resumed, beside)] == [0, 0, 0]
    assert {"samples", "loss", "val_loss"} <= beside["logged"][5]  # the final samples with the last row
    assert checkpoint.load(str(log_dir / "model_00005.pt"))["wandb_run"] == \
           {"id": beside["id"], "group": first["group"], "name": beside["name"]}  # the run a next resume continues
    last = read_metrics(log_dir)[-1]
    assert {column: np.float32(beside["summary"][column]) for column in metrics.COLUMNS[1:] if last[column]} == \
           {column: np.float32(last[column]) for column in metrics.COLUMNS[1:] if last[column]}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process: the intent
def test_the_wandb_run_is_kept_in_both_checkpoint_forms(tmp_path):
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizers = model.configure_optimizers(0.1, 1e-3, "cpu", verbose=False, optimizer="adamw")
    run = {"id": "a1b2c3d4", "group": "a1b2c3d4", "name": "a1b2c3d4 from step 3"}
    state = checkpoint.training_state(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), TrainConfig(), 3,
                                      None, 0, "cpu", wandb_run=run)
    for name in ("model_00003.pt", "model_00003.dcp"):
        checkpoint.save(state, str(tmp_path / name))
        assert checkpoint.load(str(tmp_path / name))["wandb_run"] == run


def test_no_secret_goes_into_the_configuration(tmp_path):
    tracker = tracking.start("tensorboard", str(tmp_path), "tests", {"n_layer": 2, "serve_api_key": "s3cret",
                                                                      "hub_token": "t0ken"}, 0, None, False)
    tracker.close()
    _, events = tensorboard_scalars(tmp_path / "tensorboard")
    table = events.Tensors("configuration/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| n_layer | 2 |" in table and "s3cret" not in table and "t0ken" not in table


def test_a_run_ends_in_the_tracker_as_it_ended():
    ends = []

    class Backend:
        def close(self, code):
            ends.append(code)

    for error in (None, SystemExit(143), SystemExit(130), RuntimeError("a bug")):
        tracking.Tracker("wandb", Backend()).close(error)
    assert ends == [0, 143, 130, 1]


def test_the_wandb_probe_waits_3_seconds_at_most(tmp_path, monkeypatch):
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret-key\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "WANDB_PROBE_SECONDS", 0.2)
    monkeypatch.setattr(tracking.hub, "answers", lambda url, timeout: time.sleep(5) or True)  # a name lookup that hangs
    started = time.perf_counter()
    assert tracking.why_offline() == "api.wandb.ai cannot be reached"
    assert time.perf_counter() - started < 2


def test_a_tracker_that_fails_mid_run_is_one_warning_and_training_goes_on(token_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    calls = []

    def log(self, step, row, texts):
        calls.append(step)
        if step == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.TensorBoard, "log", log)
    run_train(monkeypatch, token_dataset, tmp_path, TRACKER="tensorboard")
    err = capsys.readouterr().err
    assert err.count("Warning: TRACKER=tensorboard failed") == 1 and "No space left on device" in err
    assert calls == [0, 1, 2]  # off after its failure
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == list(range(6))
    assert (tmp_path / "model_00005.pt").exists()


@pytest.mark.parametrize("value, message", [
    ("wandb", "TRACKER=wandb needs the wandb package, which is not installed: run uv run --extra wandb train.py"),
    ("mlflow", "TRACKER must be none, tensorboard, wandb, got 'mlflow'"),
])
def test_a_tracker_that_cannot_run_stops_before_any_work(token_dataset, tmp_path, monkeypatch, capsys, value,
                                                         message):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stopped:
        run_train(monkeypatch, token_dataset, tmp_path, TRACKER=value)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and err == f"Error: {message}"
    assert not (tmp_path / "metrics.csv").exists()
