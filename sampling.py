"""Text generation with a key/value cache: the one sampler train.py, generate.py, prompt.py and
the benchmarks share.

With the cache each new token costs one position's forward pass instead of the whole prefix again.
Run it inside the caller's autocast context (`runtime.autocast()`) for low-precision speed.
"""

import torch
from torch.nn import functional as F

from model import GPT2_VOCAB_SIZE, KVCache
from tokenizer import EOT


def _next_token_logits(logits, temperature, top_k, top_p):
    logits = logits[:, :GPT2_VOCAB_SIZE].float()  # padding ids are never emitted
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p and top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose probability adds up to top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # the token that crosses top_p stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
           num_samples=1, generator=None, use_cache=True):
    """Yield a (num_samples,) tensor of new token ids per step. Temperature 0 is greedy.

    Past block_size the window slides: uncached, every step sees the last block_size tokens; cached,
    the cache is rebuilt from the last half block, so later steps are cheap again.
    """
    model.eval()
    block_size = model.config.block_size
    device = next(model.parameters()).device
    tokens = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    cache, fresh = None, tokens[:, -block_size:]
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model.lm_head(model.hidden(tokens[:, -block_size:])[:, -1])
        else:
            if cache is None or cache.length + fresh.size(1) > block_size:
                cache = KVCache(model.config, num_samples)
                fresh = tokens[:, -(block_size // 2 if tokens.size(1) >= block_size else block_size):]
            logits = model.lm_head(model.hidden(fresh, cache=cache)[:, -1])
        logits = _next_token_logits(logits, temperature, top_k, top_p)
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            next_ids = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        fresh = next_ids[:, None]
        yield next_ids


def generate(model, prompt_ids, max_new_tokens, stop_at_eot=True, **kwargs):
    """A list of new token ids per sample, each cut at its first <|endoftext|> (not included)."""
    rows = [[] for _ in range(kwargs.get("num_samples", 1))]
    done = [False] * len(rows)
    for next_ids in stream(model, prompt_ids, max_new_tokens, **kwargs):
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if stop_at_eot and token == EOT:
                done[row] = True
            else:
                rows[row].append(token)
        if all(done):
            break
    return rows


def make_generator(device, seed):
    """A torch.Generator on `device`, so sampling is reproducible and leaves the global RNG alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
