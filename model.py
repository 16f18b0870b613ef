"""The GPT-2 model, in one module to read top to bottom: attention, MLP, block and GPT come first,
then the KV cache that generation uses, the chunked loss that makes training faster, and last
Muon's orthogonalisation in float32 for CPUs without bfloat16 hardware.

Parameter names follow nanoGPT (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`,
..., `lm_head.weight`), so checkpoints interoperate with tools that read nanoGPT's, and the
architecture is OpenAI's GPT-2 exactly, so Hugging Face's `GPT2LMHeadModel` converts both ways.
"""

import inspect
import os

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from device import cpu_has_native_bf16
from env import UserError, reason
# the model's shape is a setting like every other, and settings.py lists them all
from settings import GPTConfig

# GPT-2's real vocabulary: 50,000 BPE merges + 256 bytes + <|endoftext|>. VOCAB_SIZE defaults to
# 50304 (a multiple of 128, faster matmuls); rows from 50257 up are padding no text ever uses, so
# everything that samples or scores looks at the first GPT2_VOCAB_SIZE logits only.
GPT2_VOCAB_SIZE = 50257


class CausalSelfAttention(nn.Module):
    """Each of n_head heads lets every token attend to itself and the tokens before it."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        qkv = self.c_attn(x)  # (B, T, 3 * C)
        q, k, v = qkv.split(self.n_embd, dim=2)  # each (B, T, C)
        # every head attends independently: (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # (B, n_head, prefix + T, head_dim), and the mask the rows' prefixes need (None: none)
            k, v, cache_mask = cache.append(self.layer, k, v)
            attn_mask = cache_mask if attn_mask is None else attn_mask
        is_causal = attn_mask is None and k.size(2) == T and T > 1  # no prefix: plain causal attention
        dropout = self.dropout if self.training else 0.0
        # (B, n_head, T, head_dim): for each token, the values it attends to, weighted
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Each token on its own goes through a hidden layer four times as wide as the model."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Attention and then the MLP each read a LayerNorm of the residual stream and add their output
    back to it (pre-LayerNorm, as in GPT-2), so the residual stream itself is never normalised."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.checkpointing = False  # activation checkpointing: GPT.checkpoint_activations

    def forward(self, x, attn_mask=None, cache=None):
        if self.checkpointing and torch.is_grad_enabled() and cache is None:
            # keep only x for backward, which computes the block again (with the same dropout)
            return checkpoint(self.residual, x, attn_mask, cache, use_reentrant=False)
        return self.residual(x, attn_mask, cache)

    def residual(self, x, attn_mask, cache):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 adds token and position embeddings, runs n_layer blocks and a final LayerNorm, and
    projects back onto the vocabulary with the token embedding's own matrix."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection share one matrix
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # each block adds two projections to the residual stream: keep its variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, pos=None, attn_mask=None, cache=None):
        """Return the final hidden states (B, T, n_embd), after ln_f and before the vocabulary projection.

        `pos` holds the position ids (B, T); they default to 0..T-1 after whatever `cache` already
        holds. With explicit positions a row may be longer than block_size (HellaSwag packs four
        endings side by side). `attn_mask` is boolean (B, 1, T, T), True where a token may attend,
        and causal by default. `cache` is a KVCache that this call extends (generation).
        """
        B, T = idx.size()
        if pos is None and cache is not None:
            pos = cache.positions(T, idx.device)  # after each row's prefix
        elif pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, return_logits=True):
        """Return the logits (B, T, vocab_size) at every position and, when targets (B, T) are given,
        their mean cross-entropy (else None).

        Training and validation pass return_logits=False: the logits then come back as None, and the
        same loss comes from chunked_cross_entropy at the bottom of this file."""
        # GPT.hidden, not self.hidden: under FSDP the instance's hidden is wrapped to gather the
        # weights, as forward() itself already is
        h = GPT.hidden(self, idx)
        if targets is not None and not return_logits:
            # the same loss, faster: the (tokens x vocabulary) logits never exist in full
            return None, chunked_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def checkpoint_activations(self, on=True):
        """Have every block keep only its input for the backward pass, which runs the block's forward
        again to get the rest: activation memory of one block instead of all, for a third more
        compute. The parameters and their names do not change, so checkpoints do not either."""
        for block in self.transformer.h:
            block.checkpointing = on

    def configure_optimizers(self, weight_decay, learning_rate, device_type, verbose=True, optimizer="adamw"):
        """Return the optimizers, a list: AdamW with GPT-2's betas, decaying the matmul weights and
        embeddings only; with optimizer="muon", AdamW on all but the blocks' matrices, then Muon on those."""
        muon = self.muon_matrices() if optimizer == "muon" else []
        taken = {id(p) for p in muon}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        # weight decay on matmul weights and embeddings (2-D), never on biases and LayerNorm gains
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        if verbose and muon:
            print(f"num Muon parameter tensors: {len(muon)}, with {sum(p.numel() for p in muon):,} parameters "
                  "(attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj of every block)")
        if verbose:
            print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
            print(f"num non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel does the whole update in one pass over the parameters
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        if verbose:
            print(f"using fused AdamW: {fused}")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        if not muon:
            return [adamw]
        if device_type == "cpu" and not cpu_has_native_bf16():
            use_float32_newton_schulz()
        # match_rms_adamw scales each matrix's step to the size AdamW's would have, so MAX_LR, the
        # schedule and WEIGHT_DECAY mean the same for both optimizers
        return [adamw, torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay,
                                        adjust_lr_fn="match_rms_adamw")]

    def muon_matrices(self):
        """Return the weight matrices Muon updates: the four of every block. The fused query-key-value
        matrix stays one matrix (its name and shape are what checkpoints and Hugging Face know); the
        embeddings and the output layer tied to them are no hidden layer's matrix, so AdamW keeps them."""
        return [linear.weight for block in self.transformer.h
                for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
                if linear.weight.requires_grad]

    def num_params(self, non_embedding=True):
        """Return the number of parameters; non_embedding leaves out the position table (the token
        table stays in, since it is also the output projection), as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Return the forward + backward FLOPs per token (PaLM appendix B): 6N for the matmuls plus
        attention's."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    # ----- Hugging Face interop ------------------------------------------------------------------
    # HF's GPT-2 stores these four matmuls as Conv1D modules, i.e. transposed (in, out) matrices.
    _HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf(cls, hf_model):
        """Return this model with the weights of a transformers `GPT2LMHeadModel`; the vocabulary
        stays at 50257."""
        hf = hf_model.config
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size,
                           n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd)
        model = cls(config)
        ours = model.state_dict()
        for name, tensor in hf_model.state_dict().items():
            if name not in ours:
                continue  # buffers such as the old causal-mask `attn.bias`
            if name.endswith(cls._HF_TRANSPOSED):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise UserError(f"Hugging Face weight {name} has shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}")
            ours[name] = tensor
        model.load_state_dict(ours)
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """Return OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) from the Hub, or
        the `GPT2LMHeadModel` saved in a local directory."""
        import hub
        from transformers import GPT2LMHeadModel

        try:
            if os.path.isdir(name_or_dir) or not hub.reachable():
                # a local directory, or a Hub model downloaded before into the Hugging Face cache
                try:
                    hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir, local_files_only=True)
                except OSError:
                    if os.path.isdir(name_or_dir):
                        raise
                    hub.require(f"'{name_or_dir}'", "download it where you have network (GPT2LMHeadModel"
                                f".from_pretrained('{name_or_dir}').save_pretrained(DIR)) and point at DIR instead")
            else:
                hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load a GPT-2 model from {name_or_dir!r}: {reason(error)}") from None
        return cls.from_hf(hf_model)

    def to_hf(self):
        """Return a transformers `GPT2LMHeadModel` with these weights; a padded vocabulary is cropped
        to 50257."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        vocab = min(c.vocab_size, GPT2_VOCAB_SIZE)
        hf_config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                               n_head=c.n_head, activation_function="gelu_new", resid_pdrop=c.dropout,
                               embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=True,
                               bos_token_id=GPT2_VOCAB_SIZE - 1, eos_token_id=GPT2_VOCAB_SIZE - 1)
        hf_model = GPT2LMHeadModel(hf_config)
        theirs = hf_model.state_dict()
        for name, tensor in self.state_dict().items():
            if name not in theirs:
                continue
            tensor = tensor.detach()
            if name.endswith(self._HF_TRANSPOSED):
                tensor = tensor.t()
            if name in ("transformer.wte.weight", "lm_head.weight"):
                tensor = tensor[:vocab]
            theirs[name] = tensor.contiguous()
        hf_model.load_state_dict(theirs)
        hf_model.tie_weights()
        return hf_model.eval()


