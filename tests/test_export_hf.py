"""export_hf.py and GPT-2 weights from transformers: an exported checkpoint loads in transformers with
no network and gives this project's logits and token ids."""

import json
import socket
from pathlib import Path

import pytest
import torch

import checkpoint
import export_hf
import hub
import sampling
import tokenizer
from env import UserError
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)


def write_checkpoint(path, vocab_size=50304, seed=0):
    """A tiny checkpoint whose every weight (biases and LayerNorms too) is random, so a conversion that
    drops or transposes any tensor changes the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoint.save({"model": model.state_dict(), "config": model.config.shape(), "step": 7}, str(path))
    return str(path)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on a machine without network."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    hub.answers.cache_clear()
    yield
    hub.answers.cache_clear()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint path, export directory) of one tiny padded-vocabulary checkpoint."""
    root = tmp_path_factory.mktemp("export")
    path = write_checkpoint(root / "model_00007.pt")
    export_hf.main(["--checkpoint", path, "--out", str(root / "hf")])
    return path, str(root / "hf")


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported[1])


def test_export_writes_a_cropped_gpt2_directory(exported):
    from safetensors import safe_open

    _, out = exported
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(export_hf.EXPORT_FILES)
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["vocab_size"], config["n_positions"], config["n_layer"], config["n_head"], config["n_embd"]) == (50257, 64, 2, 2, 32)
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
        assert f.get_slice("transformer.wte.weight").get_shape() == [GPT2_VOCAB_SIZE, 32]
    generation = json.loads((Path(out) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == tokenizer.EOT


def test_transformers_logits_equal_ours(exported, no_network):
    from transformers import AutoModelForCausalLM

    path, out = exported
    ours, _ = checkpoint.load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.dtype == torch.float32
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, SHAPE["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(idx)[0][..., :GPT2_VOCAB_SIZE]
        got = theirs(idx).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.fixture
def shakespeare():
    path = DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data holds the test data)")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def hellaswag_texts():
    path = DATA / "hellaswag" / "hellaswag_val.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data holds the test data)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [row["ctx"] + " " + ending for row in rows for ending in row["endings"]]


def test_exported_tokenizer_matches_ours_on_shakespeare(hf_tokenizer, shakespeare):
    ids = hf_tokenizer(shakespeare).input_ids
    assert len(ids) > 300_000
    assert ids == tokenizer.encode(shakespeare)


def test_exported_tokenizer_matches_ours_on_hellaswag(hf_tokenizer, hellaswag_texts):
    assert hf_tokenizer(hellaswag_texts).input_ids == [tokenizer.encode(text) for text in hellaswag_texts]


EDGE_CASES = [
    "", " ", "\n", "\n\n\n", "   leading", "trailing   ", "tabs\t\tand\r\nCRLF\r\n", "a  b   c    d",
    "they'll've it's I'M ALL'S", "12345678901234567890 3.14159", "naïve café Ærøskøbing", "東京 タワー 한국어",
    "🙂👍🏽 emoji", "zero\u200bwidth", "Question: Why?\nAnswer: Because.", "x" * 500, "Hello world",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_exported_tokenizer_matches_ours_on_edge_cases(hf_tokenizer, text):
    ids = hf_tokenizer(text).input_ids
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_exported_tokenizer_special_tokens(hf_tokenizer):
    assert len(hf_tokenizer) == GPT2_VOCAB_SIZE
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == tokenizer.EOT
    assert hf_tokenizer.model_max_length == SHAPE["block_size"]
    # like GPT-2 on the Hub, a literal <|endoftext|> is the special token (tiktoken's allowed_special)
    text = "end of one<|endoftext|>Start"
    assert hf_tokenizer(text).input_ids == tokenizer.get_encoding().encode(text, allowed_special="all")
    assert tokenizer.EOT in hf_tokenizer(text).input_ids


def test_pipeline_generates_like_our_sampler(exported, no_network):
    from transformers import pipeline

    path, out = exported
    generator = pipeline("text-generation", model=out)
    prompt = "To be, or not to be"
    got = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ours, _ = checkpoint.load_model(path)
    new_ids = sampling.generate(ours, tokenizer.encode(prompt), 12, temperature=0)[0]
    assert got == prompt + tokenizer.decode(new_ids)


def test_reexport_replaces_an_earlier_export_but_never_user_files(tmp_path, capsys):
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", write_checkpoint(tmp_path / "model_00001.pt", seed=1), "--out", str(out)])
    first = (out / "model.safetensors").read_bytes()
    export_hf.main(["--checkpoint", write_checkpoint(tmp_path / "model_00002.pt", seed=2), "--out", str(out)])
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model_00001.pt", "model_00002.pt"]  # no staging left
    printed = capsys.readouterr().out
    assert "Cropping the vocabulary from 50304 to 50257" in printed and "model.safetensors" in printed

    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--checkpoint", str(tmp_path / "model_00001.pt"), "--out", str(out)])
    assert exit_info.value.code == 1
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_default_checkpoint_is_the_newest_in_log_dir(tmp_path, monkeypatch, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    write_checkpoint(log_dir / "model_00003.pt")
    write_checkpoint(log_dir / "model_00012.pt")
    monkeypatch.setenv("LOG_DIR", str(log_dir))
    export_hf.main(["--out", str(tmp_path / "hf")])
    assert f"Loaded checkpoint {log_dir / 'model_00012.pt'} (step 7)" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").exists()


def bad_cases(tmp):
    """(argv, what the message mentions) for each mistake; files are made on demand."""
    (tmp / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.pt")
    (tmp / "full").mkdir()
    (tmp / "full" / "thesis.tex").write_text("precious")
    good = write_checkpoint(tmp / "model_00001.pt")
    small = write_checkpoint(tmp / "small.pt", vocab_size=256)
    return [
        (["--checkpoint", str(tmp / "missing.pt"), "--out", str(tmp / "o1")], "does not exist"),
        (["--checkpoint", str(tmp / "notes.txt"), "--out", str(tmp / "o2")], "is not a checkpoint"),
        (["--checkpoint", str(tmp / "foreign.pt"), "--out", str(tmp / "o3")], "not a checkpoint written by train.py"),
        (["--checkpoint", str(tmp / "full"), "--out", str(tmp / "o4")], "no checkpoint in"),
        (["--checkpoint", small, "--out", str(tmp / "o5")], "fewer than the GPT-2 tokenizer's 50257"),
        (["--checkpoint", good, "--out", str(tmp / "notes.txt")], "is a file"),
        (["--checkpoint", good, "--out", str(tmp / "full")], "thesis.tex"),
        (["--checkpoint", good, "--out", str(tmp / "notes.txt" / "sub")], "cannot write"),
        (["--checkpoint", good], "--out"),
        (["--checkpoint", good, "--out", str(tmp / "o6"), "--bogus"], "--bogus"),
    ]


def test_bad_inputs_exit_1_with_one_line(tmp_path, capsys):
    for argv, mention in bad_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            export_hf.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, argv
        assert err.startswith("Error: ") and err.count("\n") == 1 and mention in err, (argv, err)
    assert (tmp_path / "notes.txt").read_text() == "not a checkpoint"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["thesis.tex"]
    assert not any(p.name.startswith(("o", ".export_hf")) and p.is_dir() for p in tmp_path.iterdir())


def random_hf_gpt2(directory, seed=0):
    """A randomly initialised GPT2LMHeadModel saved like one downloaded from the Hub."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_positions=SHAPE["block_size"],
                                          n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"]))
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(directory)
    return hf_model.eval()


def test_from_pretrained_loads_a_local_directory(tmp_path, no_network):
    hf_model = random_hf_gpt2(tmp_path / "gpt2-local")
    ours = GPT.from_pretrained(str(tmp_path / "gpt2-local")).eval()
    assert ours.config.shape() == dict(vocab_size=GPT2_VOCAB_SIZE, **SHAPE)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_model(idx).logits, atol=1e-4, rtol=0)


def test_from_pretrained_fails_in_one_clear_line(tmp_path, no_network):
    with pytest.raises(UserError, match="cannot reach .* point at DIR"):
        GPT.from_pretrained("gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a GPT-2 model from"):
        GPT.from_pretrained(str(tmp_path / "empty"))


# ----- the round trip: OpenAI-style weights -> INIT_FROM fine-tuning -> export -> transformers -----

TRAIN_ENV = dict(MAX_STEPS="3", WARMUP_STEPS="1", MAX_LR="1e-3", MIN_LR="1e-4", BATCH_SIZE="2", SEQ_LENGTH="32",
                 TOTAL_BATCH_SIZE="64", EVAL_INTERVAL="100", VAL_STEPS="1", SAMPLE_INTERVAL="100", DROPOUT="0.1",
                 COMPILE="0", HELLASWAG_LIMIT="-1", DTYPE="float32", DEVICE="cpu")


def set_train_env(monkeypatch, **values):
    for name in GPTConfig.SHAPE:
        monkeypatch.delenv(name.upper(), raising=False)  # the shape must come from the weights
    for name in ("RESUME", "FORCE", "KEEP_CHECKPOINTS", "CHECKPOINT_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**TRAIN_ENV, **values}.items():
        monkeypatch.setenv(name, value)


def test_round_trip_init_from_train_export(tmp_path, monkeypatch, demo_dataset, no_network, capsys):
    import train
    from transformers import AutoModelForCausalLM

    init = tmp_path / "gpt2-random"
    random_hf_gpt2(init, seed=3)
    set_train_env(monkeypatch, INIT_FROM=str(init), DATASET_PATH=str(demo_dataset), LOG_DIR=str(tmp_path / "log"))
    train.main()
    printed = capsys.readouterr().out
    assert f"fine-tuning from {init}" in printed and f"N_LAYER: 2 (from {init})" in printed
    path = checkpoint.latest_checkpoint(str(tmp_path / "log"))
    assert path.endswith("model_00002.pt")

    # the run started from those weights and moved a little: 3 AdamW updates of at most ~MAX_LR each
    start = GPT.from_pretrained(str(init)).state_dict()
    trained, state = checkpoint.load_model(path)
    assert state["config"] == dict(vocab_size=GPT2_VOCAB_SIZE, **SHAPE)
    moved = max((trained.state_dict()[name] - tensor).abs().max().item() for name, tensor in start.items())
    assert 0 < moved < 0.01

    export_hf.main(["--checkpoint", path, "--out", str(tmp_path / "export")])
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    idx = torch.tensor([tokenizer.encode("Question: What is the speed of light?\nAnswer: About 3e8 m/s.")])
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, trained(idx)[0], atol=1e-4, rtol=0)


def test_init_from_gpt2_offline_fails_in_one_line(tmp_path, monkeypatch, demo_dataset, no_network, capsys):
    import train

    set_train_env(monkeypatch, INIT_FROM="gpt2", DATASET_PATH=str(demo_dataset), LOG_DIR=str(tmp_path / "log"))
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("Error: cannot reach") and err.count("\n") == 1 and "save_pretrained(DIR)" in err, err
    assert not checkpoint.list_checkpoints(str(tmp_path / "log"))
