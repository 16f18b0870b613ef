"""The benchmarks' baselines do the same work as the code they are compared with."""

import pytest

import device
from bench.bench_train import BuildNanogptStep, Setup, random_token_dataset


def test_build_nanogpt_baseline_trains_like_train_step(tmp_path):
    """Same weights, same batches, same hyperparameters: the speed-up bench_train reports is for
    the same updates, not for less work."""
    random_token_dataset(tmp_path, tokens=10_000)
    runtime = device.setup("cpu", "float32")
    ours = Setup("tiny", runtime, tmp_path, use_compile=False, batch_size=2, seq_length=64)
    baseline = BuildNanogptStep("tiny", runtime, tmp_path, use_compile=False, batch_size=2, seq_length=64)
    our_losses = [ours.step(lr=3e-2) for _ in range(4)]
    baseline_losses = [baseline.step(lr=3e-2) for _ in range(4)]
    # a large learning rate makes each update move the loss by hundredths (a different weight decay,
    # betas or batch would show); fused and unfused AdamW differ by rounding only
    assert our_losses == pytest.approx(baseline_losses, abs=1e-4)
    assert abs(our_losses[2] - our_losses[0]) > 0.01