class KVCache:
    """Generation keeps the keys and values of the tokens seen so far here, so that a new token
    attends to the prefix without recomputing it. Every row has a length of its own, so that a
    server's requests (serve.py), each at its own point, decode together in one batch: a forward
    pass extends the rows that use() picked, all of them at first. The buffer is allocated on first
    use, in the dtype the attention actually produces."""

    def __init__(self, config, batch_size):
        self.config = config
        self.batch_size = batch_size
        self.lengths = [0] * batch_size  # tokens stored in each row
        self.rows = range(batch_size)  # the rows the next forward pass extends, in its batch's order
        self.kv = None
        # of the forward pass under way, worked out once by positions() for every layer's append():
        self.starts = [0] * batch_size  # each of its rows' length before it
        self.mask = None  # its attention mask (None: none needed)
        self.scatter = None  # a decode step of rows of different lengths: (batch rows, positions) its keys go to

    @property
    def length(self):
        """The rows' common length, where they all grow together (sampling.stream)."""
        return self.lengths[0]

    @length.setter
    def length(self, value):
        self.lengths = [value] * self.batch_size

    def use(self, first, count):
        """Have the next forward pass extend rows first .. first + count - 1, its batch in that order."""
        self.rows = range(first, first + count)
        return self

    def positions(self, T, device):
        """Return the position ids of T new tokens in each row, (T,) or (rows, T), and make the
        forward pass's attention mask: a new token sees its row's prefix and, of the new tokens,
        itself and the ones before. Rows of one length need none (T == 1 sees everything; an empty
        prefix is plain causal attention) and take exactly the path single-prompt generation does."""
        self.starts = starts = [self.lengths[r] for r in self.rows]
        if max(starts) + T > self.config.block_size:
            raise ValueError(f"sequence of {max(starts) + T} tokens exceeds block_size {self.config.block_size}")
        self.scatter = None
        if len(set(starts)) == 1:
            start = starts[0]
            self.mask = (torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
                         if start > 0 and T > 1 else None)
            return torch.arange(start, start + T, dtype=torch.long, device=device)
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (rows, T)
        keys = torch.arange(max(starts) + T, device=device)
        self.mask = (keys <= pos[:, :, None])[:, None]  # (rows, 1, T, keys): nothing past the row's own end
        if T == 1:
            self.scatter = (torch.arange(len(starts), device=device), pos[:, 0])
        return pos

    def append(self, layer, k, v):
        """Store this layer's new keys and values (rows, n_head, T, head_dim) after each row's prefix;
        return the rows' keys and values so far, (rows, n_head, keys, head_dim) each, and the mask."""
        if self.kv is None:
            n_head, head_dim = k.size(1), k.size(3)
            shape = (self.config.n_layer, 2, self.batch_size, n_head, self.config.block_size, head_dim)
            # zeros: a row shorter than the batch's longest reads slots past its end, masked out, and
            # never-written memory could hold a nan (the mask's 0 times nan is nan)
            self.kv = torch.zeros(shape, dtype=k.dtype, device=k.device)
        T, rows, starts = k.size(2), slice(self.rows.start, self.rows.stop), self.starts
        if self.scatter is not None:  # a server's decode step: one scatter for the batch
            self.kv[layer, 0, rows][self.scatter[0], :, self.scatter[1]] = k[:, :, 0]
            self.kv[layer, 1, rows][self.scatter[0], :, self.scatter[1]] = v[:, :, 0]
        elif len(set(starts)) == 1:
            self.kv[layer, 0, rows, :, starts[0]:starts[0] + T] = k
            self.kv[layer, 1, rows, :, starts[0]:starts[0] + T] = v
        else:
            for i, start in enumerate(starts):
                self.kv[layer, :, self.rows[i], :, start:start + T] = torch.stack((k[i], v[i]))
        end = max(starts) + T
        return self.kv[layer, 0, rows, :, :end], self.kv[layer, 1, rows, :, :end], self.mask

    def advance(self, T):
        """Count the forward pass's T new tokens in its rows."""
        for r in self.rows:
            self.lengths[r] += T

    def move(self, source, target):
        """Copy row `source` into row `target` (a server closing the gap a finished request left)."""
        end = self.lengths[source]
        if self.kv is not None and end:
            self.kv[:, :, target, :, :end] = self.kv[:, :, source, :, :end]
        self.lengths[target] = end


