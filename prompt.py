"""Chat with a trained checkpoint: every line you type is a question, the answer streams back.

    uv run prompt.py
    TESTING_MODEL_PATH=log/model_00049.pt TEMPERATURE=0.6 uv run prompt.py
    printf 'temp 0.5\\nWhat is inertia?\\nquit\\n' | uv run prompt.py   # scripted

Commands: `quit` (or end of input, or Ctrl-C), `temp X` (0.1 to 2.0), `tokens X` (1 to 1000).
The model and the other settings come as in generate.py.
"""

import sys

import checkpoint
from documents import NEXT_QUESTION, question_prompt
from env import cli
from sampling import make_generator, stream
from settings import SamplingConfig
from tokenizer import EOT, TextStream, encode

BANNER = """
Tiny Physics GPT Chatbot
------------------------
Type 'quit' to exit
Type 'temp X' to change temperature (0.1-2.0)
Type 'tokens X' to change max tokens (1-1000)"""

def answer_pieces(token_ids):
    """Yield the answer's text piece by piece as the tokens (ints) arrive: it ends before
    <|endoftext|>, or where the model starts asking the next question."""
    text = TextStream(stops=[NEXT_QUESTION], lstrip=True)
    for token in token_ids:
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    if piece := text.finish():
        yield piece


# the REPL's commands: the setting each changes, its type and its range
COMMANDS = {"temp": ("temperature", float, 0.1, 2.0, "Temperature"),
            "tokens": ("max_new_tokens", int, 1, 1000, "Max tokens")}


def change_setting(settings, command, value):
    """Apply `temp X` / `tokens X`; return the line that says what happened."""
    field, kind, low, high, label = COMMANDS[command]
    try:
        number = kind(value)
    except ValueError:
        return f"{label} must be a number from {low} to {high} (type '{command} X'), got {value!r}"
    if not low <= number <= high:  # also refuses nan
        return f"{label} must be between {low} and {high}, got {value}"
    setattr(settings, field, number)
    return f"{label} set to {number}"


def repl(model, settings, generator):
    """Read lines from stdin until `quit`, end of input or Ctrl-C; answer every question."""
    print(BANNER)
    while True:
        try:
            line = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print("\nGoodbye!")
            return
        if not sys.stdin.isatty():
            print(line)  # a scripted session reads like a typed one
        words = line.split()
        if not words:
            continue
        command = words[0].lower()
        if command in ("quit", "exit") and len(words) == 1:
            print("Goodbye!")
            return
        if command in COMMANDS and len(words) <= 2:  # "temp of the sun?" is a question
            print(change_setting(settings, command, words[1] if len(words) == 2 else ""))
            continue
        print("\nBot: ", end="", flush=True)
        ids = [EOT] + encode(question_prompt(line.strip()))  # a training document starts after <|endoftext|>
        tokens = stream(model, ids, settings.max_new_tokens, generator=generator, **settings.options())
        try:
            for piece in answer_pieces(next_ids.item() for next_ids in tokens):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\nGoodbye!")
            return
        print()


@cli
def main():
    settings = SamplingConfig.from_env()
    print("Loading model...")
    model, runtime, _ = checkpoint.load_testing_model()
    with runtime.autocast():  # for the whole session: the low-precision copy of the weights is made once
        repl(model, settings, make_generator(runtime.device, settings.seed))


if __name__ == "__main__":
    main()
