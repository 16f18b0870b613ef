"""This module holds build-nanogpt's own way of doing things: the baselines that benchmarks and tests
compare the kit against. The kit itself never imports it.

HellaSwag, as build-nanogpt scores it: one example per forward pass, its four endings as four
padded rows of context + ending, logits at every position. hellaswag.evaluate packs many examples
into each forward pass and must agree with `reference_scores` (tests/test_hellaswag.py checks);
bench/bench_hellaswag.py times the two.
"""

import contextlib

import torch
from torch.nn import functional as F

from hellaswag import encode_example
from model import GPT2_VOCAB_SIZE


def render_example(example, variant="nanogpt", block_size=None):
    """Render an example as build-nanogpt does: tokens (4, T) holding context + ending per row
    (right-padded with 0), mask (4, T) with 1 over the ending tokens, and the label."""
    return _render(encode_example(example, variant, block_size))


def _render(enc):
    """Lay an encoded example out as render_example's tokens (4, T), mask (4, T) and label."""
    width = max(len(enc.context) + len(ending) for ending in enc.endings)
    tokens = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, ending in enumerate(enc.endings):
        row = enc.context + ending
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(enc.context):len(row)] = 1
    return tokens, mask, enc.label


@torch.no_grad()
def reference_scores(model, example, variant="nanogpt", runtime=None):
    """Score one example in one forward pass, exactly the build-nanogpt way: four padded rows,
    logits at every position (the model under `runtime`'s autocast, the cross-entropy outside it).
    Returns the summed NLL of each ending (4,) and what acc_norm divides it by (4,)."""
    device = next(model.parameters()).device
    enc = encode_example(example, variant, model.config.block_size)
    tokens, mask, _ = _render(enc)  # (4, T) each
    tokens, mask = tokens.to(device), mask.to(device)
    with runtime.autocast() if runtime else contextlib.nullcontext():
        logits, _ = model(tokens)  # (4, T, vocab_size)
    shift_logits = logits[:, :-1, :GPT2_VOCAB_SIZE].contiguous()  # (4, T - 1, GPT2_VOCAB_SIZE)
    losses = F.cross_entropy(shift_logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
    sum_nll = (losses * mask[:, 1:]).sum(dim=1)  # (4,)
    return sum_nll.cpu().double(), torch.tensor(enc.norm, dtype=torch.float64)