# ----- The training loss's speed trick ---------------------------------------------------------
# On small models the memory traffic of the (tokens x vocabulary) logits, not the matmuls, is what
# costs the time, so the loss goes through lm_head a chunk of tokens at a time and never holds them
# in full. It is F.cross_entropy's loss, except that a token's loss stops at 87 nats (-log of
# float32's smallest normal number), where its probability leaves float32's normal range: only a
# diverging run has such logit gaps.

# tokens per chunk: big enough for fast matmuls, small enough that one chunk's float32 logits
# (chunk x vocab_size) stay a modest buffer
LOSS_CHUNK_TOKENS = {"cpu": 1024, "mps": 4096, "cuda": 8192}


def chunked_cross_entropy(h, weight, targets):
    """Return the mean cross-entropy of the logits h @ weight.T, hidden states h (tokens, n_embd)
    against targets (tokens,), going LOSS_CHUNK_TOKENS tokens at a time.

    When gradients are wanted, ChunkedCrossEntropy computes them during the same pass; under
    torch.no_grad (validation) only the loss is computed."""
    chunk_size = LOSS_CHUNK_TOKENS.get(h.device.type, 8192)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(h, weight, targets, chunk_size)
    loss_sum, _, _ = cross_entropy_sum(h, weight, targets, chunk_size, gradients=False)
    return loss_sum / h.size(0)


