"""hellaswag.py: the data file (cache, download, malformed lines, offline), rendering, lm-eval's
preprocessing, and the batched scorer against build-nanogpt's one-example-at-a-time scoring."""

import json
import sys
import types

import pytest
import torch

import device
import hellaswag
import hub
from bench.build_nanogpt import reference_scores, render_example
from model import GPT, GPTConfig
from tokenizer import encode



@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda *args, **kwargs: False)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    # vocabulary 50257: the reference's full logits need no crop (a copy) to stay cheap
    return GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()


FULL_ROW = {"ind": 7, "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough in a bowl.",
            "ctx_b": "she", "ctx": "A woman mixes dough in a bowl. she", "split": "val", "split_type": "zeroshot",
            "label": 1, "endings": ["flies a kite.", "puts the dough on a tray.", "swims.", "reads a map."],
            "source_id": "activitynet~v_test"}
MINIMAL_ROW = {"ctx": "The man opens the door. he", "endings": ["walks in.", "eats it.", "sings.", "melts."],
               "label": "0"}


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----- the data file -----------------------------------------------------------------------------

def test_real_rows(real_file):
    rows = hellaswag.load_examples()
    assert len(rows) == 916
    split_types = [r["split_type"] for r in rows]
    assert split_types.count("indomain") == 749 and split_types.count("zeroshot") == 167
    assert all(type(r["label"]) is int for r in rows)
    assert [r["ind"] for r in hellaswag.load_examples(limit=3)] == [r["ind"] for r in rows[:3]]


def test_cached_tiny_file_and_minimal_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "hs"))
    write_rows(tmp_path / "hs" / "hellaswag_val.jsonl", [FULL_ROW, MINIMAL_ROW])
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("a cached file must not be downloaded again"))
    full, minimal = hellaswag.load_examples()
    assert full == FULL_ROW
    assert minimal["label"] == 0 and minimal["split_type"] == "unknown"


@pytest.mark.parametrize("bad, problem", [
    ('{"ctx": "a", "endings": ["b", "c"', "not valid JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d"], "label": 0}), "list of 4 strings"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}), "'label' must be 0, 1, 2 or 3"),
    (json.dumps({"endings": ["b", "c", "d", "e"], "label": 1}), "no 'ctx'"),
])
def test_malformed_line_is_reported_by_number(tmp_path, monkeypatch, bad, problem):
    path = write_rows(tmp_path / "val.jsonl", [FULL_ROW, "", bad, FULL_ROW])
    monkeypatch.setenv("HELLASWAG_PATH", str(path))
    with pytest.raises(hellaswag.HellaSwagUnavailable, match=f"line 3: .*{problem}"):
        hellaswag.load_examples()


def test_offline_without_a_file_says_what_to_do(tmp_path, monkeypatch, offline):
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "hs"))
    with pytest.raises(hellaswag.HellaSwagUnavailable) as error:
        hellaswag.load_examples()
    message = str(error.value)
    assert "huggingface.co unreachable" in message and "raw.githubusercontent.com unreachable" in message
    assert str(tmp_path / "hs" / "hellaswag_val.jsonl") in message and "HELLASWAG_PATH=" in message
    assert "\n" not in message
    assert list((tmp_path / "hs").iterdir()) == []
    monkeypatch.setenv("HELLASWAG_PATH", str(tmp_path / "missing.jsonl"))
    with pytest.raises(hellaswag.HellaSwagUnavailable, match="HELLASWAG_PATH=.*missing.jsonl is not a file"):
        hellaswag.load_examples()


