"""The sampler: the key/value cache against full recomputation, the sliding window, the padding ids,
<|endoftext|>, top-k / top-p, seeds and logits that are not finite."""

import contextlib

import pytest
import torch

from env import UserError
from model import GPT, GPTConfig
from sampling import generate, make_generator, sample_next, stream
from tokenizer import EOT


@pytest.fixture(scope="module")
def varied():
    """A tiny model with large random weights: unlike a freshly initialised one, its greedy output
    changes with the context and the position, so a cache mistake changes the tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def padded():
    """A tiny model with GPT-2's padded 50,304-wide vocabulary."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)).eval()


def greedy_reference(model, prompt, steps, window):
    """Greedy decoding by full forward passes; `window(end, start)` gives the context's first index."""
    seq, start = list(prompt), max(0, len(prompt) - model.config.block_size)
    with torch.no_grad():
        for _ in range(steps):
            start = window(len(seq), start)
            logits, _ = model(torch.tensor([seq[start:]]))
            seq.append(logits[0, -1].argmax().item())
    return seq[len(prompt):]


@contextlib.contextmanager
def force_logits(model, edit):
    """Let `edit(step, logits)` change the logits the sampler sees (lm_head runs once per step)."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        edit(len(calls) - 1, output)

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_greedy_cached_equals_uncached_and_full_recomputation(varied):
    prompt = [1, 2, 3, 4, 5]
    cached = generate(varied, prompt, 20, temperature=0, stop_at_eot=False)[0]
    uncached = generate(varied, prompt, 20, temperature=0, stop_at_eot=False, use_cache=False)[0]
    assert cached == uncached == greedy_reference(varied, prompt, 20, lambda end, start: start)
    assert len(set(cached)) > 5  # the model does not just repeat one token


def test_greedy_cached_equals_uncached_for_a_batch(varied):
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]])
    cached = generate(varied, prompts, 20, temperature=0, stop_at_eot=False)
    uncached = generate(varied, prompts, 20, temperature=0, stop_at_eot=False, use_cache=False)
    assert cached == uncached
    assert len({tuple(row) for row in cached}) == 3
    # a row of a batch is what that prompt gives alone
    assert cached[2] == generate(varied, [1, 2, 3, 4], 20, temperature=0, stop_at_eot=False)[0]


@pytest.mark.parametrize("prompt_length", [10, 40])  # shorter and longer than block_size 32
def test_window_slides_past_block_size(varied, prompt_length):
    block = varied.config.block_size
    prompt = [(7 * i) % 64 for i in range(prompt_length)]
    uncached = generate(varied, prompt, 60, temperature=0, stop_at_eot=False, use_cache=False)[0]
    assert uncached == greedy_reference(varied, prompt, 60, lambda end, start: max(0, end - block))
    # cached: once the cache is full it restarts from the last half block, then grows again
    cached = generate(varied, prompt, 60, temperature=0, stop_at_eot=False)[0]
    refill = lambda end, start: end - block // 2 if end - start > block else start  # noqa: E731
    assert cached == greedy_reference(varied, prompt, 60, refill)
    assert cached[:max(0, block - prompt_length) + 1] == uncached[:max(0, block - prompt_length) + 1]


def test_padding_ids_are_never_emitted(padded):
    def boost_padding(step, logits):
        logits[:, 50257:] = 1e4

    with force_logits(padded, boost_padding):
        greedy = generate(padded, [1, 2, 3], 10, temperature=0, stop_at_eot=False)[0]
        sampled = generate(padded, [1, 2, 3], 10, temperature=2.0, num_samples=4, stop_at_eot=False,
                           generator=make_generator("cpu", 0))
        nucleus = generate(padded, [1, 2, 3], 10, temperature=2.0, top_k=50000, top_p=0.9, stop_at_eot=False)[0]
    emitted = greedy + nucleus + [t for row in sampled for t in row]
    assert len(emitted) == 60 and max(emitted) < 50257


def test_stops_at_end_of_text(padded):
    def eot_for_row0_at_step3(step, logits):
        if step == 3:
            logits[0, EOT] = 1e4

    prompts = torch.tensor([[1, 2], [3, 4]])
    with force_logits(padded, eot_for_row0_at_step3):
        steps = list(stream(padded, prompts, 12, temperature=0))
    with force_logits(padded, eot_for_row0_at_step3):
        rows = generate(padded, prompts, 12, temperature=0)
    # row 0 ends at step 3 and keeps yielding <|endoftext|>; row 1 goes on to the limit
    assert len(steps) == 12
    assert [s[0].item() for s in steps[3:]] == [EOT] * 9 and EOT not in [s[1].item() for s in steps]
    assert len(rows[0]) == 3 and len(rows[1]) == 12 and rows[0] == [s[0].item() for s in steps[:3]]

    with force_logits(padded, lambda step, logits: logits[:, EOT].fill_(1e4) if step == 2 else None):
        steps = list(stream(padded, [1, 2], 12, temperature=0, num_samples=2))
    assert len(steps) == 3  # every row ended: the stream stops


def test_empty_prompt_starts_from_end_of_text(padded):
    assert generate(padded, [], 5, temperature=0) == generate(padded, [EOT], 5, temperature=0)
    assert generate(padded, [1], 0) == [[]]


def draw(logits, n=20000, **options):
    """Frequencies of each id over n draws from the same logits row."""
    ids = sample_next(logits.expand(n, -1), generator=make_generator("cpu", 0), **options)
    return torch.bincount(ids, minlength=logits.size(-1)).float() / n


def test_top_k_top_p_and_temperature():
    probs = torch.tensor([0.15, 0.3, 0.05, 0.5, 0.0])  # likeliest first: ids 3, 1, 0, 2
    logits = probs.log()[None]

    def expect(frequencies, kept):
        target = torch.zeros(5)
        target[kept] = probs[kept] / probs[kept].sum()
        torch.testing.assert_close(frequencies, target, atol=0.015, rtol=0)
        assert (frequencies[[i for i in range(5) if i not in kept]] == 0).all()

    expect(draw(logits), [3, 1, 0, 2])
    expect(draw(logits, top_k=2), [3, 1])
    expect(draw(logits, top_k=3), [3, 1, 0])
    expect(draw(logits, top_p=0.79), [3, 1])  # 0.5 alone is short of 0.79: the second is needed
    expect(draw(logits, top_p=0.8), [3, 1])  # 0.5 + 0.3 reach 0.8 exactly: the third is not
    expect(draw(logits, top_p=0.81), [3, 1, 0])
    expect(draw(logits, top_p=0.4), [3])
    expect(draw(logits, top_k=3, top_p=0.7), [3, 1])  # top_p on the top 3 renormalised: 0.53, 0.32
    squared = draw(logits, temperature=0.5)  # p ** (1 / 0.5), renormalised
    torch.testing.assert_close(squared, probs ** 2 / (probs ** 2).sum(), atol=0.015, rtol=0)
    assert sample_next(logits, temperature=0).item() == 3


def test_sample_next_ignores_padding_logits():
    logits = torch.zeros(1, 50304)
    logits[0, 50257:] = 1e4
    logits[0, 42] = 1.0
    assert sample_next(logits, temperature=0).item() == 42
    assert draw(logits, n=200, temperature=5.0)[50257:].sum() == 0


def test_seed_reproducibility(padded):
    def sample(seed):
        return generate(padded, [1, 2, 3], 15, temperature=1.0, num_samples=3, stop_at_eot=False,
                        generator=make_generator("cpu", seed))

    global_state = torch.random.get_rng_state()
    first = sample(1337)
    assert sample(1337) == first
    assert sample(1338) != first
    assert len({tuple(row) for row in first}) == 3  # rows of one call are independent samples
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the global RNG is untouched


def test_training_mode_is_restored(varied):
    varied.train()
    generate(varied, [1, 2], 3)
    assert varied.training
    varied.eval()


@pytest.fixture(scope="module")
def diverged():
    """A tiny model with one weight all nan, as a run that diverged leaves it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=1, n_embd=16)).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    return model


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0, use_cache=False),
                                     dict(temperature=0.8, top_k=50), dict(temperature=0.8, top_k=50, top_p=0.95),
                                     dict(temperature=1.0, top_p=0.9), dict(temperature=1.0)])
