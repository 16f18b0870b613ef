"""Export a checkpoint as a Hugging Face model directory.

    uv run export_hf.py --checkpoint log/model_04999.pt --out my-gpt2

writes `model.safetensors` and `config.json` (a `GPT2LMHeadModel`, the vocabulary cropped to GPT-2's
50257 ids), `generation_config.json` and GPT-2's tokenizer files, so that
`AutoModelForCausalLM.from_pretrained("my-gpt2")`, `AutoTokenizer.from_pretrained("my-gpt2")` and
`pipeline("text-generation", model="my-gpt2")` load it with no network. Without `--checkpoint` the
newest checkpoint in `LOG_DIR` (default `log`) is exported.
"""

import json
import os
import shutil
import tempfile

from checkpoint import load_model, resolve_path
from env import ArgumentParser, UserError, cli, reason
from model import GPT2_VOCAB_SIZE
from tokenizer import EOT, bpe_files, encode

# Everything an export writes. A non-empty --out holding only these names is an earlier export and
# gets replaced; any other file in it belongs to the user, so the export refuses to touch the folder.
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt"}


def parse_args(argv=None):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face model directory.")
    parser.add_argument("--checkpoint", help="a model_XXXXX.pt or model_XXXXX.dcp, or a folder whose newest checkpoint is used "
                        "(default: the newest in $LOG_DIR)")
    parser.add_argument("--out", required=True, help="the directory to write (new, empty, or an earlier export)")
    return parser.parse_args(argv)


def check_out_dir(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    foreign = sorted(set(os.listdir(out)) - EXPORT_FILES) if os.path.isdir(out) else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"--out {out} already holds files that are not an export ({shown}): "
                        "choose a new or empty directory")


def build_tokenizer(model_max_length):
    """Build GPT-2's tokenizer for transformers from the very files our tiktoken encoding is built from.

    It is built from the parsed vocab and merges: transformers 5's GPT2TokenizerFast(vocab_file=...,
    merges_file=...) quietly ignores the files and encodes every text to nothing.
    """
    from transformers import GPT2TokenizerFast

    encoder_json, vocab_bpe = bpe_files()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]  # line 0 is "#version: 0.2"
    hf_tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)
    sample = "Hello world!  It's 2024:\n\tnaïve café, 東京 🙂"
    if hf_tokenizer.encode(sample) != encode(sample):
        raise UserError("this transformers version builds a GPT-2 tokenizer that disagrees with tiktoken; "
                        "use the version in uv.lock (uv sync)")
    return hf_tokenizer


def write_export(model, out):
    """Write everything into a staging folder beside `out`, then move it in: a failed export never
    leaves a half-written directory, nor half-overwrites an earlier export."""
    from transformers import GenerationConfig

    hf_model = model.to_hf()
    # sample with top-k 50 like this project's demos, and stop (and pad) at <|endoftext|>
    hf_model.generation_config = GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
                                                  do_sample=True, top_k=50)
    hf_tokenizer = build_tokenizer(model.config.block_size)

    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".export_hf-", dir=parent)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or reason(error)}") from None
    try:
        # one file even for gpt2-xl (6 GB), as on the Hub: an older transformers would shard at 5 GB
        hf_model.save_pretrained(staging, max_shard_size="50GB")
        hf_tokenizer.save_pretrained(staging)
        # the slow-tokenizer files too, for readers that do not use tokenizer.json
        encoder_json, vocab_bpe = bpe_files()
        shutil.copyfile(encoder_json, os.path.join(staging, "vocab.json"))
        shutil.copyfile(vocab_bpe, os.path.join(staging, "merges.txt"))
        os.makedirs(out, exist_ok=True)
        names = sorted(os.listdir(staging))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or reason(error)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


@cli
def main(argv=None):
    args = parse_args(argv)
    path = resolve_path(args.checkpoint, "train one with train.py, or pass --checkpoint PATH")
    out = os.path.normpath(args.out)
    check_out_dir(out)
    model, state = load_model(path)
    shape = model.config.shape()
    print(f"Loaded checkpoint {path} (step {state.get('step', '?')}): {shape}")
    if shape["vocab_size"] < GPT2_VOCAB_SIZE:
        raise UserError(f"{path} has a vocabulary of {shape['vocab_size']} ids, fewer than the GPT-2 "
                        f"tokenizer's {GPT2_VOCAB_SIZE}: it cannot be exported as a GPT-2 model")
    if shape["vocab_size"] > GPT2_VOCAB_SIZE:
        print(f"Cropping the vocabulary from {shape['vocab_size']} to {GPT2_VOCAB_SIZE} (the rest is padding)")

    names = write_export(model, out)
    print(f"Wrote {out}/:")
    for name in names:
        print(f"  {name:<24} {os.path.getsize(os.path.join(out, name)):>14,} bytes")
    print(f'Load it with AutoModelForCausalLM.from_pretrained("{out}") and '
          f'AutoTokenizer.from_pretrained("{out}"), or fine-tune it further with INIT_FROM={out}')


if __name__ == "__main__":
    main()
