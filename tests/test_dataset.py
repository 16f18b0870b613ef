"""Test dataset.py and peek_dataset.py: documents, shuffling, shards, reuse, and every bad input."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dataset
import demo_corpus
import hub
import peek_dataset
from atomic import temporary_name
from conftest import expected_document
from env import UserError
from shards import load_shard, read_meta, shard_paths
from tokenizer import EOT, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def split_tokens(path, split):
    return np.concatenate([load_shard(p) for p in shard_paths(path, split)])


def documents_of(tokens):
    """Decode a split's token stream back into its documents, cutting at the EOT tokens."""
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    return [decode(doc[1:].tolist()) for doc in np.split(tokens, starts[1:])]


def shuffled(records):
    """Return the records in datasets' shuffle(seed) order: permuted by numpy's default_rng(seed),
    written out here."""
    return [records[i] for i in np.random.default_rng(dataset.SHUFFLE_SEED).permutation(len(records))]


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def run_main(monkeypatch, capsys, **env):
    """Run dataset.main() under these environment variables; return (exit code, stdout, stderr)."""
    for name in ("HF_DATASET_NAME", "DATASET_PATH", "SHARD_SIZE", "FORCE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    code = 0
    try:
        dataset.main()
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_natural_reasoning_round_trip_and_shard_boundaries(natural_reasoning_files, tmp_path, fmt):
    rows = natural_reasoning_files["rows"]
    shard_size = 200
    meta = dataset.build(str(natural_reasoning_files[fmt]), str(tmp_path / "ds"), shard_size)

    val, train = split_tokens(tmp_path / "ds", "val"), split_tokens(tmp_path / "ds", "train")
    expected = shuffled([expected_document(row) for row in rows])
    # exact ids: each document is EOT + encode_ordinary(document), in the shuffled order
    assert np.concatenate([val, train]).tolist() == [t for doc in expected for t in [EOT] + encode(doc)]
    assert documents_of(val) + documents_of(train) == expected
    # a literal "<|endoftext|>" in a question stays text: EOT appears once per document only
    assert int(np.count_nonzero(np.concatenate([val, train]) == EOT)) == len(rows)
    assert any("Is <|endoftext|> a token here?" in doc for doc in expected)

    # val: the first whole documents that fit in one shard; every other shard exactly shard_size
    n_val = meta["splits"]["val"]["documents"]
    assert len(val) <= shard_size < len(val) + 1 + len(encode(expected[n_val]))
    assert meta["splits"]["train"]["documents"] == len(rows) - n_val
    for split, tokens in (("val", val), ("train", train)):
        sizes = [len(load_shard(p)) for p in shard_paths(tmp_path / "ds", split)]
        assert all(size == shard_size for size in sizes[:-1]) and 0 < sizes[-1] <= shard_size
        assert meta["splits"][split]["tokens"] == len(tokens) == sum(sizes)
        assert meta["splits"][split]["shards"] == [f"{split}_{i:06d}.npy" for i in range(len(sizes))]
        assert load_shard(shard_paths(tmp_path / "ds", split)[0]).dtype == np.uint16
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert meta["source"] == str(natural_reasoning_files[fmt]) and meta["tokenizer"] == "gpt2"
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temporary folder left behind


def test_small_data_puts_a_fraction_of_documents_in_val(natural_reasoning_files, tmp_path):
    meta = dataset.build(str(natural_reasoning_files["jsonl"]), str(tmp_path / "ds"), 10**8)
    assert meta["splits"]["val"]["documents"] == 3  # 5% of 60
    assert meta["splits"]["train"]["documents"] == 57
    assert [len(meta["splits"][s]["shards"]) for s in ("val", "train")] == [1, 1]
    assert documents_of(split_tokens(tmp_path / "ds", "val")) == shuffled(
        [expected_document(row) for row in natural_reasoning_files["rows"]])[:3]


def test_tinyshakespeare_paragraphs(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    meta = dataset.build(str(shared_data / "tinyshakespeare" / "input.txt"), str(tmp_path / "ds"), 50_000)
    expected = shuffled(text.split("\n\n"))  # one document per blank-line-separated paragraph
    decoded = documents_of(split_tokens(tmp_path / "ds", "val")) + documents_of(split_tokens(tmp_path / "ds", "train"))
    assert decoded == expected  # ~14 tokenizer batches over 2+ threads: order kept
    assert meta["splits"]["val"]["tokens"] <= 50_000 and len(meta["splits"]["train"]["shards"]) == 6


def test_other_sources_text_column_and_saved_folder(tmp_path):
    import datasets

    texts = [f"Document {i}: {'word ' * i}end." for i in range(40)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(40))}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "t.csv").write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    for source in ("saved", "t.csv"):
        dataset.build(str(tmp_path / source), str(tmp_path / f"ds_{source}"), 10**8)
        decoded = [doc for split in ("val", "train") for doc in documents_of(split_tokens(tmp_path / f"ds_{source}", split))]
        assert decoded == shuffled(texts), source