def test_a_diverged_model_stops_with_one_line(diverged, options):
    with pytest.raises(UserError) as error:
        generate(diverged, [1, 2, 3], 5, num_samples=2, generator=make_generator("cpu", 0), **options)
    message = str(error.value)
    assert message.startswith("the model's logits are not finite (nan or inf)") and "earlier checkpoint" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_sample_next_refuses_nan_and_inf_but_not_a_ruled_out_token(bad):
    logits = torch.zeros(2, 5)
    logits[0, 2] = -float("inf")  # a token ruled out: fine
    assert sample_next(logits, temperature=0).tolist() == [0, 0]
    if bad == "all -inf":
        logits[1] = -float("inf")
    else:
        logits[1, 3] = float(bad)
    for options in (dict(temperature=0), dict(temperature=0.8, top_k=3), dict(temperature=0.8, top_p=0.9)):
        with pytest.raises(UserError, match="logits are not finite"):
            sample_next(logits, **options)


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_logits_that_turn_infinite_mid_stream_stop_it(padded, temperature):
    def inf_in_row1_at_step2(step, logits):
        if step == 2:
            logits[1, 7] = float("inf")

    steps = []
    tokens = stream(padded, [1, 2, 3], 6, temperature=temperature, top_k=50, num_samples=2, stop_at_eot=False)
    with force_logits(padded, inf_in_row1_at_step2), pytest.raises(UserError, match="logits are not finite"):
        for ids in tokens:
            steps.append(ids)
    assert len(steps) == 2  # the two healthy steps, and no token from the third
    assert not padded.training
