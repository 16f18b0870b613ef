"""Print the full HellaSwag report of a checkpoint (or of a Hugging Face GPT-2).

    uv run evaluate.py --checkpoint log/model_19072.pt [--limit 500] [--variant lm-eval]
    uv run evaluate.py --hf-model gpt2
    torchrun --standalone --nproc_per_node=8 evaluate.py      # the examples split across ranks

Overall accuracy (acc_norm, the number train.py logs, and acc), accuracy by split type, five
random examples explained, and every example's scores in $LOG_DIR/eval_results.pt.
"""

import os
import random

import checkpoint
import device
import hellaswag
from env import ArgumentParser, UserError, cli
from model import GPT
from settings import shared


def parse_args():
    parser = ArgumentParser(description="Evaluate a model on the HellaSwag validation set.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint",
                        help="a checkpoint written by train.py, or a folder: its newest (default: $LOG_DIR)")
    source.add_argument("--hf-model",
                        help="a Hugging Face GPT-2 instead: a Hub name (gpt2, gpt2-medium, ...) or a local directory")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate the first N rows only (default $HELLASWAG_LIMIT; 0 or -1: all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per forward pass (default: 64, 256 on CUDA)")
    parser.add_argument("--device", default=None, help="auto, cpu, mps, cuda or cuda:N (default $DEVICE, else auto)")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16 (default $DTYPE, else auto)")
    parser.add_argument("--seed", type=int, default=None, help="picks the 5 examples shown (default $SEED, else 1337)")
    parser.add_argument("--variant", choices=hellaswag.VARIANTS, default="nanogpt",
                        help="nanogpt: build-nanogpt's scoring (default); lm-eval: lm-evaluation-harness's")
    args = parser.parse_args()
    if args.limit is None:
        args.limit = shared("hellaswag_limit")
    if args.limit < -1:
        raise UserError(f"--limit must be a row count, or 0 / -1 for all rows, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed is None:
        args.seed = shared("seed")
    args.device = args.device or shared("device")
    args.dtype = args.dtype or shared("dtype")
    return args


def load_scored_model(args, runtime, say):
    """Return the GPT to score, on the runtime's device, and its name for the report."""
    if args.hf_model:
        say(f"Loading Hugging Face model {args.hf_model}")
        say("Initializing model...")
        model = GPT.from_pretrained(args.hf_model).to(runtime.device).eval()
        say("Model loaded successfully!")
        return model, args.hf_model
    path = checkpoint.resolve_path(args.checkpoint, "pass --checkpoint PATH, or train one with train.py")
    say(f"Loading checkpoint from {path}")
    model, _ = checkpoint.load_model(path, runtime.device, say)
    return model, path


def report(examples, result, seed):
    print("\nOverall Results:")
    print(f"Total Accuracy: {result.acc_norm:.4f} ({result.correct_norm}/{result.total})")
    print(f"Unnormalized Accuracy: {result.acc:.4f} ({result.correct}/{result.total})")
    print("\nAccuracy by Split Type:")
    split_types = [ex["split_type"] for ex in examples]
    for split_type in sorted(set(split_types)):
        chosen = [i for i, s in enumerate(split_types) if s == split_type]
        right = int((result.pred_norm[chosen] == result.labels[chosen]).sum())
        print(f"{split_type}: {right / len(chosen):.4f} ({right}/{len(chosen)})")
    shown = random.Random(seed).sample(range(len(examples)), min(5, len(examples)))
    print(f"\nDetailed Analysis of {len(shown)} Random Examples:")
    per = "token" if result.variant == "nanogpt" else "character"
    for n, i in enumerate(shown, 1):
        context, endings = hellaswag.texts(examples[i], result.variant)
        print(f"\nExample {n} (row {i}, {examples[i]['split_type']}):")
        print(f"Context: {context}")
        print(f"Endings (NLL per {per}, lower is more likely; summed NLL):")
        for j, ending in enumerate(endings):
            print(f"  {j}: {ending} (score: {result.norm_nll[i, j]:.4f}, sum: {result.sum_nll[i, j]:.2f})")
        predicted, correct = int(result.pred_norm[i]), int(result.labels[i])
        print(f"Predicted: {predicted} ({'right' if predicted == correct else 'wrong'})")
        print(f"Correct: {correct}")


@cli
def main():
    args = parse_args()
    runtime = device.setup(args.device, args.dtype)

    def say(text):  # rank 0 speaks for all
        if runtime.master:
            print(text, flush=True)

    try:
        say(f"Using device: {runtime.device} ({runtime.dtype_name}), HellaSwag variant: {args.variant}")
        log_dir = shared("log_dir")
        model, name = load_scored_model(args, runtime, say)
        examples = hellaswag.load_examples(args.limit)
        say("Evaluating on HellaSwag validation set...")
        result = hellaswag.evaluate(model, runtime, examples, args.batch_size, args.variant, progress=True)
        if runtime.master:
            report(examples, result, args.seed)
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "eval_results.pt")
            state = result.state()
            state.update(model=name, split_types=[ex["split_type"] for ex in examples],
                         ind=[ex.get("ind", -1) for ex in examples],
                         source_ids=[ex.get("source_id", "") for ex in examples])
            checkpoint.save(state, path)
            print(f"\nDetailed results saved to {path}")
    finally:
        device.teardown()


if __name__ == "__main__":
    main()
