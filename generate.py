"""A generation demo: a trained checkpoint continues a physics prompt and answers a question.

    uv run generate.py                                  # the newest checkpoint in $LOG_DIR (log/)
    TESTING_MODEL_PATH=log/model_00049.pt uv run generate.py
    TEMPERATURE=0 MAX_NEW_TOKENS=50 uv run generate.py  # greedy, shorter

The sampling settings (TEMPERATURE, TOP_K, TOP_P, MAX_NEW_TOKENS, SEED, TESTING_MODEL_PATH) are
settings.SamplingConfig; DEVICE and DTYPE pick the device and precision as in train.py.
"""

import checkpoint
from documents import question_prompt
from env import cli
from sampling import generate, make_generator
from settings import SamplingConfig
from tokenizer import EOT, decode, encode

PROMPT = "What is the relationship between kinetic and potential energy in a"
QUESTION = "Explain how conservation of energy applies to a pendulum's motion."


def complete(model, text, settings, generator):
    """Return `text` followed by the model's continuation of it."""
    ids = encode(text)
    # <|endoftext|> first: every training document starts after one
    new = generate(model, [EOT] + ids, settings.max_new_tokens, generator=generator, **settings.options())[0]
    return decode(ids + new)


@cli
def main():
    settings = SamplingConfig.from_env()
    print("Starting model generation demo...")
    model, runtime, _ = checkpoint.load_testing_model()
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
