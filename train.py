"""Train GPT-2 on the token shards dataset.py wrote: from scratch, or fine-tuning OpenAI's weights.

    uv run train.py                                        # one GPU, Apple silicon, or the CPU
    torchrun --standalone --nproc_per_node=8 train.py      # eight GPUs on one machine (DDP)
    PARALLEL=fsdp torchrun --standalone --nproc_per_node=8 train.py   # the same, sharded (FSDP2)

Every setting is an environment variable: settings.TrainConfig and settings.GPTConfig list them
with their defaults (docs/training.md too). The loop is build-nanogpt's: gradient accumulation up to
TOTAL_BATCH_SIZE tokens per update, gradient clipping at 1.0, linear warm-up then cosine decay, and
now and then a validation loss, HellaSwag accuracy and samples. Checkpoints in $LOG_DIR hold
everything needed to continue exactly (RESUME=1), and every update appends one row to
$LOG_DIR/metrics.csv (plot it with plot_metrics.py).

The file reads in the order a run happens: `main` (the settings, checked before any work), `set_up`
(the model and optimizer, the data), `train` (the loop, with its checkpoints); the helpers follow,
grouped under the step that uses them.
"""

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import device
import metrics
import tracking
import sampling
import shards
import tokenizer
from env import UserError, cli, is_set
from model import GPT, GPT2_VOCAB_SIZE
from settings import GPTConfig, TrainConfig

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
OPTIMIZERS = ("adamw", "muon")
SAMPLE_PROMPT = "Hello, I'm a language model,"


@cli
def main():
    # the settings: everything that can be wrong with them is found before any work starts
    cfg = TrainConfig.from_env()
    env_shape = GPTConfig.from_env()
    launch = device.launched()
    check_settings(cfg, launch)
    master = launch.rank == 0
    resume_from = resume_path(cfg, master)
    state = load_resume_state(resume_from, env_shape, cfg, master) if resume_from else None
    choose_optimizer(cfg, state, resume_from)
    shards.shard_paths(cfg.dataset_path, "train")
    shards.shard_paths(cfg.dataset_path, "val")
    runtime = device.setup(cfg.device, cfg.dtype, sharded=cfg.parallel == "fsdp")
    with StopSignals(runtime) as stop:  # through the teardown too: a rank that leaves last is not killed first
        try:
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            raw_model, weights = model_to_train(cfg, env_shape, state, resume_from, runtime)
            check_model_fits(raw_model.config, cfg)
            run = set_up(cfg, runtime, raw_model, weights, state, resume_from)
            del state, weights  # in the model now: the whole checkpoint no longer needs to stay in memory
            train(run, stop)
        finally:
            device.teardown()


@dataclass
class Run:
    """The loop works with this: set_up() builds it, train() runs it."""

    cfg: TrainConfig
    runtime: device.Runtime
    raw_model: GPT  # evaluation and checkpoints use this one (under FSDP, sharded in place)...
    model: torch.nn.Module  # ...and the updates run through this one: compiled, DDP-wrapped or sharded
    optimizers: list  # AdamW; with OPTIMIZER=muon, Muon too
    scaler: torch.amp.GradScaler
    train_loader: shards.TokenLoader
    val_loader: shards.TokenLoader
    hellaswag_rows: list | None  # None: HellaSwag off, or no data
    metrics: object  # metrics.csv open for appending (rank 0), else None
    tracker: tracking.Tracker  # TensorBoard or W&B (rank 0); elsewhere one that does nothing
    grad_accum_steps: int
    start_step: int
    val_loss: float | None  # the last one measured, saved in checkpoints
    peak_flops: float | None  # of one device, for MFU; None: unknown
    finite_checkpoint: str | None  # the newest checkpoint with finite weights, where a diverged run continues


