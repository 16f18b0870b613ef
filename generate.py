"""A generation demo: a trained checkpoint continues a physics prompt and answers a question.

    uv run generate.py                                  # the newest checkpoint in $LOG_DIR (log/)
    TESTING_MODEL_PATH=log/model_00049.pt uv run generate.py
    TEMPERATURE=0 MAX_NEW_TOKENS=50 uv run generate.py  # greedy, shorter

Sampling settings (TEMPERATURE, TOP_K, TOP_P, MAX_NEW_TOKENS, SEED) are in sampling.SamplingConfig;
DEVICE and DTYPE pick the device and precision as in train.py. prompt.py loads its model from here.
"""

import checkpoint
import device
from env import cli, env_str
from sampling import SamplingConfig, generate, make_generator
from tokenizer import EOT, decode, encode

PROMPT = "What is the relationship between kinetic and potential energy in a"
QUESTION = "Explain how conservation of energy applies to a pendulum's motion."


def load_model():
    """(model, runtime): the device first, then TESTING_MODEL_PATH or the newest checkpoint in LOG_DIR."""
    runtime = device.setup(env_str("DEVICE", "auto"), env_str("DTYPE", "auto"))
    print(f"Using device: {runtime.device}")
    path = checkpoint.model_path_from_env()
    print("Loading checkpoint...")
    state = checkpoint.load(path)
    print(f"Loaded checkpoint from {path}")
    print("Initializing model...")
    model = checkpoint.build_model(state, path).to(runtime.device).eval()
    print("Model loaded successfully!")
    return model, runtime


def question_prompt(question):
    """A question in the form the model saw it in training (dataset.py's natural_reasoning documents)."""
    return f"Question: {question}\nAnswer:"


def complete(model, text, settings, generator):
    """`text` followed by the model's continuation of it."""
    ids = encode(text)
    # <|endoftext|> first: every training document starts after one
    new = generate(model, [EOT] + ids, settings.max_new_tokens, generator=generator, **settings.options())[0]
    return decode(ids + new)


@cli
def main():
    settings = SamplingConfig.from_env()
    print("Starting model generation demo...")
    model, runtime = load_model()
    generator = make_generator(runtime.device, settings.seed)
    with runtime.autocast():  # one context: the low-precision copy of the weights is made once
        print("\nExample 1: Direct text generation")
        print(f"Prompt: {PROMPT}")
        print(f"Response: {complete(model, PROMPT, settings, generator)}")
        print("\n" + "-" * 60)

        print("\nExample 2: Question answering")
        print(f"Question: {QUESTION}")
        print(f"Response: {complete(model, question_prompt(QUESTION), settings, generator)}")


if __name__ == "__main__":
    main()