def test_demo_corpus_is_deterministic_and_correct():
    rows = list(demo_corpus.rows(2000))
    assert rows == list(demo_corpus.rows(2000))
    unit = r"(?: (?:m/s\^2|m/s|km/h|km|m|s|h))?"
    statement = re.compile(rf"(\d+){unit} ([-+*/]) (\d+){unit} = (\d+)\b")
    checked = 0
    for row in rows:
        answer = row["reference_answer"]
        for a, op, b, result in statement.findall(answer):
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == result, row
            checked += 1
        for t, fallen in re.findall(r"0\.5 \* 10 \* (\d+)\^2 = (\d+) m", answer):
            assert 5 * int(t) ** 2 == int(fallen), row
            checked += 1
    assert checked == len(rows)  # every answer holds one worked, correct calculation
    assert len({row["question"] for row in rows}) > 0.85 * len(rows)  # varied, not a handful of repeats


def test_demo_dataset_fixture(demo_dataset):
    meta = read_meta(demo_dataset)
    assert meta["source"] == "demo"
    assert meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == demo_corpus.DOCUMENTS
    assert 1_000_000 < meta["splits"]["train"]["tokens"] < 3_000_000
    assert len(meta["splits"]["train"]["shards"]) >= 5
    assert documents_of(split_tokens(demo_dataset, "val"))[0].startswith("Question: ")


def test_reuse_force_and_interrupted_runs(natural_reasoning_files, tmp_path, capsys):
    source, path = str(natural_reasoning_files["jsonl"]), tmp_path / "ds"
    dataset.build(source, str(path), 300)
    before = snapshot(path)
    mtimes = {name: os.stat(path / name).st_mtime_ns for name in before}

    meta = dataset.build(source, str(path), 300)  # same source, tokenizer, SHARD_SIZE: reused
    assert "reusing" in capsys.readouterr().out
    assert {name: os.stat(path / name).st_mtime_ns for name in before} == mtimes
    assert meta["shard_size"] == 300

    with pytest.raises(UserError, match="FORCE=1"):
        dataset.build(source, str(path), 400)
    with pytest.raises(UserError, match="FORCE=1"):
        dataset.build(str(natural_reasoning_files["parquet"]), str(path), 300)
    assert snapshot(path) == before

    meta = dataset.build(source, str(path), 400, force=True)
    assert meta["shard_size"] == 400 and read_meta(path)["shard_size"] == 400
    assert all(len(load_shard(p)) == 400 for p in shard_paths(path, "train")[:-1])
    assert sorted(os.listdir(tmp_path)) == ["ds"]

    # interrupted: shards but no meta.json (and a stale build folder) -> rebuilt, never reused
    os.remove(path / "meta.json")
    (path / "train_000000.npy").write_bytes(b"half written")
    (tmp_path / ".ds.building").mkdir()
    meta = dataset.build(source, str(path), 400)
    assert read_meta(path) == meta
    assert load_shard(path / "train_000000.npy").tolist() == split_tokens(path, "train")[:400].tolist()
    assert sorted(os.listdir(tmp_path)) == ["ds"]

    # a folder that is not ours is never deleted
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="other files"):
        dataset.build(source, str(tmp_path / "mine"), 400)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_atomic_write_temporaries_count_as_ours(tmp_path):
    """A folder left with only atomic_write's temporaries is a half-written dataset: replaceable."""
    for name in ("train_000000.npy", "val_000000.npy", "meta.json"):
        Path(temporary_name(tmp_path / name)).write_bytes(b"half written")
    dataset.check_replaceable(str(tmp_path))