def set_up(cfg, runtime, raw_model, weights, state, resume_from):
    """Put the model, optimizer and data on the device, continuing `state` when resuming (under
    FSDP, filling the shards from `weights` or the checkpoint)."""
    master = runtime.master
    resuming_in_place = claim_log_dir(cfg, state, resume_from, master)
    use_compile = runtime.compiles if cfg.compile == "auto" else cfg.compile == "1"
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.seq_length * runtime.world_size)
    if master:
        print_configuration(cfg, raw_model.config, runtime, use_compile, resumed=state is not None)
        if cfg.warmup_steps >= cfg.max_steps:
            print(f"Warning: WARMUP_STEPS ({cfg.warmup_steps}) >= MAX_STEPS ({cfg.max_steps}): "
                  "the whole run is warm-up, the learning rate never decays", file=sys.stderr, flush=True)
        print(f"total desired batch size: {cfg.total_batch_size}")
        print(f"=> calculated gradient accumulation steps: {grad_accum_steps}")
        if use_compile and runtime.device_type == "cuda" and not runtime.compiles:
            print("Warning: COMPILE=1 on a GPU older than compute capability 8.0, which Triton (torch.compile's "
                  "GPU compiler) does not support: set COMPILE=0 if compiling fails", file=sys.stderr, flush=True)

    train_loader, val_loader = (shards.TokenLoader(cfg.dataset_path, split, cfg.batch_size, cfg.seq_length,
                                                   runtime.rank, runtime.world_size, verbose=master)
                                for split in ("train", "val"))
    raw_model.checkpoint_activations(cfg.activation_checkpointing)
    if cfg.parallel != "fsdp":  # under FSDP it is on the meta device until each rank materializes its shards
        raw_model.to(runtime.device)
    model = parallelize(raw_model, runtime, cfg.parallel, use_compile)
    if cfg.parallel == "fsdp":
        materialize(raw_model, runtime.device)
    optimizers = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, runtime.device_type, verbose=master,
                                                optimizer=cfg.optimizer)
    scaler = grad_scaler(runtime)
    start_step, val_loss = 0, None
    if weights is not None:
        hand_out(weights, raw_model)
    if state is not None and cfg.parallel == "fsdp":
        checkpoint.load_into_shards(state, resume_from, raw_model, optimizers)
        if not weights_finite(raw_model, runtime):
            stop_every_rank(runtime, f"{resume_from} holds weights that are not finite: it was saved by a run that "
                                     "diverged; use an earlier checkpoint")
    if state is not None:
        checkpoint.restore_training_state(state, resume_from, optimizers, scaler, train_loader, runtime.device,
                                          cfg.weight_decay)
        start_step, val_loss = state["step"] + 1, state["val_loss"]
        continue_run(cfg, state, resume_from, master)
    elif cfg.init_from != "scratch" and master:
        print(f"fine-tuning from {cfg.init_from}")
    if runtime.distributed:  # RESUME=auto with a LOG_DIR some nodes do not share would split the ranks
        check_same_start(start_step, runtime)
    hellaswag_rows = load_hellaswag(cfg.hellaswag_limit, runtime)
    metrics_file, tracker = None, tracking.Tracker()
    if master:
        path = os.path.join(cfg.log_dir, "metrics.csv")
        logged = metrics.last_step(path) if resuming_in_place else None  # what a tracker holds already
        metrics_file = metrics.open_for_run(path, keep_through=state["step"] if resuming_in_place else None)
        tracker = start_tracker(cfg, raw_model, runtime, state, start_step, logged)
    return Run(cfg, runtime, raw_model, model, optimizers, scaler, train_loader, val_loader, hellaswag_rows, metrics_file,
               tracker, grad_accum_steps, start_step, val_loss, device.peak_flops(runtime, cfg.peak_tflops), resume_from)


def start_tracker(cfg, model, runtime, state, start_step, logged):
    """Rank 0's tracker. A resumed run goes on as the W&B run its checkpoint names only when none
    of its updates is replayed: `logged`, metrics.csv's last step before the resume, is below its first."""
    config = {**asdict(cfg), **asdict(model.config), "world_size": runtime.world_size,
              "parameters": model.num_params(non_embedding=False)}
    previous = state.get("wandb_run") if state else None
    continues = logged is not None and logged < start_step
    return tracking.start(cfg.tracker, cfg.log_dir, cfg.wandb_project, config, start_step, previous, continues)


