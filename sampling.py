"""Text generation with a key/value cache: the one sampler train.py, generate.py, prompt.py and
the benchmarks share.

With the cache each new token costs one position's forward pass instead of the whole prefix again.
Run it inside the caller's autocast context (`runtime.autocast()`) for low-precision speed. The
settings generate.py and prompt.py sample with are `settings.SamplingConfig`.
"""

import torch
from torch.nn import functional as F

from env import UserError
from model import GPT2_VOCAB_SIZE, KVCache
from tokenizer import EOT


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token id per row of (B, vocab_size) logits. Ids from 50257 up, the padding rows of a
    50304-wide vocabulary, are never picked. A row with a nan or +inf (or only -inf) stops with a
    UserError instead of becoming tokens (argmax) or a traceback (multinomial); a -inf alone only
    rules its token out. The check syncs once per step, as multinomial and stream's end-of-text
    check do anyway."""
    logits = logits[:, :GPT2_VOCAB_SIZE].float()
    if not torch.isfinite(logits.amax(-1)).all():  # the max is nan where any logit is
        raise UserError("the model's logits are not finite (nan or inf): its weights have diverged "
                        "(use an earlier checkpoint), or float16 overflowed (try DTYPE=float32)")
    if temperature == 0:
        return logits.argmax(-1)
    # the candidates, likeliest first: the top k, or every token when only top_p filters
    ids = None
    if top_k and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k)
    elif top_p and top_p < 1:
        logits, ids = torch.sort(logits, descending=True)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p and top_p < 1:
        # nucleus: drop a candidate once the likelier ones already reach top_p (the first always stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # renormalises what is left
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


@torch.no_grad()
def stream(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
           num_samples=1, generator=None, use_cache=True, stop_at_eot=True):
    """Yield the next token of every row, a (rows,) tensor per step. Temperature 0 is greedy.

    prompt_ids: a list of ids that num_samples rows share, or a (rows, T) tensor of prompts of one
    length. An empty prompt starts from <|endoftext|>, as every training document does.
    stop_at_eot: a row that produced <|endoftext|> yields it again from then on, and the stream
    ends once every row has.
    Past block_size the window slides: uncached, every step sees the last block_size tokens; cached,
    a full cache is refilled from the last block_size // 2 tokens, so most steps stay one token.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt.expand(num_samples, -1)
    if prompt.size(1) == 0:
        prompt = torch.full((prompt.size(0), 1), EOT, dtype=torch.long, device=device)
    rows, start = prompt.shape
    block_size = model.config.block_size
    # the whole sequence lives in one buffer: a step writes a column instead of copying everything
    tokens = torch.empty(rows, start + max_new_tokens, dtype=torch.long, device=device)
    tokens[:, :start] = prompt
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    cache = KVCache(model.config, rows) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        for end in range(start, start + max_new_tokens):
            if cache is None:
                context = tokens[:, max(0, end - block_size):end]
            elif cache.length == 0 or cache.length == block_size:
                # (re)fill: the prompt at first (its last block if longer), later the last half block
                keep = block_size if cache.length == 0 else max(1, block_size // 2)
                cache.length = 0  # the buffer is reused, only overwritten
                context = tokens[:, max(0, end - keep):end]
            else:
                context = tokens[:, end - 1:end]
            # the vocabulary projection only for the last position: the only logits sampled from
            logits = model.lm_head(model.hidden(context, cache=cache)[:, -1])
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_at_eot:
                next_ids = next_ids.masked_fill(done, EOT)
                done |= next_ids == EOT
            tokens[:, end] = next_ids
            yield next_ids
            if stop_at_eot and done.all():
                return
    finally:
        model.train(was_training)


def generate(model, prompt_ids, max_new_tokens, stop_at_eot=True, **kwargs):
    """Return the new token ids of every row as lists, each cut before its first <|endoftext|>."""
    steps = list(stream(model, prompt_ids, max_new_tokens, stop_at_eot=stop_at_eot, **kwargs))
    if not steps:  # max_new_tokens == 0
        return [[] for _ in range(len(prompt_ids) if torch.is_tensor(prompt_ids) else kwargs.get("num_samples", 1))]
    rows = torch.stack(steps, dim=1).tolist()
    return [cut_at_eot(row) if stop_at_eot else row for row in rows]


def cut_at_eot(row):
    """Return the token ids before the first <|endoftext|>."""
    return row[:row.index(EOT)] if EOT in row else row


def make_generator(device, seed):
    """Make a seeded torch.Generator on `device`: sampling is reproducible and leaves the global RNG alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