def test_hub_download_writes_the_original_row_format(real_file, tmp_path, monkeypatch):
    original = real_file.read_text().splitlines(keepends=True)[:3]
    hub_rows = []
    for line in original:  # as the Hub serves them: label a string, fields in another order
        row = json.loads(line)
        hub_rows.append({**{k: row[k] for k in reversed(list(row))}, "label": str(row["label"])})
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: hub_rows if (name, split) == ("Rowan/hellaswag", "validation") else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    monkeypatch.delenv("HELLASWAG_PATH")
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "hs"))
    assert len(hellaswag.load_examples()) == 3
    assert (tmp_path / "hs" / "hellaswag_val.jsonl").read_text() == "".join(original)
    assert sorted(p.name for p in (tmp_path / "hs").iterdir()) == ["hellaswag_val.jsonl"]


def test_github_fallback_when_the_hub_fails(tmp_path, monkeypatch):
    import requests

    def broken(name, split):
        raise ConnectionError("the Hub is having a bad day")

    class Response:
        headers = {"content-length": "200"}
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def raise_for_status(self): pass
        def iter_content(self, chunk_size): yield (json.dumps(FULL_ROW) + "\n").encode()

    fake = types.ModuleType("datasets")
    fake.load_dataset = broken
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(requests, "get", lambda url, **kw: Response() if url == hellaswag.GITHUB_URL else None)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    monkeypatch.delenv("HELLASWAG_PATH", raising=False)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path))
    assert hellaswag.load_examples() == [FULL_ROW]


# ----- rendering ---------------------------------------------------------------------------------

def test_render_example_exact_tokens(real_file):
    row = hellaswag.load_examples(limit=1)[0]
    assert row["ctx"] == "A man is sitting on a roof. he" and row["label"] == 3
    tokens, mask, label = render_example(row)
    context = [32, 582, 318, 5586, 319, 257, 9753, 13, 339]  # "A man is sitting on a roof. he"
    ending3 = [4940, 10427, 510, 9753, 278, 319, 257, 9753, 13]  # " starts pulling up roofing on a roof."
    assert label == 3 and tokens.shape == mask.shape == (4, tokens.size(1))
    assert tokens[3, :18].tolist() == context + ending3 and mask[3, :18].tolist() == [0] * 9 + [1] * 9
    for i, ending in enumerate(row["endings"]):
        ids = encode(" " + ending)
        n = 9 + len(ids)
        assert tokens[i, :n].tolist() == context + ids
        assert mask[i].tolist() == [0] * 9 + [1] * len(ids) + [0] * (tokens.size(1) - n)
        assert tokens[i, n:].eq(0).all()


def test_lm_eval_preprocessing():
    row = {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a roof. [title] Get a ladder.",
           "ctx_b": "then you  [step] climb", "ctx": "unused", "label": 2,
           "endings": ["[substeps] Go up  the ladder.", " Sweep the LEAVES. [title] Rest.", "Jump.",
                       "Wait [step] here."]}
    context, endings = hellaswag.texts(row, "lm-eval")
    # " [title]" -> ". ", other tags dropped, ctx_b capitalised, double spaces folded once (as lm-eval does)
    assert context == "Home and Garden: How to clean a roof.. Get a ladder. Then you  climb"
    # a tag at the start leaves its space behind: lm-eval strips before it removes tags
    assert endings == [" Go up the ladder.", "Sweep the LEAVES.. Rest.", "Jump.", "Wait here."]
    assert hellaswag.texts({**row, "ctx_b": "the man's iPhone"}, "lm-eval")[0].endswith("ladder. The man's iphone")
    enc = hellaswag.encode_example(row, "lm-eval")
    assert enc.context == encode(context) and enc.norm == [len(e) for e in endings]
    for ids, ending in zip(enc.endings, endings):
        assert enc.context + ids == encode(context + " " + ending)
    assert hellaswag.texts(row, "nanogpt") == ("unused", row["endings"])


def test_lm_eval_on_a_real_row(real_file):
    row = hellaswag.load_examples(limit=1)[0]
    context, endings = hellaswag.texts(row, "lm-eval")
    assert context == "Roof shingle removal: A man is sitting on a roof. He"
    enc = hellaswag.encode_example(row, "lm-eval")
    assert enc.context == encode(context) and enc.endings[3] == encode(" " + endings[3])
    assert enc.norm[3] == len("starts pulling up roofing on a roof.")


