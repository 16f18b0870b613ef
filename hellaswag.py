"""Download HellaSwag's validation set, tokenise its examples and score a model on them in batches.

HellaSwag (Zellers et al. 2019) gives a context and four endings; the model should find the right
one more likely. As in build-nanogpt, each ending is scored by the negative log-likelihood (NLL) of
its tokens after the context: `acc` picks the lowest sum, `acc_norm` the lowest mean (per token),
the number train.py logs as "HellaSwag accuracy". The `lm-eval` variant reproduces
lm-evaluation-harness instead (text cleanup, joint tokenisation, acc_norm per character), so
results compare with published tables.

Scoring lays each example out once: the context, then its four endings side by side, each
ending's positions restarting right after the context and an attention mask letting it see the
context and its own earlier tokens only. Examples are packed whole into rows of 192 tokens
(several short ones share a row, masked from each other), so there is almost no padding; many rows
go through one forward pass, and the vocabulary projection runs only where an ending token is
predicted. Only the first GPT2_VOCAB_SIZE logits enter the softmax (the padding rows of
VOCAB_SIZE=50304 are no text), in the batched path and in the one-example reference
(bench/build_nanogpt.py) alike.
"""

import bisect
import json
import os
import re
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

import atomic
import hub
from device import to_device
from env import UserError, reason
from model import GPT2_VOCAB_SIZE
from settings import HellaSwagFiles
from tokenizer import EOT, encode

HF_DATASET = "Rowan/hellaswag"
# where build-nanogpt downloaded from; GitHub disabled rowanz/hellaswag on 2026-09-14 (DMCA)
GITHUB_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"
FIELDS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id")
VARIANTS = ("nanogpt", "lm-eval")
ROW_WIDTH = 192  # tokens per packed row: wider packs tighter, narrower wastes less attention


class HellaSwagUnavailable(UserError):
    """No HellaSwag data can be had: offline without a local file, or a malformed file."""


# ----- the data ----------------------------------------------------------------------------------

def _download_from_hub(f):
    """Write the Hub's validation rows into the binary file `f`, in the original file's format."""
    from datasets import load_dataset  # heavy, and only needed this once

    rows = load_dataset(HF_DATASET, split="validation")
    for row in tqdm(rows, desc=f"writing {FILENAME}", unit=" rows"):
        row = {key: row[key] for key in FIELDS if key in row}
        row["label"] = int(row["label"])  # a string on the Hub, an int in the original file
        f.write((json.dumps(row) + "\n").encode("utf-8"))


def _download_from_github(f):
    """Write the original file, from the GitHub URL build-nanogpt used, into the binary file `f`."""
    import requests

    with requests.get(GITHUB_URL, stream=True, timeout=30) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length", 0))
        with tqdm(total=total, unit="iB", unit_scale=True, desc=f"downloading {FILENAME}") as bar:
            for chunk in response.iter_content(chunk_size=1 << 16):
                bar.update(f.write(chunk))


def download(path):
    """Fetch the validation split into `path`: from the Hugging Face Hub, else the old GitHub URL.
    Each try writes through atomic_write, so an interrupted download never looks complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    failures = []
    for name, url, fetch in (("huggingface.co", hub.endpoint(), _download_from_hub),
                             ("raw.githubusercontent.com", GITHUB_URL, _download_from_github)):
        if not hub.reachable(url):
            failures.append(f"{name} unreachable")
            continue
        print(f"downloading HellaSwag validation set from {name} to {path}")
        try:
            with atomic.atomic_write(path) as f:
                fetch(f)
            return
        except Exception as error:  # any failure of one source means: try the next one
            failures.append(f"{name}: {reason(error)}")
    raise HellaSwagUnavailable(
        f"no HellaSwag validation data at {path} and no download worked ({'; '.join(failures)}). "
        f"Copy the original {FILENAME} (10,042 rows) there, or set HELLASWAG_PATH=/path/to/{FILENAME}")


def _check_row(row):
    """Return the row with its label as an int and a split type, or a string that says what is
    wrong with it."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("ctx"), str):
        return "no 'ctx' string"
    endings = row.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        return "'endings' is not a list of 4 strings"
    label = row.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or label not in (0, 1, 2, 3):
        return f"'label' must be 0, 1, 2 or 3, got {row.get('label')!r}"
    row["label"] = label
    row.setdefault("split_type", "unknown")
    return row


