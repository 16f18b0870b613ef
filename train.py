"""Train GPT-2 on the token shards dataset.py wrote: from scratch, or fine-tuning OpenAI's weights.

    uv run train.py                                        # one GPU, Apple silicon, or the CPU
    torchrun --standalone --nproc_per_node=8 train.py      # eight GPUs on one machine (DDP)

Every setting is an environment variable; README lists them with their defaults. The loop is
build-nanogpt's: gradient accumulation up to TOTAL_BATCH_SIZE tokens per update, gradient clipping
at 1.0, linear warm-up then cosine decay, and now and then a validation loss, HellaSwag accuracy
and samples. Checkpoints in $LOG_DIR hold everything needed to continue exactly (RESUME=1), and
every update appends one row to $LOG_DIR/metrics.csv (plot it with plot_metrics.py).
"""

import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import device
import sampling
import shards
import tokenizer
from env import UserError, cli, env_flag, env_float, env_int, env_str, is_set
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SAMPLE_PROMPT = "Hello, I'm a language model,"
METRICS_HEADER = ["step", "loss", "val_loss", "hellaswag_acc", "lr", "norm", "dt_ms", "tok_per_sec", "mfu"]

# Dense bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' data sheets, for MFU. Matched
# against torch.cuda.get_device_name(), longest name first ("H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = {
    "B200": 2250, "H200": 989, "GH200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989,
    "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70, "A10": 125,
    "A6000": 155, "RTX 6000 Ada": 365, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65,
}


# ----------------------------------------------------------------------------------------------
# configuration

@dataclass
class TrainConfig:
    total_batch_size: int = 65536  # tokens per optimizer update, all ranks and micro-steps together
    batch_size: int = 8  # sequences per micro-batch, per rank
    seq_length: int = 256
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    max_steps: int = 19073
    weight_decay: float = 0.1
    dataset_path: str = "natural_reasoning"
    log_dir: str = "log"
    eval_interval: int = 250
    val_steps: int = 20  # validation batches per rank
    hellaswag_limit: int = 0  # 0: all rows, -1: off
    sample_interval: int = 250
    checkpoint_interval: int = 5000
    keep_checkpoints: int = 3  # 0 keeps them all
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"  # auto (on for CUDA), 0 or 1
    resume: str = ""  # "" (fresh run), "1" (newest checkpoint in LOG_DIR) or a checkpoint path
    force: bool = False
    peak_tflops: float = 0.0  # 0: look the GPU up in GPU_PEAK_TFLOPS
    init_from: str = "scratch"

    @classmethod
    def from_env(cls):
        d = cls()
        config = cls(
            total_batch_size=env_int("TOTAL_BATCH_SIZE", d.total_batch_size),
            batch_size=env_int("BATCH_SIZE", d.batch_size),
            seq_length=env_int("SEQ_LENGTH", d.seq_length),
            max_lr=env_float("MAX_LR", d.max_lr),
            min_lr=env_float("MIN_LR", d.min_lr),
            warmup_steps=env_int("WARMUP_STEPS", d.warmup_steps, minimum=0),
            max_steps=env_int("MAX_STEPS", d.max_steps),
            weight_decay=env_float("WEIGHT_DECAY", d.weight_decay),
            dataset_path=env_str("DATASET_PATH", d.dataset_path),
            log_dir=env_str("LOG_DIR", d.log_dir),
            eval_interval=env_int("EVAL_INTERVAL", d.eval_interval),
            val_steps=env_int("VAL_STEPS", d.val_steps),
            hellaswag_limit=env_int("HELLASWAG_LIMIT", d.hellaswag_limit, minimum=-1),
            sample_interval=env_int("SAMPLE_INTERVAL", d.sample_interval),
            checkpoint_interval=env_int("CHECKPOINT_INTERVAL", d.checkpoint_interval),
            keep_checkpoints=env_int("KEEP_CHECKPOINTS", d.keep_checkpoints, minimum=0),
            seed=env_int("SEED", d.seed, minimum=0),
            device=env_str("DEVICE", d.device),
            dtype=env_str("DTYPE", d.dtype),
            compile=env_str("COMPILE", d.compile).lower(),
            resume=env_str("RESUME", d.resume),
            force=env_flag("FORCE", d.force),
            peak_tflops=env_float("PEAK_TFLOPS", d.peak_tflops),
            init_from=env_str("INIT_FROM", d.init_from),
        )
        if config.compile != "auto":
            config.compile = "1" if env_flag("COMPILE") else "0"
        if config.resume.lower() in ("0", "false", "no", "off"):
            config.resume = ""
        elif config.resume.lower() in ("1", "true", "yes", "on"):
            config.resume = "1"
        return config

    def validate(self, world_size):
        """The checks that need no files and no model: bad combinations stop before any work."""
        if self.min_lr > self.max_lr:
            raise UserError(f"MIN_LR ({self.min_lr}) must not exceed MAX_LR ({self.max_lr})")
        micro_tokens = self.batch_size * self.seq_length * world_size
        if self.total_batch_size % micro_tokens:
            raise UserError(f"TOTAL_BATCH_SIZE ({self.total_batch_size}) must be divisible by BATCH_SIZE * SEQ_LENGTH "
                            f"* world size ({self.batch_size} * {self.seq_length} * {world_size} = {micro_tokens})")
        device.pick_dtype(device.pick_device(self.device), self.dtype)  # DEVICE and DTYPE: known values?
        if not self.resume and self.init_from not in ("scratch", *PRETRAINED) and not os.path.isdir(self.init_from):
            raise UserError(f"INIT_FROM must be scratch, {', '.join(PRETRAINED)} or a directory holding a "
                            f"GPT2LMHeadModel, got {self.init_from!r} (no such directory)")