def train(run, stop):
    """Run the loop: now and then evaluate and sample, then update, log, and now and then save;
    stop early, saved, when `stop` says a signal came."""
    cfg, runtime, master = run.cfg, run.runtime, run.runtime.master
    flops_per_token = run.raw_model.flops_per_token(cfg.seq_length)
    skipped = 0  # float16: updates in a row that the loss scaler skipped
    try:
        for step in range(run.start_step, cfg.max_steps):
            last_step = step == cfg.max_steps - 1
            measured = (None, None)  # (validation loss, HellaSwag accuracy), where measured
            # an evaluation at step N sees the weights before update N: step 0 shows the untrained model
            if step % cfg.eval_interval == 0:
                measured = evaluate(run, f"before update {step}")
            if step > 0 and step % cfg.sample_interval == 0:
                print_samples(run, f"before update {step}")

            measuring = device.reset_peak_memory(runtime)
            t0 = time.perf_counter()
            lr = get_lr(step, cfg)
            loss, norm = train_step(run.model, run.optimizers, run.scaler, run.train_loader, runtime,
                                    run.grad_accum_steps, lr)
            loss, norm = loss.item(), norm.item()  # waits for the device
            dt = time.perf_counter() - t0
            peak_mib = device.peak_memory(runtime) / 2**20 if measuring else None
            tokens_per_sec = cfg.total_batch_size / dt
            mfu = flops_per_token * tokens_per_sec / (run.peak_flops * runtime.world_size) if run.peak_flops else None
            if master:
                print(f"step {step:5d} | loss: {loss:.6f} | lr {lr:.4e} | norm: {norm:.4f} | dt: {dt * 1000:.2f}ms | "
                      f"tok/sec: {tokens_per_sec:.2f}" + (f" | mfu: {mfu * 100:.1f}%" if mfu else "")
                      + (f" | peak mem: {peak_mib:.0f}MiB" if peak_mib else ""), flush=True)
            skipped = check_update(run, step, loss, norm, skipped)

            if last_step:  # the final weights, after the last update
                measured = evaluate(run, f"after update {step}")
                print_samples(run, f"after update {step}")
            if measured[0] is not None:
                run.val_loss = measured[0]
            if master:
                row = [step, loss, *measured, lr, norm, round(dt * 1000, 2), round(tokens_per_sec, 1),
                       round(mfu, 5) if mfu else None, round(peak_mib) if peak_mib else None]
                metrics.append(run.metrics, row)
                run.tracker.log(step, dict(zip(metrics.COLUMNS[1:], row[1:])))
            stopping = stop.agreed()  # SIGTERM or Ctrl-C on any rank: every rank stops after this update
            if (step + 1) % cfg.checkpoint_interval == 0 or last_step or stopping:
                saved = save_checkpoint(run, step)
            if stopping and not last_step:  # after the last update the run is simply done
                stop.exit(saved)
    finally:
        if master:
            run.metrics.close()
            run.tracker.close(sys.exc_info()[1])  # finished as failed or stopped, if an exception ends the run


# ----------------------------------------------------------------------------------------------
# the settings