def cross_entropy_sum(h, weight, targets, chunk_size, gradients):
    """Return the summed cross-entropy of h @ weight.T against targets, chunk_size tokens at a time,
    and with `gradients` that sum's gradients with respect to h and weight (else None and None).

    Both the training and the validation loss come from this one loop, so they cannot drift apart."""
    # under autocast the matmuls run in the low precision, the softmax always in float32
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    grad_h = grad_w = None
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        if gradients:
            grad_h = torch.empty(h.shape, dtype=dtype, device=h.device)
            # accumulated over the chunks in float32; (vocab, n_embd) like the weight, so that neither
            # this sum nor autograd's (the weight is tied to wte) walks a transposed matrix
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            loss += chunk_cross_entropy(h[rows].to(dtype), w, targets[rows, None],
                                        grad_h[rows] if gradients else None, grad_w)
    return loss, grad_h, grad_w


def chunk_cross_entropy(hc, w, tc, grad_hc, grad_w):
    """Return the summed cross-entropy of one chunk's logits hc @ w.T against tc. With gradients,
    write the chunk's gradient with respect to hc into grad_hc and add the one with respect to w
    to grad_w. The chunk's logits and probabilities, the largest buffers of a training step, are
    freed as soon as they are used, and all of them before the next chunk's are made."""
    probs = torch.softmax(hc @ w.t(), dim=1, dtype=torch.float32)
    loss = -probs.gather(1, tc).clamp_min(torch.finfo(torch.float32).tiny).log().sum()
    if grad_hc is not None:
        # d(loss sum)/d(logits) = softmax - one_hot: in place, then in the matmuls' precision
        grad = probs.scatter_add_(1, tc, torch.full(tc.shape, -1.0, device=hc.device)).to(hc.dtype)
        del probs  # the float32 probabilities go before the products are made
        torch.mm(grad, w, out=grad_hc)
        grad_w += chunk_weight_gradient(grad, hc)
    return loss


