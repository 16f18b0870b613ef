"""These tests check GPT-2 against Hugging Face's reference implementation, its losses, and that it learns."""

import math

import pytest
import torch
from torch.nn import functional as F

from env import UserError
import model as model_module
from model import GPT, GPTConfig, KVCache, newton_schulz_float32

TINY = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
# torch's own Newton-Schulz, read when pytest imports this file, before any test's Muon can replace it
TORCH_NEWTON_SCHULZ = torch.optim._muon._zeropower_via_newtonschulz


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=2, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def test_logits_match_transformers(hf_model):
    ours = GPT.from_hf(hf_model).eval()
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(idx).logits
        logits, loss = ours(idx, targets=idx)
    assert logits.shape == (3, 40, 50257)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 50257), idx.view(-1)))


def test_to_hf_crops_padded_vocab_and_round_trips():
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**{**TINY, "vocab_size": 50304})).eval()
    hf = ours.to_hf()
    assert hf.config.vocab_size == 50257
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :50257], atol=1e-4, rtol=0)
        back = GPT.from_hf(hf).eval()
        torch.testing.assert_close(back(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_parameter_names_follow_nanogpt():
    names = list(GPT(GPTConfig(**TINY)).state_dict())
    assert names[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]
    assert "transformer.h.1.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.bias" in names
    assert names[-1] == "lm_head.weight"


def test_optimizer_groups_print_original_counts(capsys):
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=128))
    model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    out = capsys.readouterr().out
    assert "num decayed parameter tensors: 10, with 6,858,880 parameters" in out
    assert "num non-decayed parameter tensors: 18, with 3,584 parameters" in out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_groups_cover_every_parameter_exactly_once(optimizer, capsys):
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=128))
    optimizers = model.configure_optimizers(0.1, 6e-4, "cpu", optimizer=optimizer)
    names = {id(p): name for name, p in model.named_parameters()}  # wte and lm_head: one tensor, one name
    grouped = [names[id(p)] for o in optimizers for group in o.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(names.values())
    out = capsys.readouterr().out
    if optimizer == "adamw":
        assert [type(o) for o in optimizers] == [torch.optim.AdamW] and "Muon" not in out
        return
    adamw, muon = optimizers
    assert type(muon) is torch.optim.Muon and muon.defaults["adjust_lr_fn"] == "match_rms_adamw"
    assert sorted(names[id(p)] for p in muon.param_groups[0]["params"]) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    # AdamW keeps the embeddings (wpe and wte, tied to lm_head) decayed, biases and LayerNorm gains not
    assert sorted(names[id(p)] for p in adamw.param_groups[0]["params"]) == ["transformer.wpe.weight",
                                                                              "transformer.wte.weight"]
    assert out.splitlines() == [
        "num Muon parameter tensors: 8, with 393,216 parameters (attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj "
        "of every block)",
        "num decayed parameter tensors: 2, with 6,465,664 parameters",
        "num non-decayed parameter tensors: 18, with 3,584 parameters",
        "using fused AdamW: True"]


def test_float32_newton_schulz_is_torchs_iteration():
    """The float32 replacement computes what torch's bfloat16 Newton-Schulz does, up to bf16's precision."""
    assert TORCH_NEWTON_SCHULZ is not newton_schulz_float32  # captured before any Muon replaced it
    torch.manual_seed(0)
    for shape in ((32, 96), (96, 32)):  # wide and tall (c_attn's and c_proj's layouts)
        grad = torch.randn(shape)
        ours = newton_schulz_float32(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
        theirs = TORCH_NEWTON_SCHULZ(grad, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
        assert ours.dtype == torch.float32 and ours.shape == grad.shape
        assert torch.linalg.norm(ours - theirs) < 0.05 * torch.linalg.norm(theirs)  # bf16's rounding, amplified
        singular_values = torch.linalg.svdvals(ours)
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # about orthogonal


def test_muon_steps_through_the_float32_iteration_once_it_is_installed(monkeypatch):
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", TORCH_NEWTON_SCHULZ)  # restored after
    model_module.use_float32_newton_schulz()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 96))
    p0 = p.detach().clone()
    p.grad = torch.randn(32, 96)
    torch.optim.Muon([p], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    # a first step's Nesterov momentum is a multiple of the gradient, which the iteration normalises away;
    # torch's bfloat16 rounding is ~100x this tolerance
    orthogonalised = newton_schulz_float32(p.grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    expected = p0 * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(96) * orthogonalised  # match_rms_adamw's scale
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=8, n_head=4, n_embd=256))
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc_std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert model.transformer.wte.weight is model.lm_head.weight


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model.hidden(idx)
        cache = KVCache(model.config, batch_size=2)
        parts = [model.hidden(idx[:, :17], cache=cache)]
        parts += [model.hidden(idx[:, t:t + 1], cache=cache) for t in range(17, 25)]
        parts += [model.hidden(idx[:, 25:], cache=cache)]  # several new tokens after a prefix
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_rows_of_different_lengths_decode_together_as_each_alone():
    """A server's batch: three prompts of different lengths, each filled into its own row, then
    decoded together, one token a step, and one row moved into another's place midway: every row's
    hidden states are those of its sequence run whole."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    sequences = [torch.randint(0, 50257, (1, length + 6)) for length in (5, 11, 8)]
    with torch.no_grad():
        whole = [model.hidden(seq)[0] for seq in sequences]
        cache = KVCache(model.config, batch_size=3)
        for row, seq in enumerate(sequences):  # each prompt alone, into its row
            model.hidden(seq[:, :-6], cache=cache.use(row, 1))
        for step in range(6):
            if step == 3:  # row 0 finishes: row 2 takes its place, and the batch shrinks
                cache.move(2, 0)
                sequences, whole = [sequences[2], sequences[1]], [whole[2], whole[1]]
            live = len(sequences)
            tokens = torch.cat([seq[:, cache.lengths[row]:cache.lengths[row] + 1] for row, seq in enumerate(sequences)])
            positions = [cache.lengths[row] for row in range(live)]
            out = model.hidden(tokens, cache=cache.use(0, live))[:, 0]
            for row in range(live):
                torch.testing.assert_close(out[row], whole[row][positions[row]], atol=1e-5, rtol=0)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=64))
    [optimizer] = model.configure_optimizers(0.0, 3e-3, "cpu", verbose=False)
    x = torch.randint(0, 50257, (4, 33))
    for step in range(200):
        _, loss = model(x[:, :-1], targets=x[:, 1:], return_logits=False)  # the training path
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5, f"loss still {loss.item():.3f} after {step + 1} steps"


@pytest.mark.parametrize("env, message", [
    ({"N_LAYER": "abc"}, "N_LAYER must be an integer"),
    ({"N_HEAD": "0"}, "N_HEAD must be >= 1"),
    ({"BLOCK_SIZE": "-4"}, "BLOCK_SIZE must be >= 1"),
    ({"N_EMBD": "100", "N_HEAD": "3"}, "N_EMBD (100) must be divisible by N_HEAD (3)"),
    ({"DROPOUT": "x"}, "DROPOUT must be a number"),
])
def test_config_from_env_rejects_bad_values(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig.from_env()


def test_config_from_env_defaults_and_overrides(monkeypatch):
    assert GPTConfig.from_env() == GPTConfig(1024, 50304, 12, 12, 768, 0.0)
    monkeypatch.setenv("N_LAYER", "2")
    monkeypatch.setenv("BLOCK_SIZE", "2.56e2")
    config = GPTConfig.from_env()
    assert (config.n_layer, config.block_size) == (2, 256)


@pytest.mark.parametrize("batch, length", [(3, 32), (2, 50)])  # whole chunks, and a ragged last chunk
def test_chunked_loss_equals_full_logits_loss_and_gradients(monkeypatch, batch, length):
    monkeypatch.setitem(model_module.LOSS_CHUNK_TOKENS, "cpu", 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 50304}))
    idx = torch.randint(0, 50257, (batch, length))
    targets = torch.randint(0, 50257, (batch, length))
    _, reference = model(idx, targets)
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits, loss = model(idx, targets, return_logits=False)
    (2 * loss).backward()  # the incoming gradient scales both gradients
    assert logits is None
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_loss_stays_finite_when_the_target_probability_underflows():
    """A diverging run can put the target 200 logits below another token: its probability underflows
    float32, and the loss stops at 87 nats instead of going to inf; the gradient stays exact."""
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [200.0, 0.0], [0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0])
    loss = model_module.ChunkedCrossEntropy.apply(h, weight, targets, 8)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))
    h_ref, weight_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.cross_entropy(h_ref @ weight_ref.t(), targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(weight.grad, weight_ref.grad)


def test_float16_chunked_loss_gradients_equal_float32_cross_entropys():
    """1,024 tokens of one chunk share a target and their hidden states are near 100: the weight
    gradient of that target sums to about -100,000, past float16's largest number (65,504). It is
    accumulated in float32, so the gradients equal F.cross_entropy's in float32 on the same inputs."""
    torch.manual_seed(0)
    tokens, width = 1024, 64
    h = (100 + torch.randn(tokens, width)).half().float().requires_grad_()  # exact in float16
    weight = (0.002 * torch.randn(50304, width)).half().float().requires_grad_()
    targets = torch.full((tokens,), 7)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model_module.chunked_cross_entropy(h, weight, targets)
    loss.backward()
    h_ref, weight_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = F.cross_entropy(h_ref @ weight_ref.t(), targets)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    for grad, expected in ((h.grad, h_ref.grad), (weight.grad, weight_ref.grad)):
        assert torch.isfinite(grad).all()
        assert (grad - expected).norm() / expected.norm() < 1e-3


def test_training_and_validation_losses_equal_cross_entropy_on_full_logits(monkeypatch):
    """The chunked loss with gradients (training), without them (validation) and model(x, y) are all
    F.cross_entropy on the full logits; the validation path neither computes gradients nor builds a graph."""
    computes_gradients = []
    loop = model_module.cross_entropy_sum

    def recording_loop(*args, gradients):
        computes_gradients.append(gradients)
        return loop(*args, gradients=gradients)

    monkeypatch.setattr(model_module, "cross_entropy_sum", recording_loop)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 50257, (3, 40))
    targets = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        logits = model.lm_head(model.hidden(idx))
        reference = F.cross_entropy(logits.view(-1, 50304), targets.view(-1))
    _, training = model(idx, targets, return_logits=False)
    with torch.no_grad():
        _, validation = model(idx, targets, return_logits=False)
    _, plain = model(idx, targets)
    for loss in (training, validation, plain):
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    assert training.requires_grad and training.grad_fn is not None
    assert not validation.requires_grad and validation.grad_fn is None
    assert computes_gradients == [True, False]