def print_configuration(model_config, shape_source, cfg, runtime, use_compile):
    print("Configuration from environment:")
    for name in GPTConfig.SHAPE:
        print(f"  {name.upper()}: {getattr(model_config, name)}{shape_source}")
    print(f"  DROPOUT: {model_config.dropout}")
    for name, value in asdict(cfg).items():
        chosen = {"device": runtime.device, "dtype": runtime.dtype_name, "compile": "on" if use_compile else "off"}
        shown = f"{value} (using {chosen[name]})" if name in chosen else value
        print(f"  {name.upper()}: {shown if shown != '' else '(not set)'}")
    print(f"  WORLD_SIZE: {runtime.world_size}")


def get_lr(step, cfg):
    """Linear warm-up to MAX_LR, then cosine decay to MIN_LR at MAX_STEPS."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# the model: from a checkpoint (RESUME), from pretrained weights (INIT_FROM) or from scratch

def check_shape(env_config, shape, source):
    """The shape comes from `source`; a model variable the user set explicitly must agree with it."""
    for name in GPTConfig.SHAPE:
        variable = name.upper()
        if is_set(variable) and getattr(env_config, name) != int(shape[name]):
            raise UserError(f"{variable}={getattr(env_config, name)} disagrees with {source}, which has "
                            f"{variable}={shape[name]}: unset {variable} (the model shape comes from {source})")


def resume_path(cfg):
    if cfg.resume != "1":
        return cfg.resume or None
    path = checkpoint.latest_checkpoint(cfg.log_dir)
    if path is None:
        raise UserError(f"RESUME=1 but {cfg.log_dir}/ holds no checkpoint: start without RESUME, "
                        "or set RESUME to a checkpoint's path")
    return path


def load_resume_state(path, env_config, cfg):
    """The checkpoint to continue from, checked against the model variables and MAX_STEPS."""
    state = checkpoint.load(path)
    checkpoint.require_training_state(state, path)
    check_shape(env_config, state["config"], f"the checkpoint {path}")
    if state["step"] + 1 >= cfg.max_steps:
        raise UserError(f"{path} already holds update {state['step']}: MAX_STEPS={cfg.max_steps} leaves "
                        "nothing to train; raise MAX_STEPS to continue")
    return state


def load_model(cfg, env_config, state, path):
    """(GPT on the CPU, where its shape came from)."""
    if state is not None:  # load_resume_state() has checked the shape against the environment
        return checkpoint.build_model(state, path, dropout=env_config.dropout), " (from checkpoint)"
    if cfg.init_from != "scratch":
        pretrained = GPT.from_pretrained(cfg.init_from)
        check_shape(env_config, pretrained.config.shape(), f"INIT_FROM={cfg.init_from}")
        model = GPT(replace(pretrained.config, dropout=env_config.dropout))  # DROPOUT applies to fine-tuning
        model.load_state_dict(pretrained.state_dict())
        return model, f" (from {cfg.init_from})"
    return GPT(env_config), ""


def claim_log_dir(cfg, state, path, master):
    """Make sure no other run's checkpoints are in LOG_DIR, where pruning would delete them.

    A resumed run owns the checkpoints up to the one it resumes from, if that lives in LOG_DIR;
    any other checkpoint there is someone else's: stop, unless FORCE=1 says to delete them.
    """
    same_dir = path is not None and os.path.abspath(os.path.dirname(path)) == os.path.abspath(cfg.log_dir)
    owned_through = state["step"] if same_dir else -1
    foreign = [p for step, p in checkpoint.list_checkpoints(cfg.log_dir) if step > owned_through]
    if foreign and not cfg.force:
        what = "continues from an older checkpoint, but" if same_dir else "would start here, but"
        raise UserError(f"this run {what} {cfg.log_dir}/ already holds {os.path.basename(foreign[-1])}"
                        f"{f' and {len(foreign) - 1} more checkpoints' if len(foreign) > 1 else ''}: set RESUME=1 "
                        "to continue that run, FORCE=1 to delete them and start over, or choose another LOG_DIR")
    try:
        os.makedirs(cfg.log_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"LOG_DIR {cfg.log_dir} cannot be created: {error.strerror}") from None
    if not os.access(cfg.log_dir, os.W_OK):  # found now, not at the first checkpoint hours later
        raise UserError(f"LOG_DIR {cfg.log_dir} is not writable")
    if master:
        for p in foreign:
            print(f"FORCE=1: deleting {p}")
            os.remove(p)
        checkpoint.remove_stale_temporaries(cfg.log_dir)
    return same_dir


def print_changes(cfg, saved):
    changed = [f"{name.upper()} {saved[name]!r} -> {value!r}" for name, value in asdict(cfg).items()
               if name not in ("resume", "force") and name in saved and saved[name] != value]
    if changed:
        print("training variables changed since the checkpoint: " + ", ".join(changed))


# ----------------------------------------------------------------------------------------------
# one optimizer update, and the evaluations between updates

def to_device(batch, runtime):
    if runtime.device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return [t.pin_memory().to(runtime.device, non_blocking=True) for t in batch]
    return [t.to(runtime.device) for t in batch]


def all_ranks_mean(value, runtime):
    if runtime.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= runtime.world_size
    return value


def grad_scaler(runtime):
    """float16 needs loss scaling so small gradients do not flush to zero; a no-op otherwise."""
    return torch.amp.GradScaler(runtime.device_type, enabled=runtime.dtype == torch.float16)


def train_step(model, optimizer, scaler, loader, runtime, grad_accum_steps, lr):
    """One update from grad_accum_steps micro-batches per rank: (mean loss, gradient norm) tensors."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=runtime.device)
    for micro_step in range(grad_accum_steps):
        x, y = to_device(loader.next_batch(), runtime)
        # DDP all-reduces gradients in backward(): only needed once, after the last micro-step
        last = micro_step == grad_accum_steps - 1
        with model.no_sync() if runtime.ddp and not last else contextlib.nullcontext():
            with runtime.autocast():
                _, loss = model(x, y, return_logits=False)  # the loss without materialising the logits
            # the gradient of a mean over all micro-batches, not a sum
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    all_ranks_mean(loss_accum, runtime)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    return loss_accum, norm


