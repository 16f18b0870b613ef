"""evaluate.py: the report, eval_results.pt, bad inputs, --hf-model, and torchrun."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import device
import evaluate
import hellaswag
import hub
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    """A LOG_DIR holding a tiny checkpoint, and a clean environment for evaluate.py."""
    for name in ("HELLASWAG_LIMIT", "DEVICE", "DTYPE", "SEED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("DTYPE", "float32")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    save(model, 0, tmp_path / "model_00000.pt")
    return tmp_path


def save(model, step, path):
    checkpoint.save({"model": model.state_dict(), "config": model.config.shape(), "step": step}, path)


def run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    evaluate.main()


def fails(monkeypatch, capsys, *args, code=1):
    with pytest.raises(SystemExit) as exit:
        run(monkeypatch, *args)
    assert exit.value.code == code
    err = capsys.readouterr().err
    return err.strip().splitlines()[-1]


def test_report_and_saved_results(real_file, log_dir, monkeypatch, capsys):
    torch.manual_seed(1)
    newer = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    save(newer, 10, log_dir / "model_00010.pt")
    monkeypatch.setenv("HELLASWAG_LIMIT", "40")
    run(monkeypatch, "--seed", "3")
    out = capsys.readouterr().out
    lines = out.splitlines()
    order = [f"Loading checkpoint from {log_dir / 'model_00010.pt'}", "Initializing model...",
             "Model loaded successfully!", "Evaluating on HellaSwag validation set...", "Overall Results:",
             "Accuracy by Split Type:",
             "Detailed Analysis of 5 Random Examples:", f"Detailed results saved to {log_dir / 'eval_results.pt'}"]
    where = [lines.index(line) for line in order]
    assert where == sorted(where)

    saved = torch.load(log_dir / "eval_results.pt", weights_only=True)
    expected = hellaswag.evaluate(newer, device.setup("cpu", "float32"), hellaswag.load_examples(40))
    assert torch.equal(saved["pred_norm"], expected.pred_norm) and torch.equal(saved["pred"], expected.pred)
    torch.testing.assert_close(saved["sum_nll"], expected.sum_nll)
    assert saved["sum_nll"].shape == saved["norm_nll"].shape == (40, 4) and saved["total"] == 40
    assert f"Total Accuracy: {expected.acc_norm:.4f} ({expected.correct_norm}/40)" in lines
    assert f"Unnormalized Accuracy: {expected.acc:.4f} ({expected.correct}/40)" in lines
    by_type = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^(\w+): [\d.]+ \((\d+)/(\d+)\)$", out, re.M)}
    assert sum(n for _, n in by_type.values()) == 40 and sum(c for c, _ in by_type.values()) == expected.correct_norm
    assert set(by_type) == set(saved["split_types"]) == {"indomain", "zeroshot"}
    assert out.count("Context: ") == 5
    assert len(re.findall(r"^  [0-3]: .* \(score: [\d.]+, sum: [\d.]+\)$", out, re.M)) == 20
    assert len(re.findall(r"^Predicted: [0-3] \((right|wrong)\)\nCorrect: [0-3]$", out, re.M)) == 5


def test_hf_model_scores_like_the_converted_checkpoint(real_file, log_dir, tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    hf_config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    converted = GPT.from_hf(GPT2LMHeadModel.from_pretrained(tmp_path / "hf"))
    path = tmp_path / "converted.pt"
    save(converted, 0, path)
    results = {}
    for source in (["--hf-model", str(tmp_path / "hf")], ["--checkpoint", str(path)]):
        run(monkeypatch, *source, "--limit", "24", "--variant", "lm-eval")
        results[source[0]] = torch.load(log_dir / "eval_results.pt", weights_only=True)
    assert f"Loading Hugging Face model {tmp_path / 'hf'}" in capsys.readouterr().out
    hf, ours = results.values()
    torch.testing.assert_close(hf["sum_nll"], ours["sum_nll"], rtol=0, atol=1e-5)
    assert torch.equal(hf["pred_norm"], ours["pred_norm"]) and hf["variant"] == "lm-eval"


def test_bad_inputs_exit_with_one_line(log_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "hs").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip file at all")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name in ("nope.pt", "corrupt.pt", "other.pt"):  # the wording is checkpoint.py's
        assert re.match(f"Error: .*{name}", fails(monkeypatch, capsys, "--checkpoint", str(tmp_path / name)))
    assert "--limit must be" in fails(monkeypatch, capsys, "--limit", "-5")
    assert "--batch-size must be >= 1" in fails(monkeypatch, capsys, "--batch-size", "0")
    fails(monkeypatch, capsys, "--variant", "harness", code=1)
    monkeypatch.setenv("HELLASWAG_LIMIT", "many")
    assert "HELLASWAG_LIMIT must be an integer" in fails(monkeypatch, capsys)
    monkeypatch.setenv("HELLASWAG_LIMIT", "10")
    monkeypatch.setenv("DTYPE", "float8")
    assert "DTYPE must be" in fails(monkeypatch, capsys)
    monkeypatch.setenv("DTYPE", "float32")
    assert f"no checkpoint in {tmp_path / 'hs'}/" in fails(monkeypatch, capsys, "--checkpoint", str(tmp_path / "hs"))
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "empty"))
    assert "no checkpoint in" in fails(monkeypatch, capsys)


def test_offline_without_hellaswag_data(log_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "hs"))
    line = fails(monkeypatch, capsys)
    assert line.startswith("Error: no HellaSwag validation data at") and "HELLASWAG_PATH=" in line
    assert "cannot reach" in fails(monkeypatch, capsys, "--hf-model", "gpt2")


def test_torchrun_splits_the_examples(real_file, log_dir, monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HELLASWAG_LIMIT": "30"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
               "--checkpoint", str(log_dir)]  # a folder: its newest checkpoint
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Overall Results:") == 1 and done.stdout.count("Model loaded successfully!") == 1
    saved = torch.load(log_dir / "eval_results.pt", weights_only=True)
    model, _ = checkpoint.load_model(str(log_dir / "model_00000.pt"))
    alone = hellaswag.evaluate(model, device.setup("cpu", "float32"), hellaswag.load_examples(30))
    torch.testing.assert_close(saved["sum_nll"], alone.sum_nll)
    assert saved["correct_norm"] == alone.correct_norm and saved["total"] == 30
