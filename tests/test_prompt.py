"""prompt.py driven through its standard input: commands, questions in the training format, the
streamed answer and where it stops, and clean exits."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import prompt
from model import GPT, GPTConfig
from settings import SamplingConfig
from tokenizer import EOT, encode, get_encoding

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, checkpoint path) of a tiny randomly initialised model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    path = str(tmp_path_factory.mktemp("prompt") / "tiny.pt")
    checkpoint.save({"model": model.state_dict(), "config": model.config.shape(), "step": 0}, path)
    return model, path


@contextlib.contextmanager
def scripted(model, text):
    """Make `model` answer with `text` (then <|endoftext|>) whatever the question: its logits are forced."""
    ids = encode(text) + [EOT]
    steps = []

    def new_prompt(module, inputs):
        if inputs[0].size(1) > 1:  # a prompt, not one new token: a new answer starts
            steps.clear()

    def force(module, inputs, output):
        output[:, ids[min(len(steps), len(ids) - 1)]] = 1e4
        steps.append(1)

    handles = [model.transformer.wte.register_forward_pre_hook(new_prompt), model.lm_head.register_forward_hook(force)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def chat(monkeypatch, capsys, model, typed, settings=None):
    """Run the REPL on `typed` as standard input; its output."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    prompt.repl(model, settings or SamplingConfig(), torch.Generator().manual_seed(0))
    return capsys.readouterr().out


def test_startup_banner_settings_and_a_question(tiny, monkeypatch, capsys):
    model, path = tiny
    monkeypatch.setenv("TESTING_MODEL_PATH", path)
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_NEW_TOKENS", "5")
    seen, original = [], prompt.stream

    def spy(model, ids, *args, **kwargs):
        seen.append((ids, args, kwargs))
        return original(model, ids, *args, **kwargs)

    monkeypatch.setattr(prompt, "stream", spy)
    typed = "temp 0.5\ntemp 5\ntemp abc\ntemp nan\ntokens 0\ntokens 1.5\ntokens\ntokens 7\n\nWhat is 1+1?\nquit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    prompt.main()  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith("Loading model...\nUsing device: cpu\nLoading checkpoint...\n"
                          f"Loaded checkpoint from {path}\nInitializing model...\nModel loaded successfully!\n" + prompt.BANNER)
    for line in ["Tiny Physics GPT Chatbot", "Type 'quit' to exit", "Type 'temp X' to change temperature (0.1-2.0)",
                 "Type 'tokens X' to change max tokens (1-1000)"]:
        assert f"\n{line}\n" in out
    answers = ["Temperature set to 0.5", "Temperature must be between 0.1 and 2.0, got 5",
               "Temperature must be a number from 0.1 to 2.0 (type 'temp X'), got 'abc'",
               "Temperature must be between 0.1 and 2.0, got nan", "Max tokens must be between 1 and 1000, got 0",
               "Max tokens must be a number from 1 to 1000 (type 'tokens X'), got '1.5'",
               "Max tokens must be a number from 1 to 1000 (type 'tokens X'), got ''", "Max tokens set to 7"]
    for command, answer in zip(typed.splitlines(), answers):
        assert f"\nYou: {command}\n{answer}\n" in out  # piped input is echoed
    assert "\nYou: What is 1+1?\n\nBot: " in out and out.endswith("\nYou: quit\nGoodbye!\n")
    # the question in the training format, after <|endoftext|>, with the settings just chosen
    [(ids, args, kwargs)] = seen
    assert ids == [EOT] + encode("Question: What is 1+1?\nAnswer:")
    assert args == (7,) and kwargs["temperature"] == 0.5 and (kwargs["top_k"], kwargs["top_p"]) == (50, 0.95)


def test_answer_streams_and_stops_at_the_next_question(tiny, monkeypatch, capsys):
    model, _ = tiny
    with scripted(model, " A ball rolls.\nQuestion: and then?"):
        out = chat(monkeypatch, capsys, model, "Why?\ntemp of the sun?\n")
    # "temp of the sun?" is a question, not a command
    assert out.count("\nBot: A ball rolls.\n") == 2 and "Temperature" not in out
    assert out.endswith("\nYou: \nGoodbye!\n")  # end of input


def test_answer_stops_at_end_of_text_and_token_limit(tiny, monkeypatch, capsys):
    model, _ = tiny
    with scripted(model, " Energy is conserved."):
        out = chat(monkeypatch, capsys, model, "Why?\ntokens 2\nWhy?\n")
    assert "\nBot: Energy is conserved.\n" in out and "\nBot: Energy is\n" in out


def test_answer_pieces():
    def pieces(text, extra=()):
        return list(prompt.answer_pieces(encode(text) + list(extra)))

    assert "".join(pieces(" One.\nQuestion: two")) == "One."
    assert "".join(pieces(" One.\nQues", [EOT] + encode(" two"))) == "One.\nQues"  # held back, then shown
    assert "".join(pieces(" x\nQuestion")) == "x\nQuestion"  # no colon: not the next question
    streamed = pieces(" It moves with energy and momentum")
    assert len(streamed) == len(encode(" It moves with energy and momentum"))  # one piece per token
    # characters whose UTF-8 bytes span several tokens appear whole, never as replacement marks
    text = " 🙂 カ naïve €"
    ids = encode(text)
    assert any("\ufffd" in get_encoding().decode([i]) for i in ids)  # some tokens are partial characters
    assert pieces(text) and "".join(pieces(text)) == text.lstrip() and not any("\ufffd" in p for p in pieces(text))
    # a character cut off by the token limit shows as one replacement mark
    assert "".join(prompt.answer_pieces(encode(" naïve カ")[:-1])) == "naïve \ufffd"


def test_ctrl_c_exits_cleanly(tiny, monkeypatch, capsys):
    model, _ = tiny

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)
    prompt.repl(model, SamplingConfig(), None)
    assert capsys.readouterr().out.endswith("\nGoodbye!\n")

    monkeypatch.undo()
    handle = model.lm_head.register_forward_hook(interrupt)  # Ctrl-C while the answer streams
    try:
        out = chat(monkeypatch, capsys, model, "Why?\nWhy again?\n")
    finally:
        handle.remove()
    assert out.endswith("\nBot: \nGoodbye!\n") and "Why again?" not in out


def test_piped_session_exits_with_status_0(tiny):
    _, path = tiny
    env = {**os.environ, "TESTING_MODEL_PATH": path, "DEVICE": "cpu", "MAX_NEW_TOKENS": "3"}
    done = subprocess.run([sys.executable, "prompt.py"], cwd=ROOT, input="tokens 4\nWhat is mass?\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Max tokens set to 4" in done.stdout and "\nBot: " in done.stdout and done.stdout.endswith("Goodbye!\n")
    assert done.stderr == ""


def test_missing_checkpoint_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TESTING_MODEL_PATH", raising=False)
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        prompt.main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"Error: no checkpoint in {tmp_path}/: train one with train.py, or set TESTING_MODEL_PATH\n"
