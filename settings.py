"""This is every setting of every script, in one list: each field below is the environment variable of its
name in capitals, with its default (and, where it is not the usual 1 for an int or 0 for a number,
its smallest allowed value).

    N_LAYER=6 N_HEAD=6 N_EMBD=384 MAX_STEPS=100 uv run train.py

The tables of variables in README.md and docs/ list exactly these, with the same defaults
(tests/test_settings.py checks). A set variable that is no setting but looks like a misspelled one gets a warning.
"""

import os
import sys
from dataclasses import dataclass, fields

from env import UserError, env_flag, is_set, on_off, read, setting


@dataclass
class GPTConfig:
    """The model's shape (model.py). train.py reads it for a model from scratch; a checkpoint or
    INIT_FROM brings its own, and a variable set here must then agree with it."""

    block_size: int = 1024  # longest sequence the learned position table covers
    vocab_size: int = 50304  # GPT-2's 50,257 tokens, padded to a multiple of 128 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining; a little helps when fine-tuning

    SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")

    @classmethod
    def from_env(cls):
        config = read(cls)
        if config.n_embd % config.n_head != 0:
            raise UserError(f"N_EMBD ({config.n_embd}) must be divisible by N_HEAD ({config.n_head})")
        if config.dropout >= 1:
            raise UserError(f"DROPOUT must be below 1, got {config.dropout}")
        return config

    def shape(self):
        """Return the five fields that fix the weights' shapes (what a checkpoint records)."""
        return {name: getattr(self, name) for name in self.SHAPE}


@dataclass
class TrainConfig:
    """train.py's settings. evaluate.py, generate.py, prompt.py, export_hf.py and plot_metrics.py
    read the few they share with it (LOG_DIR, DEVICE, DTYPE, SEED, HELLASWAG_LIMIT) from here too."""

    total_batch_size: int = 65536  # tokens per optimizer update, all ranks and micro-steps together
    batch_size: int = 8  # sequences per micro-batch, per rank
    seq_length: int = 256
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = setting(715, minimum=0)
    max_steps: int = 19073
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest
    dataset_path: str = "natural_reasoning"
    log_dir: str = "log"
    eval_interval: int = 250
    val_steps: int = 20  # validation batches per rank
    hellaswag_limit: int = setting(0, minimum=-1)  # 0: all rows, -1: off
    sample_interval: int = 250
    checkpoint_interval: int = 5000
    keep_checkpoints: int = setting(3, minimum=0)  # 0 keeps them all
    seed: int = setting(1337, minimum=0)
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"  # auto (on for CUDA), or a yes/no word, kept as "1" or "0"
    resume: str = ""  # "" (fresh), "1" (the newest checkpoint in LOG_DIR), "auto" (that, if any) or a path
    force: bool = False
    peak_tflops: float = 0.0  # 0: look the GPU up in device.GPU_PEAK_TFLOPS
    init_from: str = "scratch"
    parallel: str = "ddp"  # under torchrun: ddp (every rank a whole copy) or fsdp (every rank a shard)
    activation_checkpointing: bool = False  # keep only each block's input for backward, which recomputes the rest
    tracker: str = "none"  # none, tensorboard or wandb: where else the numbers of metrics.csv go (tracking.py)
    wandb_project: str = "mini-gpt2"  # the W&B project of TRACKER=wandb

    @classmethod
    def from_env(cls):
        config = read(cls)
        if config.compile.lower() == "auto":
            config.compile = "auto"
        else:
            config.compile = "1" if env_flag("COMPILE") else "0"
        # RESUME is a yes/no word, auto, or a path: any other word is taken as a path (and then not found)
        if config.resume and on_off(config.resume) is not None:
            config.resume = "1" if on_off(config.resume) else ""
        elif config.resume.lower() == "auto":
            config.resume = "auto"
        return config


@dataclass
class DataConfig:
    """dataset.py's settings, and the dataset peek_dataset.py shows."""

    hf_dataset_name: str = "facebook/natural_reasoning"
    dataset_path: str = TrainConfig.dataset_path  # where dataset.py writes is where train.py reads
    shard_size: int = 10**8
    force: bool = TrainConfig.force
    peek_dataset_path: str = ""  # "": DATASET_PATH

    @classmethod
    def from_env(cls):
        return read(cls)


@dataclass
class SamplingConfig:
    """The settings generate.py and prompt.py read: which checkpoint, and how to sample from it."""

    temperature: float = 0.8  # below 1 sharpens the distribution; 0 is greedy (always the likeliest token)
    top_k: int = setting(50, minimum=0)  # sample among the k likeliest tokens only; 0 turns it off
    top_p: float = 0.95  # then among the fewest of those whose probability adds up to top_p; 1 turns it off
    max_new_tokens: int = 200
    seed: int = setting(TrainConfig.seed, minimum=0)
    testing_model_path: str = ""  # a checkpoint, or a folder (its newest); "": the newest in LOG_DIR

    @classmethod
    def from_env(cls):
        config = read(cls)
        if not 0 < config.top_p <= 1:
            raise UserError(f"TOP_P must be in (0, 1], got {config.top_p}")
        return config

    def options(self):
        """Return the keyword arguments `sampling.stream` and `sampling.generate` take."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class ServeConfig:
    """serve.py's own setting (it loads its model as prompt.py does)."""

    serve_api_key: str = ""  # when set, every /v1 request must carry "Authorization: Bearer <key>"

    @classmethod
    def from_env(cls):
        return read(cls)