def test_short_block_size_drops_context_from_the_left():
    enc = hellaswag.encode_example(FULL_ROW, block_size=8)
    full = hellaswag.encode_example(FULL_ROW)
    longest = max(len(e) for e in full.endings)
    assert longest <= 7 and enc.endings == full.endings and enc.context == full.context[-(8 - longest):]
    assert max(len(enc.context) + len(e) for e in enc.endings) == 8


# ----- scoring -----------------------------------------------------------------------------------

def reference(model, rows, variant):
    scores = [reference_scores(model, row, variant) for row in rows]
    sums = torch.stack([s for s, _ in scores])
    return sums, sums / torch.stack([n for _, n in scores])


@pytest.mark.parametrize("variant, count", [("nanogpt", 160), ("lm-eval", 80)])
def test_batched_equals_one_example_at_a_time_in_fp32(real_file, tiny_model, variant, count):
    rows = hellaswag.load_examples()[::916 // count][:count]  # spread over the file, both split types
    runtime = device.setup("cpu", "float32")
    result = hellaswag.evaluate(tiny_model, runtime, rows, batch_size=64, variant=variant)
    sums, norms = reference(tiny_model, rows, variant)
    torch.testing.assert_close(result.sum_nll, sums, rtol=0, atol=1e-3)
    torch.testing.assert_close(result.norm_nll, norms, rtol=0, atol=1e-4)
    assert torch.equal(result.pred, sums.argmin(1)) and torch.equal(result.pred_norm, norms.argmin(1))
    labels = torch.tensor([r["label"] for r in rows])
    assert result.correct_norm == int((norms.argmin(1) == labels).sum()) and result.total == count
    assert result.acc_norm == result.correct_norm / count


def test_packed_examples_do_not_see_each_other(tiny_model):
    rows = [FULL_ROW, {**MINIMAL_ROW, "label": 0}, {**FULL_ROW, "endings": FULL_ROW["endings"][::-1]}]
    runtime = device.setup("cpu", "float32")
    together = hellaswag.evaluate(tiny_model, runtime, rows)  # all three share one packed row
    for i, row in enumerate(rows):
        alone = hellaswag.evaluate(tiny_model, runtime, [row])
        torch.testing.assert_close(alone.sum_nll[0], together.sum_nll[i], rtol=0, atol=1e-4)
    # reversed endings: the same four scores, reversed
    torch.testing.assert_close(together.sum_nll[2], together.sum_nll[0].flip(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(hellaswag.evaluate(tiny_model, runtime, rows, batch_size=1).sum_nll, together.sum_nll)


def test_short_block_size_matches_the_reference():
    rows = [FULL_ROW, {**MINIMAL_ROW, "label": 0}]
    short = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    sums, _ = reference(short, rows, "nanogpt")
    result = hellaswag.evaluate(short, device.setup("cpu", "float32"), rows)
    torch.testing.assert_close(result.sum_nll, sums, rtol=0, atol=1e-4)


def test_bf16_agrees_with_fp32(real_file, tiny_model):
    rows = hellaswag.load_examples()[:200]
    fp32 = hellaswag.evaluate(tiny_model, device.setup("cpu", "float32"), rows)
    bf16 = hellaswag.evaluate(tiny_model, device.setup("cpu", "bfloat16"), rows)
    agree = (fp32.pred == bf16.pred).float().mean().item()
    agree_norm = (fp32.pred_norm == bf16.pred_norm).float().mean().item()
    print(f"bf16 vs fp32 agreement on {len(rows)} real rows, tiny random model: "
          f"acc {agree:.3f}, acc_norm {agree_norm:.3f}")
    torch.testing.assert_close(bf16.norm_nll, fp32.norm_nll, rtol=0, atol=0.05)
    assert agree >= 0.9
