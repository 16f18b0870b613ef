"""generate.py: the model from TESTING_MODEL_PATH or LOG_DIR, the original output, the sampling
settings from the environment, and one-line errors."""

import pytest
import torch

import checkpoint
import generate
from model import GPT, GPTConfig
from settings import SamplingConfig
from sampling import generate as sample
from tokenizer import EOT, decode, encode


def save_tiny_model(path, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    checkpoint.save({"model": model.state_dict(), "config": model.config.shape(), "step": 0}, path)
    return model.eval()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment: no checkpoint set, an empty LOG_DIR, CPU in float32, few tokens."""
    for name in ("TESTING_MODEL_PATH", "TEMPERATURE", "TOP_K", "TOP_P", "SEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "log"))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("DTYPE", "float32")
    monkeypatch.setenv("MAX_NEW_TOKENS", "12")
    return monkeypatch


def run(capsys):
    generate.main()
    return capsys.readouterr().out


def test_demo_prints_the_original_lines(env, tmp_path, capsys):
    path = str(tmp_path / "tiny.pt")
    model = save_tiny_model(path)
    env.setenv("TESTING_MODEL_PATH", path)
    env.setenv("TEMPERATURE", "0")
    lines = run(capsys).splitlines()
    assert lines[:8] == ["Starting model generation demo...", "Using device: cpu", "Loading checkpoint...",
                         f"Loaded checkpoint from {path}", "Initializing model...", "Model loaded successfully!",
                         "", "Example 1: Direct text generation"]
    assert lines[8] == f"Prompt: {generate.PROMPT}"
    # greedy: the response is the prompt and exactly what the sampler continues it with
    ids = encode(generate.PROMPT)
    expected = decode(ids + sample(model, [EOT] + ids, 12, temperature=0)[0])
    response = "\n".join(lines[9:lines.index("-" * 60) - 1])
    assert response == f"Response: {expected}"
    rest = lines[lines.index("-" * 60):]
    assert rest[1:4] == ["", "Example 2: Question answering", f"Question: {generate.QUESTION}"]
    assert rest[4] == f"Response: Question: {generate.QUESTION}"
    assert rest[5].startswith("Answer:")


def test_newest_checkpoint_in_log_dir_and_seed(env, tmp_path, capsys):
    log = tmp_path / "log"
    log.mkdir()
    save_tiny_model(str(log / "model_00009.pt"), seed=1)
    save_tiny_model(str(log / "model_00010.pt"), seed=2)
    first = run(capsys)
    assert f"Loaded checkpoint from {log / 'model_00010.pt'}" in first
    assert run(capsys) == first  # SEED fixes the samples
    env.setenv("SEED", "7")
    assert run(capsys) != first


def test_missing_checkpoint_is_one_line(env, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        generate.main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"Error: no checkpoint in {tmp_path / 'log'}/: train one with train.py, or set TESTING_MODEL_PATH\n"

    env.setenv("TESTING_MODEL_PATH", str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit) as exit:
        generate.main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"Error: checkpoint {tmp_path / 'nope.pt'} does not exist\n"


@pytest.mark.parametrize("name, value, message", [
    ("TEMPERATURE", "hot", "TEMPERATURE must be a number, got 'hot'"),
    ("TEMPERATURE", "-1", "TEMPERATURE must be >= 0.0, got '-1'"),
    ("TOP_K", "-5", "TOP_K must be >= 0, got '-5'"),
    ("TOP_P", "1.5", "TOP_P must be in (0, 1], got 1.5"),
    ("MAX_NEW_TOKENS", "0", "MAX_NEW_TOKENS must be >= 1, got '0'"),
])
def test_bad_settings_are_one_line(env, capsys, name, value, message):
    env.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        generate.main()
    assert exit.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == f"Error: {message}\n" and captured.out == ""  # refused before any loading


def test_sampling_config_from_env(env):
    env.delenv("MAX_NEW_TOKENS")
    assert SamplingConfig.from_env() == SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=200, seed=1337)
    for name, value in [("TEMPERATURE", "0"), ("TOP_K", "0"), ("TOP_P", "1"), ("MAX_NEW_TOKENS", "1e3"), ("SEED", "42")]:
        env.setenv(name, value)
    assert SamplingConfig.from_env() == SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=1000, seed=42)