def check_settings(cfg, launch):
    """Stop on bad combinations that need no files and no model to find (and no GPU's attention:
    its precision is chosen once it is this rank's current device, in device.setup)."""
    if cfg.parallel not in ("ddp", "fsdp"):
        raise UserError(f"PARALLEL must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"OPTIMIZER must be adamw or muon, got {cfg.optimizer!r}")
    tracking.check(cfg.tracker)
    if cfg.min_lr > cfg.max_lr:
        raise UserError(f"MIN_LR ({cfg.min_lr}) must not exceed MAX_LR ({cfg.max_lr})")
    micro_tokens = cfg.batch_size * cfg.seq_length * launch.world_size
    if cfg.total_batch_size % micro_tokens:
        raise UserError(f"TOTAL_BATCH_SIZE ({cfg.total_batch_size}) must be divisible by BATCH_SIZE * SEQ_LENGTH "
                        f"* world size ({cfg.batch_size} * {cfg.seq_length} * {launch.world_size} = {micro_tokens})")
    chosen = device.pick_device(cfg.device, launch.local_rank, launch.local_world_size)
    device.check_dtype(cfg.dtype)
    if chosen == "mps" and launch.world_size > 1:  # gloo, the only backend torchrun has there, takes no MPS tensors
        raise UserError(f"torchrun runs {launch.world_size} processes, but they cannot share work on Apple silicon "
                        "(MPS): train in one process (uv run train.py), or on CPU ranks with DEVICE=cpu")
    if cfg.parallel == "fsdp" and chosen == "mps":
        raise UserError("PARALLEL=fsdp runs on CUDA (NCCL) or the CPU (gloo), not on MPS: set DEVICE=cpu, "
                        "or PARALLEL=ddp")
    if cfg.parallel == "fsdp" and cfg.dtype == "float16":  # its loss scaler would need FSDP's own, untested here
        raise UserError("PARALLEL=fsdp trains in bfloat16 or float32, not float16: on GPUs without bfloat16 "
                        "(T4, V100) set DTYPE=float32 (or leave DTYPE unset: it picks float32 there), "
                        "elsewhere DTYPE=bfloat16")
    if cfg.resume in ("", "auto") and cfg.init_from not in ("scratch", *PRETRAINED) and not os.path.isdir(cfg.init_from):
        raise UserError(f"INIT_FROM must be scratch, {', '.join(PRETRAINED)} or a directory holding a "
                        f"GPT2LMHeadModel, got {cfg.init_from!r} (no such directory)")


def print_configuration(cfg, model_config, runtime, use_compile, resumed):
    """Print every setting, with the device, precision and compile choice actually made."""
    origin = " (from checkpoint)" if resumed else f" (from {cfg.init_from})" if cfg.init_from != "scratch" else ""
    print("Configuration from environment:")
    for name in GPTConfig.SHAPE:
        print(f"  {name.upper()}: {getattr(model_config, name)}{origin}")
    print(f"  DROPOUT: {model_config.dropout}")
    chosen = {"device": runtime.device, "dtype": runtime.dtype_name, "compile": "on" if use_compile else "off"}
    for name, value in asdict(cfg).items():
        shown = f"{value} (using {chosen[name]})" if name in chosen else value
        if name == "optimizer" and resumed:
            shown = f"{value} (from checkpoint)"
        print(f"  {name.upper()}: {shown if shown != '' else '(not set)'}")
    print(f"  WORLD_SIZE: {runtime.world_size}")


# ----------------------------------------------------------------------------------------------
# the model: from a checkpoint (RESUME), from pretrained weights (INIT_FROM) or from scratch

def resume_path(cfg, master):
    """Return the checkpoint RESUME names (RESUME=1 or auto: the newest in LOG_DIR), or None for a
    fresh run."""
    if cfg.resume not in ("1", "auto"):
        return cfg.resume or None
    path = checkpoint.latest_checkpoint(cfg.log_dir)
    if path is None and cfg.resume == "auto":  # the same command may be launched again and again
        if master:
            print(f"RESUME=auto: no checkpoint in {cfg.log_dir}/, starting fresh", flush=True)
        return None
    if path is None:
        raise UserError(f"RESUME=1 but {cfg.log_dir}/ holds no checkpoint: start without RESUME, "
                        "or set RESUME to a checkpoint's path")
    return path


def load_resume_state(path, env_shape, cfg, master):
    """Load the checkpoint to continue from, checked against the model variables and MAX_STEPS.
    Under FSDP its tensors are read later, each rank its own part (checkpoint.load_into_shards)."""
    state = checkpoint.load(path, lazily=cfg.parallel == "fsdp")
    checkpoint.require_training_state(state, path)
    check_shape(env_shape, state["config"], f"the checkpoint {path}")
    if state["step"] + 1 >= cfg.max_steps and cfg.resume == "auto":  # done: a supervisor need not retry
        if master:
            print(f"RESUME=auto: {path} already holds the last update ({state['step']}): nothing to train")
        raise SystemExit(0)
    if state["step"] + 1 >= cfg.max_steps:
        raise UserError(f"{path} already holds update {state['step']}: MAX_STEPS={cfg.max_steps} leaves "
                        "nothing to train; raise MAX_STEPS to continue")
    return state


def choose_optimizer(cfg, state, path):
    """Resume with the optimizer the checkpoint was trained with (AdamW, where it records none): an
    explicit OPTIMIZER that differs stops. Muon runs without FSDP, whose sharded checkpoints hold
    AdamW's state only."""
    if state is not None:
        trained_with = state["train_config"].get("optimizer", "adamw")
        if trained_with not in OPTIMIZERS:
            raise UserError(f"{path} records an optimizer this train.py does not know: {trained_with!r}")
        if is_set("OPTIMIZER") and cfg.optimizer != trained_with:
            raise UserError(f"OPTIMIZER={cfg.optimizer} disagrees with the checkpoint {path}, trained with "
                            f"{trained_with}: unset OPTIMIZER (a resumed run keeps its optimizer), or start a new run")
        cfg.optimizer = trained_with
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        origin = "" if state is None or is_set("OPTIMIZER") else f" (the optimizer of {path})"
        raise UserError(f"OPTIMIZER=muon{origin} runs with PARALLEL=ddp, not fsdp: sharded checkpoints hold "
                        "AdamW's state only, and Muon on FSDP's sharded matrices is untested")


def check_same_start(start_step, runtime):
    """Stop when the ranks would start at different updates (each found its own newest checkpoint)."""
    steps = torch.tensor([start_step, -start_step], device=runtime.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    latest, earliest = int(steps[0]), -int(steps[1])
    if latest != earliest:
        raise UserError(f"the ranks would start at different updates ({earliest} to {latest}): every node must "
                        "see the same LOG_DIR (a shared filesystem)")


def model_to_train(cfg, env_shape, state, path, runtime):
    """Return the model training starts from, on the CPU, and under FSDP the weights to fill it with:
    the checkpoint's when resuming, OpenAI's (or a local GPT2LMHeadModel's) with INIT_FROM, else a
    new model shaped by the model variables.

    Under FSDP every rank builds it on the meta device, with no storage, and fills in only its own
    shards once sharded (set_up): from the checkpoint, each rank reading its part, or from the whole
    weights that rank 0 alone makes and hands out (weights: rank 0's state_dict, {} elsewhere)."""
    if cfg.parallel != "fsdp":
        if state is not None:  # load_resume_state() has checked the shape against the environment
            return checkpoint.build_model(state, path, dropout=env_shape.dropout), None
        return new_model(cfg, env_shape), None
    if state is not None:
        config, weights = checkpoint.model_config(state, path, env_shape.dropout), None
    else:
        whole = new_model(cfg, env_shape) if runtime.master else None
        # the shape, and the random state that building the weights left (as on every rank elsewhere)
        shared = [(whole.config, torch.get_rng_state()) if whole is not None else None]
        if runtime.distributed:
            dist.broadcast_object_list(shared, src=0)
        config, rng = shared[0]
        torch.set_rng_state(rng)
        weights = whole.state_dict() if whole is not None else {}
    with torch.device("meta"):
        return GPT(config), weights


def new_model(cfg, env_shape):
    """Return OpenAI's GPT-2 (or a local GPT2LMHeadModel) for INIT_FROM, else a new model shaped by
    the model variables, initialised from the random state."""
    if cfg.init_from == "scratch":
        return GPT(env_shape)
    pretrained = GPT.from_pretrained(cfg.init_from)
    check_shape(env_shape, pretrained.config.shape(), f"INIT_FROM={cfg.init_from}")
    model = GPT(replace(pretrained.config, dropout=env_shape.dropout))  # DROPOUT applies to fine-tuning
    model.load_state_dict(pretrained.state_dict())
    return model


def check_shape(env_shape, shape, source):
    """Check that a model variable the user set explicitly agrees with the shape `source` brings."""
    for name in GPTConfig.SHAPE:
        variable = name.upper()
        if is_set(variable) and getattr(env_shape, name) != int(shape[name]):
            raise UserError(f"{variable}={getattr(env_shape, name)} disagrees with {source}, which has "
                            f"{variable}={shape[name]}: unset {variable} (the model shape comes from {source})")


def check_model_fits(model_config, cfg):
    """Check that the sequences fit the position table, and GPT-2's tokens the vocabulary."""
    if cfg.seq_length > model_config.block_size:
        raise UserError(f"SEQ_LENGTH ({cfg.seq_length}) must not exceed BLOCK_SIZE ({model_config.block_size})")
    if model_config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"VOCAB_SIZE ({model_config.vocab_size}) must be at least {GPT2_VOCAB_SIZE}, "
                        "GPT-2's vocabulary, to train on GPT-2 tokens")


def claim_log_dir(cfg, state, path, master):
    """Make sure no other run's checkpoints are in LOG_DIR, where pruning would delete them.

    A resumed run owns the checkpoints up to the one it resumes from, if that lives in LOG_DIR;
    any other checkpoint there is someone else's: stop, unless FORCE=1 says to delete them.
    Returns whether the run continues a checkpoint of LOG_DIR itself.
    """
    # (normpath: shell completion writes a .dcp folder as log/model_00009.dcp/, which lives in log/)
    same_dir = path is not None and os.path.abspath(os.path.dirname(os.path.normpath(path))) == os.path.abspath(cfg.log_dir)
    owned_through = state["step"] if same_dir else -1
    foreign = [(step, p) for step, p in checkpoint.list_checkpoints(cfg.log_dir) if step > owned_through]
    if foreign and not cfg.force:
        what = "continues from an older checkpoint, but" if same_dir else "would start here, but"
        raise UserError(f"this run {what} {cfg.log_dir}/ already holds {os.path.basename(foreign[-1][1])}"
                        f"{f' and {len(foreign) - 1} more checkpoints' if len(foreign) > 1 else ''}: set RESUME=1 "
                        "to continue that run, FORCE=1 to delete them and start over, or choose another LOG_DIR")
    try:
        os.makedirs(cfg.log_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"LOG_DIR {cfg.log_dir} cannot be created: {error.strerror}") from None
    if not os.access(cfg.log_dir, os.W_OK):  # found now, not at the first checkpoint hours later
        raise UserError(f"LOG_DIR {cfg.log_dir} is not writable")
    if master:
        for step, p in foreign:
            print(f"FORCE=1: deleting {p}")
            checkpoint.delete_step(cfg.log_dir, step)
        checkpoint.remove_stale_temporaries(cfg.log_dir)
    return same_dir


def continue_run(cfg, state, path, master):
    """Say where the run continues and what changed; RESUME wins over INIT_FROM, so the run keeps
    the origin its first part recorded."""
    started_from = state["train_config"].get("init_from", "scratch")
    if master:
        print(f"resuming from {path}: continuing at step {state['step'] + 1}")
        if is_set("INIT_FROM") and cfg.init_from != started_from:
            print(f"RESUME is set: ignoring INIT_FROM={cfg.init_from} (this run started from {started_from})")
    cfg.init_from = started_from
    saved = state["train_config"]
    changed = [f"{name.upper()} {saved[name]!r} -> {value!r}" for name, value in asdict(cfg).items()
               if name not in ("resume", "force") and name in saved and saved[name] != value]
    if changed and master:
        print("training variables changed since the checkpoint: " + ", ".join(changed))


def materialize(model, device):
    """Give a model built on the meta device real, uninitialised storage on `device` (under FSDP each
    rank its shards only). The parameters are swapped in place rather than replaced, as nn.Module's
    default conversion does, which would untie the embedding from the output layer."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def hand_out(weights, model):
    """Fill a sharded model from the whole weights on rank 0: one tensor at a time, each rank keeping
    its own rows, so that no other rank ever holds more than one whole tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def parallelize(raw_model, runtime, parallel, use_compile):
    """Return the model the updates run through. PARALLEL=fsdp: raw_model itself, sharded in place
    over the ranks (each block, then the root, which keeps the tied wte/lm_head weight one
    parameter), each block compiled first when COMPILE is on, as torchtitan does; hidden(), which
    evaluation and generation call, gathers like forward(). In bf16, FSDP gathers the weights in bf16
    itself: autocast would keep a bf16 copy of every block's weights for the backward pass, undoing
    the sharding (gradients are still reduced in float32). Otherwise raw_model compiled, and under
    torchrun DDP-wrapped: evaluation and sampling then use raw_model, so neither lives with the
    compiler's recompilations or DDP's hooks."""
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(runtime.device_type, (runtime.world_size,))
        precision = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
        for block in raw_model.transformer.h:
            if use_compile:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=precision)
        fully_shard(raw_model, mesh=mesh, mp_policy=precision)
        register_fsdp_forward_method(raw_model, "hidden")
        return raw_model
    model = torch.compile(raw_model) if use_compile else raw_model
    if runtime.distributed:
        model = DDP(model, device_ids=[torch.device(runtime.device).index] if runtime.device_type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------------------------
# one update

def get_lr(step, cfg):
    """Return the learning rate of update `step`: a linear warm-up to MAX_LR, then cosine decay to MIN_LR."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


def grad_scaler(runtime):
    """float16 needs loss scaling so small gradients do not flush to zero; a no-op otherwise."""
    return torch.amp.GradScaler(runtime.device_type, enabled=runtime.dtype == torch.float16)


def train_step(model, optimizers, scaler, loader, runtime, grad_accum_steps, lr):
    """Make one update from grad_accum_steps micro-batches per rank; return (mean loss, gradient norm) tensors."""
    model.train()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=runtime.device)
    for micro_step in range(grad_accum_steps):
        x, y = device.to_device(loader.next_batch(), runtime.device)
        # DDP all-reduces gradients in backward(): needed once, after the last micro-step. FSDP
        # reduce-scatters them after every micro-step, so that no rank ever holds them whole
        last = micro_step == grad_accum_steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with runtime.autocast():
                _, loss = model(x, y, return_logits=False)  # the loss without materialising the logits
            # the gradient of a mean over all micro-batches, not a sum
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    all_ranks_mean(loss_accum, runtime)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    norm = clip_gradients(model.parameters(), 1.0)
    # fp16: an overflow anywhere skips the whole update (each optimizer on its own would skip only its part)
    overflow = scaler.is_enabled() and not torch.isfinite(norm)
    for optimizer in optimizers:  # one schedule for both: Muon's match_rms_adamw makes MAX_LR mean the same
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not overflow:
            scaler.step(optimizer)
    scaler.update()  # after an overflow: a smaller loss scale
    return loss_accum, norm


def clip_gradients(parameters, max_norm):
    """Scale the gradients down to a total norm of at most max_norm; return the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, the norm of sharded gradients, reduced over the ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def all_ranks_mean(value, runtime):
    """Average a tensor over the ranks, in place (a no-op in a single process)."""
    if runtime.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= runtime.world_size
    return value


# ----------------------------------------------------------------------------------------------
# evaluation and samples, between updates

def evaluate(run, when):
    """Measure the current weights (`when`: "before update N", ...): return (validation loss,
    HellaSwag acc_norm or None). A validation loss that is not finite stops the run."""
    with between_updates(run) as model:
        val_loss = validation_loss(model, run.val_loader, run.runtime, run.cfg.val_steps)
        if run.runtime.master:
            print(f"validation loss: {val_loss:.4f}")
        if not math.isfinite(val_loss):  # the same on every rank: it was averaged over them
            stop_diverged(run, f"{when}: the validation loss is {val_loss}")
        accuracy = None
        if run.hellaswag_rows:
            import hellaswag

            result = hellaswag.evaluate(model, run.runtime, run.hellaswag_rows, lockstep=run.cfg.parallel == "fsdp")
            if run.runtime.master:
                print(f"HellaSwag accuracy: {result.correct_norm}/{result.total}={result.acc_norm:.4f}")
            accuracy = result.acc_norm
    return val_loss, accuracy


@contextlib.contextmanager
def between_updates(run):
    """Lend the raw model to evaluation and samples. It runs eagerly: the varying shapes of
    HellaSwag and generation would recompile FSDP's compiled blocks (elsewhere the raw model is
    not compiled at all). Under FSDP the root keeps the tied embedding gathered after a forward
    pass, as training's backward wants: it is released again here."""
    try:
        with torch.compiler.set_stance("force_eager"):
            yield run.raw_model
    finally:
        if run.cfg.parallel == "fsdp":
            run.raw_model.reshard()


@torch.no_grad()
def validation_loss(model, loader, runtime, steps):
    """Return the mean loss over the first `steps` validation batches of every rank (the same
    batches each time), by the very loss definition training uses, without its gradients."""
    model.eval()
    loader.position = 0
    total = torch.zeros((), device=runtime.device)
    for _ in range(steps):
        x, y = device.to_device(loader.next_batch(), runtime.device)
        with runtime.autocast():
            _, loss = model(x, y, return_logits=False)
        total += loss.detach()
    return all_ranks_mean(total / steps, runtime).item()


def load_hellaswag(limit, runtime):
    """Return the HellaSwag rows for the periodic evaluation, or None: off (-1), or no data (one warning)."""
    if limit < 0:
        return None
    import hellaswag  # imported only when HellaSwag is on

    # rank 0 alone downloads the rows into the cache; the other ranks then read them from there
    if runtime.distributed and not runtime.master:
        dist.barrier()  # wait for rank 0's download
    try:
        rows = hellaswag.load_examples(limit)
    except hellaswag.HellaSwagUnavailable as error:
        rows = None
        if runtime.master:
            print(f"Warning: HellaSwag evaluation skipped: {error}", file=sys.stderr, flush=True)
    if runtime.distributed and runtime.master:
        dist.barrier()  # the download is done: let the others read
    return rows


def print_samples(run, when, num_samples=4, max_new_tokens=32):
    """Rank 0 prints samples of the current weights (the tracker sends them with the update's row).
    Every rank calls this, and all agree first that the weights are finite. Under FSDP every rank
    makes the same samples, since each forward pass gathers weights from all of them, and all make
    max_new_tokens steps: none may stop early at <|endoftext|> alone."""
    runtime, sharded = run.runtime, run.cfg.parallel == "fsdp"
    if not weights_finite(run.raw_model, runtime):
        stop_diverged(run, f"{when}: the weights are not finite")
    if not (runtime.master or sharded):
        return
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    # a generator of its own: the same sampling noise every time and on every rank, the training RNG untouched
    generator = sampling.make_generator(runtime.device, run.cfg.seed)
    try:
        with between_updates(run) as model, runtime.autocast():
            rows = sampling.generate(model, prompt, max_new_tokens, top_k=50, num_samples=num_samples,
                                     generator=generator, stop_at_eot=not sharded)
    except UserError as error:  # float16 logits can overflow from finite weights: a warning, not a stop
        if runtime.master:
            print(f"Warning: no samples {when}: {error}", file=sys.stderr, flush=True)
        return
    if runtime.master:
        texts = [tokenizer.decode(prompt + sampling.cut_at_eot(row)) for row in rows]
        for i, text in enumerate(texts):
            print(f"rank 0 sample {i}: {text}")
        run.tracker.samples(texts)


# ----------------------------------------------------------------------------------------------
# checkpoints

class StopSignals:
    """SIGTERM (what SLURM, Kubernetes and torchrun send before a kill) and the first Ctrl-C ask the
    run to stop after the update in progress; it then saves a checkpoint and exits with 143 or 130.
    The handler only takes note: the ranks agree on the update to stop after (`agreed`), and the
    checkpoint is written by the loop, never from a handler. A repeated SIGTERM changes nothing; a
    second Ctrl-C stops a single process at once."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.received = 0  # the signal's number, 0 for none

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exception):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def note(self, signum, frame):
        if signum == signal.SIGINT == self.received and self.runtime.world_size == 1:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.received = self.received or signum

    def agreed(self):
        """Return whether any rank received a signal: one small all-reduce per update."""
        if not self.runtime.distributed:
            return self.received != 0
        flag = torch.tensor([self.received], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())  # SIGTERM (15) wins over SIGINT (2): every rank exits alike
        if agreed:  # never lowered: a signal that came during the all-reduce counts at the next update
            self.received = agreed
        return agreed != 0

    def exit(self, saved):
        if self.runtime.distributed:
            dist.barrier()  # no rank leaves (and has torchrun stop the others) before the checkpoint is whole
        if self.runtime.master:
            print(f"interrupted: saved checkpoint {saved}; continue with RESUME=1", flush=True)
        sys.exit(128 + self.received)


def save_checkpoint(run, step):
    """Save the state after update `step`, then prune the oldest: $LOG_DIR/model_{step:05d}.pt from
    rank 0, or under FSDP $LOG_DIR/model_{step:05d}.dcp/ from every rank, each its own shards.
    Weights that are not finite are never saved: the run stops instead, keeping the checkpoints
    it could continue from."""
    if not weights_finite(run.raw_model, run.runtime):
        stop_diverged(run, f"after update {step}: the weights are not finite")
    sharded = run.cfg.parallel == "fsdp"
    target = checkpoint.checkpoint_path(run.cfg.log_dir, step, sharded)
    if sharded or run.runtime.master:
        state = checkpoint.training_state(run.raw_model, run.optimizers, run.scaler, run.cfg, step, run.val_loss,
                                          run.train_loader.position, run.runtime.device,
                                          wandb_run=run.tracker.run if run.runtime.master else None)
        checkpoint.save(state, target)
    if run.runtime.master:
        checkpoint.prune(run.cfg.log_dir, run.cfg.keep_checkpoints)
        print(f"saved checkpoint {target}")
        run.tracker.flush()  # a crash from now on loses no point before this checkpoint
    run.finite_checkpoint = target
    return target


# ----------------------------------------------------------------------------------------------
# a run that diverges

MAX_SKIPPED = 50  # float16 updates in a row the loss scaler may skip before the run counts as collapsed


def check_update(run, step, loss, norm, skipped):
    """Return how many updates in a row the float16 loss scaler has now skipped, and stop the run
    where update `step` diverged. A loss or gradient norm that is not finite is divergence, except
    under float16, whose scaler skips such an update and halves its scale: a few skips are normal,
    a long run of them is a collapse. Every rank sees the same loss (averaged over the ranks) and
    norm (of the reduced gradients), so all stop at the same update."""
    if math.isfinite(loss) and math.isfinite(norm):
        return 0
    if not run.scaler.is_enabled():
        stop_diverged(run, f"at update {step} (loss {loss:.4g}, gradient norm {norm:.4g})")
    if skipped + 1 > MAX_SKIPPED:
        stop_diverged(run, f"at update {step}: the float16 loss scaler has skipped {skipped + 1} updates in a row "
                           "(their losses or gradients were not finite)")
    return skipped + 1


def weights_finite(model, runtime):
    """Return whether every weight is finite, the same answer on every rank: under FSDP each rank
    holds a shard, so they agree over one small all-reduce."""
    parameters = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP's shards
    finite = torch.stack([torch.isfinite(p).all() for p in parameters]).all().int()
    if runtime.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def stop_every_rank(runtime, message):
    """Stop every rank, which all found the same: rank 0 says why in one line; every rank exits 1."""
    if not runtime.master:
        raise SystemExit(1)
    raise UserError(message)


def stop_diverged(run, what):
    """Stop every rank: rank 0 says what diverged and where to continue from."""
    path, cfg = run.finite_checkpoint, run.cfg
    if path is None:
        advice = f"No checkpoint with finite weights was saved: start again with a lower MAX_LR than {cfg.max_lr:g}"
    else:
        resume = "RESUME=1" if checkpoint.latest_checkpoint(cfg.log_dir) == path else f"RESUME={path}"
        advice = (f"The newest checkpoint with finite weights is {path}: continue from it with {resume} and a "
                  f"lower MAX_LR than {cfg.max_lr:g}")
    stop_every_rank(run.runtime, f"training diverged {what}. {advice}")


if __name__ == "__main__":
    main()
