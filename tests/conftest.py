"""Fixtures shared by every test file: one tiny demo dataset per session, real data when present."""

import json
import random
from pathlib import Path

import numpy as np

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO_SHARD_SIZE = 100_000  # the demo corpus (~1.36M tokens) makes 1 val and 13 train shards


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models gain nothing from a second thread; on a busy machine it costs them waits."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def real_file(monkeypatch):
    """The real HellaSwag rows in ../shared/data, selected through HELLASWAG_PATH."""
    path = SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl"
    if not path.is_file():
        pytest.skip(f"real HellaSwag rows not found at {path}")
    monkeypatch.setenv("HELLASWAG_PATH", str(path))
    return path


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """Path of the demo corpus built in-process once per session (about 2 s), SHARD_SIZE=1e5."""
    import dataset

    path = tmp_path_factory.mktemp("demo_dataset") / "demo"
    dataset.build("demo", str(path), DEMO_SHARD_SIZE)
    return path


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (real HellaSwag rows, tiny shakespeare), or a skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real data for tests lives beside the repository)")
    return SHARED_DATA


def natural_reasoning_rows(count=60):
    """Rows in facebook/natural_reasoning's exact schema, with its awkward cases: no responses
    (the reference answer is used), several responses (the first is used), unicode, and a
    literal "<|endoftext|>" that must stay text."""
    rows = []
    for i in range(count):
        responses = [{"response_model": "Llama-3.3-70B-Instruct", "response": f"Step {j}: {i} * {j} = {i * j}. ✓"}
                     for j in range(1, i % 3 + 1)]
        question = f"Problem {i}: what is {i} * {i % 3}? Énoncé «{i}»."
        if i == 7:
            question += " Is <|endoftext|> a token here?"
        rows.append({"question": question, "reference_answer": f"{i * (i % 3)}", "responses": responses})
    return rows


def expected_document(row):
    """The document dataset.py must make of a natural_reasoning row, written out independently."""
    answer = row["responses"][0]["response"] if row["responses"] else row["reference_answer"]
    return f"Question: {row['question']}\nAnswer: {answer}"


@pytest.fixture(scope="session")
def natural_reasoning_files(tmp_path_factory):
    """{"rows": the rows, "jsonl": path, "parquet": path}: the same rows in both formats."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("natural_reasoning_rows")
    rows = natural_reasoning_rows()
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    parquet = folder / "rows.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    return {"rows": rows, "jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory):
    """A small learnable dataset (templated sums) in shards.py's format: 3 train shards, 1 val."""
    import shards
    import tokenizer

    path = tmp_path_factory.mktemp("tokens")
    rng = random.Random(0)
    ids = []
    for _ in range(1500):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        ids += [tokenizer.EOT, *tokenizer.encode(f"Question: What is {a} plus {b}?\nAnswer: {a + b}.")]
    ids = np.array(ids, dtype=np.uint16)
    splits = {"val": [ids[:3000]], "train": np.array_split(ids[3000:], 3)}
    meta = {"splits": {}}
    for split, pieces in splits.items():
        names = [shards.shard_name(split, i) for i in range(len(pieces))]
        for name, piece in zip(names, pieces):
            np.save(path / name, piece)
        meta["splits"][split] = {"shards": names, "tokens": int(sum(map(len, pieces))), "documents": 0}
    shards.write_meta(str(path), meta)
    return str(path)


@pytest.fixture(scope="session")
def hellaswag_rows(tmp_path_factory):
    """A 6-row HellaSwag file the tiny models of the training tests can score."""
    rows = [{"ctx": f"Question: What is {i} plus {i}?", "label": i % 4,
             "endings": [f"Answer: {i + i + k}." for k in range(4)]} for i in range(6)]
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="session")
def runs(token_dataset, hellaswag_rows, tmp_path_factory):
    """The same 20 updates three ways: FSDP on 2 ranks, DDP on 2 ranks, one process accumulating
    (test_parallel.py compares them; test_faults.py's interrupted runs must reproduce them)."""
    from test_parallel import STEPS, torchrun
    from test_train import run_train

    root = tmp_path_factory.mktemp("parallel")
    fsdp_out = torchrun(token_dataset, root / "fsdp", PARALLEL="fsdp", HELLASWAG_PATH=hellaswag_rows)
    torchrun(token_dataset, root / "ddp", PARALLEL="ddp", HELLASWAG_PATH=hellaswag_rows)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELLASWAG_PATH", hellaswag_rows)
        run_train(mp, token_dataset, root / "single", **STEPS, VAL_STEPS=4)  # 2 ranks x 2 batches
    return {"root": root, "fsdp_out": fsdp_out, "fsdp": root / "fsdp", "ddp": root / "ddp", "single": root / "single"}