def test_bad_inputs_fail_in_one_line_and_keep_the_dataset(natural_reasoning_files, tmp_path, monkeypatch, capsys):
    import datasets

    path = tmp_path / "ds"
    dataset.build(str(natural_reasoning_files["jsonl"]), str(path), 300)
    before = snapshot(path)
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "reference_answer": "b"}\n{"question": \n')
    (tmp_path / "columns.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "one.jsonl").write_text('{"text": "only one document"}\n')
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "afile").write_text("")

    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    def needs_config(*args, **kwargs):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['a', 'b']")

    hub_down = {"reachable": lambda *a, **k: False}
    hub_up = {"require": lambda *a, **k: None}
    cases = [  # (environment, expected message, patches of hub, replace datasets.load_dataset)
        ({"HF_DATASET_NAME": tmp_path / "bad.jsonl"}, r"cannot read .*bad\.jsonl", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "bad.parquet"}, r"cannot read .*bad\.parquet", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "columns.jsonl"}, r"columns \['completion', 'prompt'\]", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "numbers.jsonl"}, r"column `text` must hold text", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "empty.jsonl"}, r"empty\.jsonl is empty", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "one.jsonl"}, r"1 record\(s\): at least 2 are needed", {}, None),
        ({"HF_DATASET_NAME": tmp_path / "missing.jsonl"}, r"no such file", {}, None),
        ({"HF_DATASET_NAME": "facebook/natural_reasoning"}, r"cannot reach .*HF_DATASET_NAME=demo.*local", hub_down, None),
        ({"HF_DATASET_NAME": "nobody/nothing"}, r"no such dataset on the Hugging Face Hub", hub_up, not_found),
        ({"HF_DATASET_NAME": "nobody/configs"}, r"cannot load nobody/configs from the Hub: Config name is missing\.$",
         hub_up, needs_config),
        ({"HF_DATASET_NAME": "demo", "SHARD_SIZE": "2.5"}, r"SHARD_SIZE must be a whole number", {}, None),
        ({"HF_DATASET_NAME": "demo", "SHARD_SIZE": "0"}, r"SHARD_SIZE must be >= 1", {}, None),
        ({"HF_DATASET_NAME": "demo", "SHARD_SIZE": "lots"}, r"SHARD_SIZE must be an integer", {}, None),
        ({"HF_DATASET_NAME": "demo", "DATASET_PATH": tmp_path / "afile" / "ds"}, r"cannot write DATASET_PATH", {}, None),
    ]
    for env, message, hub_patches, load_dataset in cases:
        with monkeypatch.context() as patch:
            for name, replacement in hub_patches.items():
                patch.setattr(hub, name, replacement)
            if load_dataset:
                patch.setattr(datasets, "load_dataset", load_dataset)
            start = time.perf_counter()
            code, out, err = run_main(patch, capsys, **{"DATASET_PATH": path, "SHARD_SIZE": 300, "FORCE": 1, **env})
        assert code == 1, (env, out, err)
        assert err.startswith("Error: ") and err.count("\n") == 1 and re.search(message, err), (env, err)
        assert time.perf_counter() - start < 10
        assert snapshot(path) == before, env

    # SHARD_SIZE in scientific notation is the same setting: the dataset is reused
    code, out, _ = run_main(monkeypatch, capsys, HF_DATASET_NAME=natural_reasoning_files["jsonl"],
                            DATASET_PATH=path, SHARD_SIZE="3e2")
    assert code == 0 and "reusing" in out

    (tmp_path / "blank.jsonl").write_text('{"text": "the only document"}\n{"text": "  "}\n')
    with pytest.raises(UserError, match="1 non-empty document"):
        dataset.build(str(tmp_path / "blank.jsonl"), str(path), 300, force=True)
    assert snapshot(path) == before


def test_cli_offline_hub_message_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DATASET_PATH": str(tmp_path / "ds")}
    env.pop("HF_DATASET_NAME", None)
    result = subprocess.run([sys.executable, "dataset.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "HF_DATASET_NAME=demo" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ds").exists()


def test_peek_dataset(demo_dataset, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peek_dataset.py", str(demo_dataset)])
    peek_dataset.main()
    out = capsys.readouterr().out
    meta = read_meta(demo_dataset)
    first = load_shard(shard_paths(demo_dataset, "train")[0])[:1000]
    assert decode(first.tolist()) in out and out.count("<|endoftext|>Question: ") > 10
    assert f"train: {len(meta['splits']['train']['shards'])} shard(s), {meta['splits']['train']['tokens']:,} tokens" in out
    assert "val: 1 shard(s)" in out

    monkeypatch.setattr(sys, "argv", ["peek_dataset.py"])
    monkeypatch.setenv("PEEK_DATASET_PATH", str(demo_dataset.parent / "nothing"))
    with pytest.raises(SystemExit) as exit:
        peek_dataset.main()
    assert exit.value.code == 1
    assert "no complete dataset" in capsys.readouterr().err


def test_write_shards_document_longer_than_a_shard(tmp_path):
    """A first document over a shard long still makes val alone; shards stay exactly SHARD_SIZE."""
    lengths = [250] + [30] * 20
    docs = [np.array([EOT] + [i % 1000 + 1] * (n - 1), dtype=np.uint16) for i, n in enumerate(lengths)]
    batches = [np.concatenate(docs[i:i + 4]) for i in range(0, len(docs), 4)]
    splits = dataset.write_shards(iter(batches), str(tmp_path), 100)
    assert splits["val"] == {"shards": ["val_000000.npy", "val_000001.npy", "val_000002.npy"],
                             "tokens": 250, "documents": 1}
    assert splits["train"]["tokens"] == 600 and splits["train"]["documents"] == 20
    sizes = [len(np.load(tmp_path / name)) for name in splits["train"]["shards"]]
    assert sizes == [100] * 6
    written = np.concatenate([np.load(tmp_path / name) for s in ("val", "train") for name in splits[s]["shards"]])
    assert written.tolist() == np.concatenate(docs).tolist()


def test_tokenize_matches_encode_ordinary():
    texts = ["Hello world", "", "a literal <|endoftext|> stays text", "  spaces\n\n\tand tabs  ", "naïve café 🙂"]
    assert dataset.tokenize(texts).tolist() == [t for text in texts for t in [EOT] + encode(text)]
    assert dataset.tokenize([]).tolist() == []
    rows = {"question": ["q1", "q2", None], "reference_answer": ["", "r2", "r3"], "responses": [[], [], []]}
    assert dataset.qa_documents(rows) == ["Question: q2\nAnswer: r2"]  # no answer or no question: skipped