def read_rows(path, limit=0):
    """Return the rows of a HellaSwag jsonl file (the first `limit` when limit > 0); a bad line is
    reported by its number."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = _check_row(json.loads(line))
                except json.JSONDecodeError as error:
                    raise HellaSwagUnavailable(f"{path} line {number}: not valid JSON ({error.msg})") from None
                if isinstance(row, str):
                    raise HellaSwagUnavailable(f"{path} line {number}: not a HellaSwag row ({row})")
                rows.append(row)
                if len(rows) == limit:
                    break
    except (OSError, UnicodeDecodeError) as error:
        raise HellaSwagUnavailable(f"cannot read HellaSwag file {path}: {reason(error)}") from None
    if not rows:
        raise HellaSwagUnavailable(f"{path} holds no HellaSwag rows")
    return rows


def data_path():
    """Return HELLASWAG_PATH when it is set, else $HELLASWAG_DIR/hellaswag_val.jsonl, downloaded
    first if it is missing."""
    files = HellaSwagFiles.from_env()
    if files.hellaswag_path:
        if not os.path.isfile(files.hellaswag_path):
            raise HellaSwagUnavailable(f"HELLASWAG_PATH={files.hellaswag_path} is not a file")
        return files.hellaswag_path
    path = os.path.join(files.hellaswag_dir, FILENAME)
    if not os.path.isfile(path):
        download(path)
    return path


def load_examples(limit=0):
    """Return the validation rows (the first `limit` when limit > 0), downloading them once if needed."""
    return read_rows(data_path(), limit)


# ----- tokenising --------------------------------------------------------------------------------

def _lm_eval_clean(text):
    """Clean `text` as lm-evaluation-harness does: the bracketed tags are artifacts of HellaSwag's
    wikiHow rows."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def texts(example, variant="nanogpt"):
    """Return the context and the four endings as the variant scores them (each ending without its
    leading space)."""
    if variant == "nanogpt":
        return example["ctx"], example["endings"]
    if "ctx_a" in example and "ctx_b" in example:
        context = example["ctx_a"] + " " + example["ctx_b"].capitalize()
    else:
        context = example["ctx"]  # rows with eval fields only: ctx_b cannot be told apart
    if example.get("activity_label"):
        context = example["activity_label"] + ": " + context
    return _lm_eval_clean(context), [_lm_eval_clean(ending) for ending in example["endings"]]


# context ids, four lists of ending ids, the label, and what acc_norm divides each ending's NLL by
Encoded = namedtuple("Encoded", "context endings label norm")