@torch.no_grad()
def validation_loss(model, loader, runtime, steps):
    """Mean loss over the first `steps` validation batches of every rank: the same batches each time."""
    model.eval()
    loader.position = 0
    total = torch.zeros((), device=runtime.device)
    for _ in range(steps):
        x, y = to_device(loader.next_batch(), runtime)
        with runtime.autocast():
            _, loss = model(x, y)
        total += loss.detach()
    return all_ranks_mean(total / steps, runtime).item()


def load_hellaswag(limit, runtime):
    """HellaSwag rows for the periodic evaluation, or None: off (-1), or no data (one warning)."""
    if limit < 0:
        return None
    import hellaswag  # imported only when HellaSwag is on

    # rank 0 fetches the rows into the cache first, so the ranks never download side by side
    examples = None
    for turn in ("first", "then"):
        if (turn == "first") == runtime.master:
            try:
                examples = hellaswag.load_examples(limit)
            except hellaswag.HellaSwagUnavailable as error:
                if runtime.master:
                    print(f"Warning: HellaSwag evaluation skipped: {error}", file=sys.stderr, flush=True)
        if runtime.ddp:
            dist.barrier()
    return examples


def hellaswag_accuracy(model, runtime, examples):
    """acc_norm on `examples`; hellaswag.py owns the scoring and shares it across the ranks."""
    import hellaswag

    result = hellaswag.evaluate(model, runtime, examples)
    if runtime.master:
        print(f"HellaSwag accuracy: {result.correct_norm}/{result.total}={result.acc_norm:.4f}")
    return result.acc_norm