def chunk_weight_gradient(grad, hc):
    """Return grad.T @ hc, a chunk's weight gradient: in float32 where the inputs are float16.

    It sums the gradients of up to a chunk's thousands of tokens, at the scale of the loss sum,
    before any loss scale exists: where many tokens share a target and the hidden states are large
    it passes float16's largest number (65,504), and the update is lost whatever the scaler does.
    So it is accumulated and returned in float32: by CUDA's matmul itself, elsewhere by casting
    first. bfloat16 has float32's range and keeps its fast product."""
    if grad.dtype != torch.float16:
        return grad.t() @ hc
    if grad.device.type == "cuda":
        return torch.mm(grad.t(), hc, out_dtype=torch.float32)
    return grad.t().float() @ hc.float()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Autograd computes the mean cross-entropy of h @ weight.T through here: the gradients are
    computed during the forward pass, while each chunk's softmax is at hand, and backward only
    scales them, in place: it runs once (no retain_graph, no double backward)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        loss_sum, grad_h, grad_w = cross_entropy_sum(h, weight, targets, chunk_size, gradients=True)
        ctx.gradients = grad_h, grad_w  # outputs of ours, not inputs: held as attributes, let go in backward
        ctx.h_dtype = h.dtype
        return loss_sum / h.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.gradients
        del ctx.gradients  # so that autograd takes grad_w as the weight's .grad instead of copying it
        # the 1/n of the mean is applied here, together with the incoming gradient, in place (the
        # weight gradient is the size of the vocabulary's matrix), and in h's own precision
        # (float32 under autocast): in float16 a small gradient divided by n would vanish
        scale = grad_loss / grad_h.size(0)
        return grad_h.to(ctx.h_dtype).mul_(scale), grad_w.mul_(scale), None, None


# ----------------------------------------------------------------------------------------------
# Muon on a CPU without bfloat16 hardware

def use_float32_newton_schulz():
    """Have torch's Muon orthogonalise in float32 instead of bfloat16.

    torch.optim.Muon runs its Newton-Schulz iteration in bfloat16, which GPUs and CPUs with AVX-512
    BF16, AMX or Arm BF16 compute natively. Other CPUs emulate it: on a 2-core AVX2 host (an AMD
    EPYC without AVX-512) the orthogonalisation in one update of the small model (N_LAYER=6
    N_EMBD=384) took 33.5 s in bf16 and 0.96 s in float32 (bench/bench_newton_schulz.py). torch has
    no setting for the precision, so its function is replaced by the same iteration in float32
    (where a later torch renames it, nothing is replaced and Muon runs as torch ships it)."""
    muon_module = getattr(torch.optim, "_muon", None)
    if hasattr(muon_module, "_zeropower_via_newtonschulz"):
        muon_module._zeropower_via_newtonschulz = newton_schulz_float32


def newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz in float32: the same quintic iteration, coefficients and
    steps, taking grad = U S V^T to about U V^T (singular values near 1, not exactly 1)."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()  # the wide side up: the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)  # every singular value at most 1, where the iteration converges
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x