def encode_example(example, variant="nanogpt", block_size=None):
    """Return the token ids of an example. nanogpt tokenises the context and " " + ending apart
    (as build-nanogpt does); lm-eval tokenises context + " " + ending whole and keeps as the
    ending's ids those after the context's.

    Where a model's block_size is too short, context tokens are dropped from the left (then, in the
    extreme, ending tokens from the right) until every ending fits; at 1024 no HellaSwag row is cut.
    """
    if variant not in VARIANTS:
        raise UserError(f"HellaSwag variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    context_text, ending_texts = texts(example, variant)
    context = encode(context_text)
    if variant == "nanogpt":
        endings = [encode(" " + ending) for ending in ending_texts]
    else:
        endings = [encode(context_text + " " + ending)[len(context):] for ending in ending_texts]
    context = context or [EOT]  # the first ending token must be predicted from something
    if block_size is not None:
        # build-nanogpt feeds context + ending whole, so that must fit (with one context token left)
        endings = [ending[:block_size - 1] for ending in endings]
        context = context[-(block_size - max(len(e) for e in endings)):]
    if variant == "nanogpt":
        norm = [len(ending) for ending in endings]  # mean NLL per token
    else:
        norm = [max(len(ending), 1) for ending in ending_texts]  # per character of the ending
    return Encoded(context, endings, example["label"], norm)


# ----- scoring -----------------------------------------------------------------------------------

def _length(enc):
    """Count the tokens an example takes in a packed row: the context, then each ending but its
    last token (the last is only ever a target)."""
    return len(enc.context) + sum(len(ending) - 1 for ending in enc.endings)


def _fill_rows(encoded, width):
    """Pack the examples into rows by best-fit decreasing: the longest first, each into the row
    with the least room left that still holds it (an example longer than `width` gets a row its
    own length). Rows come out nearly full whatever the lengths: almost no padding. Wider rows
    would pack tighter but cost more attention, which a row computes over its whole width."""
    rows, rooms = [], []  # rooms: sorted (room left, row number)
    for i in sorted(encoded, key=lambda i: -_length(encoded[i])):
        n = _length(encoded[i])
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, r = rooms.pop(k)
        else:
            room, r = max(width, n), len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(rooms, (room - n, r))
    return rows


def _pack(rows, device):
    """Lay `rows` out as the inputs of one forward pass. Each example sits in a row as its context
    followed by its four endings, every ending's positions restarting right after the context.
    Returns ids, positions, the attention mask, and for every ending token to score (in row order)
    the flat position that predicts it, its id and its owner (4 * example number + ending number),
    then the number of examples."""
    width = max(sum(_length(enc) for enc in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (rows, width)
    pos = torch.zeros(len(rows), width, dtype=torch.long)  # (rows, width)
    example = torch.full((len(rows), width), -1, dtype=torch.long)  # (rows, width) which example; -1: padding
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # (rows, width) 0 context, 1-4 ending
    where, target, owner = [], [], []  # one entry per ending token to score
    number = 0
    for r, row in enumerate(rows):
        start = 0
        for enc in row:
            C = len(enc.context)
            ids[r, start:start + C] = torch.tensor(enc.context)
            pos[r, start:start + C] = torch.arange(C)
            segment[r, start:start + C] = 0
            example[r, start:start + _length(enc)] = number
            # every ending's first token is predicted at the context's last position...
            where += [r * width + start + C - 1] * 4
            target += [ending[0] for ending in enc.endings]
            owner += [4 * number + i for i in range(4)]
            start += C
            for i, ending in enumerate(enc.endings):
                n = len(ending) - 1
                ids[r, start:start + n] = torch.tensor(ending[:-1], dtype=torch.long)
                pos[r, start:start + n] = torch.arange(C, C + n)
                segment[r, start:start + n] = i + 1
                # ...and token k at the position of token k-1
                where += range(r * width + start, r * width + start + n)
                target += ending[1:]
                owner += [4 * number + i] * n
                start += n
            number += 1
    # a token sees the earlier tokens of its example's context and of its own ending; padding
    # sees earlier padding (no row of the mask may be empty)
    earlier = torch.ones(width, width, dtype=torch.bool).tril()  # (width, width) query, key
    same_example = example[:, None, :] == example[:, :, None]  # (rows, width, width)
    visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # (rows, width, width)
    mask = (earlier & same_example & visible)[:, None]  # (rows, 1, width, width): the same for every head
    ids, pos, mask, target = to_device([ids, pos, mask, torch.tensor(target)], device)
    return ids, pos, mask, torch.tensor(where), target, torch.tensor(owner), number


def _score_rows(model, rows, runtime, chunk):
    """Return the summed NLL (examples, 4) of every ending of the examples in `rows`, in row order,
    from one forward pass."""
    device = runtime.device
    ids, pos, mask, where, target, owner, count = _pack(rows, device)  # where, target, owner: (targets,)
    hidden = model.hidden(ids, pos=pos, attn_mask=mask).flatten(0, 1)  # (rows * width, n_embd)
    # read after hidden(), which under FSDP gathers the tied weight (already in bf16 there); cast once
    # a batch, not on every chunk
    head = model.lm_head.weight[:GPT2_VOCAB_SIZE].to(runtime.dtype)  # (vocab, n_embd)
    # the context's last position predicts all four first tokens: project each position once
    needed, slot = torch.unique_consecutive(where, return_inverse=True)  # (positions,), (targets,)
    bounds = torch.searchsorted(slot, torch.arange(0, len(needed) + chunk, chunk)).tolist()
    needed, slot = needed.to(device), slot.to(device)
    nll = torch.empty(len(target), dtype=torch.float32, device=device)  # (targets,)
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        # chunks keep the logits small; never the whole batch's at once
        logits = F.linear(hidden[needed[n * chunk:(n + 1) * chunk]].to(head.dtype), head)  # (positions, vocab)
        # softmax accumulates in fp32 inside one fused pass, and a probability keeps bf16's
        # relative precision, so on a CPU -log p stays close to fp32's log-softmax on the same
        # logits for far less than the cost of upcasting them (CUDA autocast runs softmax in
        # fp32); tiny keeps p = 0 finite
        probs = F.softmax(logits, dim=-1)[slot[lo:hi] - n * chunk, target[lo:hi]]  # (targets,) of this chunk
        nll[lo:hi] = -probs.float().clamp_min(torch.finfo(probs.dtype).tiny).log()
    # summed in float64 on the CPU (MPS has no float64)
    return torch.zeros(4 * count, dtype=torch.float64).index_add_(0, owner, nll.cpu().double()).view(-1, 4)


class Result:
    """Holds the per-example scores and the accuracies derived from them."""

    def __init__(self, labels, sum_nll, norm_nll, variant):
        self.variant = variant
        self.labels = labels  # (N,)
        self.sum_nll = sum_nll  # (N, 4) summed NLL of each ending
        self.norm_nll = norm_nll  # (N, 4) per token (nanogpt) or per character (lm-eval)
        self.pred = sum_nll.argmin(dim=1)
        self.pred_norm = norm_nll.argmin(dim=1)
        self.total = len(labels)
        self.correct = int((self.pred == labels).sum())
        self.correct_norm = int((self.pred_norm == labels).sum())

    @property
    def acc(self):
        return self.correct / self.total

    @property
    def acc_norm(self):
        return self.correct_norm / self.total

    def state(self):
        """Return the result as tensors and plain values only, so torch.load(weights_only=True)
        reads it back."""
        return {"variant": self.variant, "labels": self.labels, "sum_nll": self.sum_nll, "norm_nll": self.norm_nll,
                "pred": self.pred, "pred_norm": self.pred_norm, "correct": self.correct,
                "correct_norm": self.correct_norm, "total": self.total, "acc": self.acc, "acc_norm": self.acc_norm}


def default_batch_size(device_type):
    """Return how many examples go through one forward pass: enough rows for the matmuls to run
    near peak."""
    return 256 if device_type == "cuda" else 64


@torch.no_grad()  # not inference_mode: under it autocast re-casts the weights on every call
def evaluate(model, runtime, examples, batch_size=None, variant="nanogpt", progress=False, chunk=1024,
             lockstep=False):
    """Score `examples` with the raw (uncompiled, unwrapped) GPT `model`. Under torchrun every rank
    scores its share and the scores are all-reduced, so every rank returns the same full Result.
    lockstep: every rank makes as many forward passes as the busiest (FSDP, whose forward pass
    gathers each block's weights from all ranks), the extra ones through the blocks only."""
    if variant not in VARIANTS:
        raise UserError(f"HellaSwag variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    batch_size = batch_size or default_batch_size(runtime.device_type)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    mine = range(rank, len(examples), world)
    encoded = {i: encode_example(examples[i], variant, block_size) for i in mine}
    rows = _fill_rows(encoded, ROW_WIDTH)  # longest first: rows of similar width share a batch
    # per example: the four summed NLLs and the four acc_norm divisors
    scores = torch.zeros(len(examples), 2, 4, dtype=torch.float64)  # (examples, 2, 4)
    bar = tqdm(total=len(examples), unit=" examples", disable=not (progress and rank == 0), dynamic_ncols=True)
    batches, count = [], batch_size
    for row in rows:  # whole rows, about batch_size examples per forward pass
        if count >= batch_size:
            batches.append([])
            count = 0
        batches[-1].append(row)
        count += len(row)
    on = runtime.device if distributed and dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    extra = []  # lockstep: batches this rank runs again, for nothing, while the others finish theirs
    if lockstep and distributed:
        most = torch.tensor([len(batches)], device=on)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        if not batches:  # a rank with no example of its own runs the first one
            encoded[0] = encode_example(examples[0], variant, block_size)
        extra = (batches[-1:] or [[[0]]]) * (int(most) - len(batches))  # its narrowest batch
    with runtime.autocast():  # one autocast region: the weights are cast to low precision once
        for batch in batches:
            chosen = [i for row in batch for i in row]
            # (chosen, 4) each: the summed NLLs, then the acc_norm divisors
            scores[chosen, 0] = _score_rows(model, [[encoded[i] for i in row] for row in batch], runtime, chunk)
            scores[chosen, 1] = torch.tensor([encoded[i].norm for i in chosen], dtype=torch.float64)
            bar.update(min(len(chosen) * world, len(examples) - bar.n))
        for batch in extra:  # only the blocks' weight gathers count: nothing is projected or scored
            ids, pos, mask, *_ = _pack([[encoded[i] for i in row] for row in batch], runtime.device)
            model.hidden(ids, pos=pos, attn_mask=mask)
    bar.close()
    if distributed:  # each example is filled on exactly one rank, zero elsewhere
        reduced = scores.to(on)
        dist.all_reduce(reduced)
        scores = reduced.cpu()
    model.train(was_training)
    sum_nll, norm = scores.unbind(dim=1)  # (examples, 4) each
    labels = torch.tensor([ex["label"] for ex in examples])  # (examples,)
    return Result(labels, sum_nll, sum_nll / norm, variant)