def evaluate(model, val_loader, runtime, cfg, examples):
    """(validation loss, HellaSwag acc_norm or None) of the current weights."""
    val_loss = validation_loss(model, val_loader, runtime, cfg.val_steps)
    if runtime.master:
        print(f"validation loss: {val_loss:.4f}")
    accuracy = hellaswag_accuracy(model, runtime, examples) if examples else None
    return val_loss, accuracy


def print_samples(model, runtime, seed, num_samples=4, max_new_tokens=32):
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    # a generator of its own: the same sampling noise every time, and the training RNG untouched
    generator = sampling.make_generator(runtime.device, seed + runtime.rank)
    with runtime.autocast():
        rows = sampling.generate(model, prompt, max_new_tokens, top_k=50, num_samples=num_samples, generator=generator)
    for i, row in enumerate(rows):
        print(f"rank {runtime.rank} sample {i}: {tokenizer.decode(prompt + row)}")


def peak_flops(cfg, runtime):
    """Peak FLOP/s of one device for MFU: PEAK_TFLOPS, else the table of GPUs, else None."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if runtime.device_type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key] * 1e12
    return None


# ----------------------------------------------------------------------------------------------
# checkpoints and metrics

def rng_state(runtime):
    state = {"cpu": torch.get_rng_state()}
    if runtime.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    elif runtime.device_type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_training_state(state, path, optimizer, scaler, loader, runtime, cfg):
    """Optimizer, loss scale, data position and random numbers exactly as after update `step`."""
    saved = dict(state["optimizer"])
    scaler_state = saved.pop("grad_scaler", None)
    try:
        optimizer.load_state_dict(saved)
        if scaler_state and scaler.is_enabled():
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(state["rng"]["cpu"])
        if runtime.device_type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
        elif runtime.device_type == "mps" and "mps" in state["rng"]:
            torch.mps.set_rng_state(state["rng"]["mps"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{path} holds an optimizer state this model cannot use: {reason}") from None
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # group 0 decays; WEIGHT_DECAY may have changed
    loader.position = state["loader"] % loader.total


def training_state(raw_model, optimizer, scaler, cfg, step, val_loss, loader, runtime):
    """Only tensors and plain Python values, so every reader can load it with weights_only=True."""
    optimizer_state = optimizer.state_dict()
    if scaler.is_enabled():
        optimizer_state["grad_scaler"] = scaler.state_dict()
    return {
        "model": raw_model.state_dict(),
        "optimizer": optimizer_state,
        "config": raw_model.config.shape(),
        "train_config": asdict(cfg),
        "step": step,
        "val_loss": val_loss,
        "loader": loader.position,
        "rng": rng_state(runtime),
    }


def open_metrics(path, keep_through=None):
    """metrics.csv opened for appending: a new file, or (on resume) the rows up to `keep_through`.

    The kept rows are written to a temporary file that replaces the old one, so a crash here
    never leaves a half-written metrics.csv.
    """
    rows = []
    if keep_through is not None and os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) == METRICS_HEADER:
                rows = [row for row in reader if len(row) == len(METRICS_HEADER) and row[0].isdigit()
                        and int(row[0]) <= keep_through]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_HEADER)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return open(path, "a", newline="")


# ----------------------------------------------------------------------------------------------

@cli
def main():
    # everything that can be wrong with the settings is found before any work starts
    cfg = TrainConfig.from_env()
    env_config = GPTConfig.from_env()
    cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
    path = resume_path(cfg)
    state = load_resume_state(path, env_config, cfg) if path else None
    shards.shard_paths(cfg.dataset_path, "train")
    shards.shard_paths(cfg.dataset_path, "val")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model, shape_source = load_model(cfg, env_config, state, path)
    if cfg.seq_length > raw_model.config.block_size:
        raise UserError(f"SEQ_LENGTH ({cfg.seq_length}) must not exceed BLOCK_SIZE ({raw_model.config.block_size})")
    if raw_model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"VOCAB_SIZE ({raw_model.config.vocab_size}) must be at least {GPT2_VOCAB_SIZE}, "
                        "GPT-2's vocabulary, to train on GPT-2 tokens")
    runtime = device.setup(cfg.device, cfg.dtype)
    try:
        train(cfg, runtime, raw_model, shape_source, state, path)
    finally:
        device.teardown()


def train(cfg, runtime, raw_model, shape_source, state, path):
    master = runtime.master
    resuming_in_place = claim_log_dir(cfg, state, path, master)
    use_compile = runtime.device_type == "cuda" if cfg.compile == "auto" else cfg.compile == "1"
    world = runtime.world_size
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.seq_length * world)
    if master:
        print_configuration(raw_model.config, shape_source, cfg, runtime, use_compile)
        if cfg.warmup_steps >= cfg.max_steps:
            print(f"Warning: WARMUP_STEPS ({cfg.warmup_steps}) >= MAX_STEPS ({cfg.max_steps}): "
                  "the whole run is warm-up, the learning rate never decays", file=sys.stderr, flush=True)
        print(f"total desired batch size: {cfg.total_batch_size}")
        print(f"=> calculated gradient accumulation steps: {grad_accum_steps}")

    train_loader = shards.TokenLoader(cfg.dataset_path, "train", cfg.batch_size, cfg.seq_length,
                                      runtime.rank, world, verbose=master)
    val_loader = shards.TokenLoader(cfg.dataset_path, "val", cfg.batch_size, cfg.seq_length,
                                    runtime.rank, world, verbose=master)
    raw_model.to(runtime.device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, runtime.device_type, verbose=master)
    scaler = grad_scaler(runtime)
    start_step, val_loss = 0, None
    if state is not None:
        restore_training_state(state, path, optimizer, scaler, train_loader, runtime, cfg)
        start_step, val_loss = state["step"] + 1, state["val_loss"]
        # RESUME wins over INIT_FROM: the run keeps the origin its first part recorded
        started_from = state["train_config"].get("init_from", "scratch")
        if master:
            print(f"resuming from {path}: continuing at step {start_step}")
            if is_set("INIT_FROM") and cfg.init_from != started_from:
                print(f"RESUME is set: ignoring INIT_FROM={cfg.init_from} (this run started from {started_from})")
        cfg.init_from = started_from
        if master:
            print_changes(cfg, state["train_config"])
    elif cfg.init_from != "scratch" and master:
        print(f"fine-tuning from {cfg.init_from}")

    # compiled and DDP-wrapped for the updates; evaluation and sampling use raw_model, so
    # neither has to live with the compiler's recompilations or DDP's hooks
    model = torch.compile(raw_model) if use_compile else raw_model
    if runtime.ddp:
        model = DDP(model, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None)
    examples = load_hellaswag(cfg.hellaswag_limit, runtime)
    metrics = open_metrics(os.path.join(cfg.log_dir, "metrics.csv"),
                           state["step"] if resuming_in_place else None) if master else None
    peak = peak_flops(cfg, runtime)
    flops_per_token = raw_model.flops_per_token(cfg.seq_length)

    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1
        measured = (None, None)
        # an evaluation at step N sees the weights before update N: step 0 shows the untrained model
        if step % cfg.eval_interval == 0:
            measured = evaluate(raw_model, val_loader, runtime, cfg, examples)
        if step > 0 and step % cfg.sample_interval == 0 and master:
            print_samples(raw_model, runtime, cfg.seed)

        t0 = time.perf_counter()
        lr = get_lr(step, cfg)
        loss, norm = train_step(model, optimizer, scaler, train_loader, runtime, grad_accum_steps, lr)
        loss, norm = loss.item(), norm.item()  # waits for the device
        dt = time.perf_counter() - t0
        tokens_per_sec = cfg.total_batch_size / dt
        mfu = flops_per_token * tokens_per_sec / (peak * world) if peak else None
        if master:
            print(f"step {step:5d} | loss: {loss:.6f} | lr {lr:.4e} | norm: {norm:.4f} | dt: {dt * 1000:.2f}ms | "
                  f"tok/sec: {tokens_per_sec:.2f}" + (f" | mfu: {mfu * 100:.1f}%" if mfu else ""), flush=True)

        if last_step:  # the final weights, after the last update
            measured = evaluate(raw_model, val_loader, runtime, cfg, examples)
            if master:
                print_samples(raw_model, runtime, cfg.seed)
        if measured[0] is not None:
            val_loss = measured[0]
        if master:
            csv.writer(metrics).writerow([step, loss, *measured, lr, norm, round(dt * 1000, 2),
                                          round(tokens_per_sec, 1), round(mfu, 5) if mfu else None])
            metrics.flush()
            if (step + 1) % cfg.checkpoint_interval == 0 or last_step:
                target = checkpoint.checkpoint_path(cfg.log_dir, step)
                checkpoint.save(training_state(raw_model, optimizer, scaler, cfg, step, val_loss, train_loader,
                                               runtime), target)
                checkpoint.prune(cfg.log_dir, cfg.keep_checkpoints)
                print(f"saved checkpoint {target}")
    if master:
        metrics.close()


if __name__ == "__main__":
    main()