@dataclass
class HellaSwagFiles:
    """Where hellaswag.py finds the validation rows (train.py and evaluate.py)."""

    hellaswag_path: str = ""  # a local hellaswag_val.jsonl: no download
    hellaswag_dir: str = "hellaswag"  # where the downloaded file is kept

    @classmethod
    def from_env(cls):
        return read(cls)


@dataclass
class HubConfig:
    """Hugging Face's own variables, as hub.py reads them: any value HF accepts is accepted here."""

    hf_endpoint: str = "https://huggingface.co"
    hf_hub_offline: str = "0"  # 1/true/yes/on: never download (the Hugging Face cache still serves)

    @classmethod
    def from_env(cls):
        return read(cls)

    @property
    def offline(self):
        return on_off(self.hf_hub_offline) is True


SETTINGS = (GPTConfig, TrainConfig, DataConfig, SamplingConfig, ServeConfig, HellaSwagFiles, HubConfig)


def shared(name):
    """Read one of train.py's settings (`log_dir`, `device`, ...), for a script that needs only that one."""
    return getattr(read(TrainConfig, only=[name]), name)


# ----------------------------------------------------------------------------------------------
# a misspelled variable is silently ignored, unless we say so

# what other trainers call our settings (nanoGPT, nanochat, Hugging Face's Trainer, ...)
OTHER_NAMES = {
    "LR": "MAX_LR", "LEARNING_RATE": "MAX_LR", "MAX_ITERS": "MAX_STEPS", "NUM_ITERATIONS": "MAX_STEPS",
    "NUM_STEPS": "MAX_STEPS", "LR_DECAY_ITERS": "MAX_STEPS", "WARMUP_ITERS": "WARMUP_STEPS",
    "EVAL_ITERS": "VAL_STEPS", "EVAL_EVERY": "EVAL_INTERVAL", "SAVE_EVERY": "CHECKPOINT_INTERVAL",
    "SAVE_INTERVAL": "CHECKPOINT_INTERVAL", "OUT_DIR": "LOG_DIR", "OUTPUT_DIR": "LOG_DIR", "CHECKPOINT_DIR": "LOG_DIR",
    "DATASET": "DATASET_PATH", "DATA_DIR": "DATASET_PATH", "MICRO_BATCH_SIZE": "BATCH_SIZE",
    "DEVICE_BATCH_SIZE": "BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS": "TOTAL_BATCH_SIZE",
    "CONTEXT_LENGTH": "SEQ_LENGTH", "MAX_SEQ_LEN": "SEQ_LENGTH", "SEQ_LEN": "SEQ_LENGTH", "N_EMBED": "N_EMBD",
    "NUM_LAYERS": "N_LAYER", "DEPTH": "N_LAYER", "NUM_HEADS": "N_HEAD", "HIDDEN_SIZE": "N_EMBD",
    "MODEL_PATH": "TESTING_MODEL_PATH", "CHECKPOINT": "TESTING_MODEL_PATH",
}
# other tools' variables, never warned about: CUDA, OpenMP, Hugging Face, NCCL, PyTorch, torchrun, W&B (and
# the netrc file where W&B keeps its login)
OTHER_TOOLS = ("CUDA_", "OMP_", "HF_", "NCCL_", "TORCH", "PYTORCH_", "GLOO_", "MASTER_", "KMP_", "MKL_", "WANDB_",
               "NETRC")
TORCHRUN = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
            "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE"}


def names():
    """Return every setting's variable name."""
    return {field.name.upper() for cls in SETTINGS for field in fields(cls)}


def cleared_environment(**chosen):
    """Return this process's environment without any setting or torchrun variable, plus `chosen`:
    for a child process (a benchmark's run, a check's step) that the caller's shell must not steer."""
    ours = names() | TORCHRUN
    return {**{name: value for name, value in os.environ.items() if name not in ours}, **chosen}


def one_edit_apart(a, b):
    """Return True when a and b differ by at most one inserted, deleted, replaced or swapped character."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    swapped = i + 1 < len(a) and a[i] == b[i + 1] and a[i + 1] == b[i]
    return a[i + 1:] == b[i + 1:] or (swapped and a[i + 2:] == b[i + 2:])


def probably_meant(variable, known):
    """Return the setting that a set variable which is none probably stands for, or None."""
    if variable in known or variable in TORCHRUN or variable.upper().startswith(OTHER_TOOLS):
        return None
    if variable.upper() in OTHER_NAMES:
        return OTHER_NAMES[variable.upper()]
    squashed = variable.lower().replace("_", "")
    return next((name for name in sorted(known) if one_edit_apart(squashed, name.lower().replace("_", ""))), None)


def warn_misspelled():
    """Print one warning line for each set variable that looks like a misspelled setting (rank 0 only)."""
    if os.environ.get("RANK", "0") != "0":
        return
    known = names()
    for variable in sorted(os.environ):
        meant = probably_meant(variable, known)
        if meant and is_set(variable):
            print(f"Warning: {variable} is not a setting and is ignored; did you mean {meant}?",
                  file=sys.stderr, flush=True)
