"""Continuous batching: serve.py's requests decode together, each at its own point.

One thread owns the model: the main one, which `Engine.run` keeps until `close` (torch's small
matrix products ran up to 2x slower from a thread started later, its OpenMP threads competing with
the main thread's; serve.py runs its web server in the other thread). Between two decode steps it
admits waiting requests (each prompt goes through the model on its own, into a row of the KV cache
of its own) and lets finished ones go (the last row moves into the gap), so the batch changes at
every step while each row keeps its own position, sampling settings and random generator. A client
that has gone (or whose text reached a stop string) is dropped at the next step; the others never
notice.

serve.py hands requests over with `Engine.submit`; the engine gives back each request's events
through the `deliver` callback it carries, from the engine's thread:
    ("prompt", [(logprob, top), ...]) every prompt token's log-probability after the ones before it,
                                      and the likeliest alternatives there (Request.prompt_logprobs)
    ("token", id, logprob, top)       the next token, and with Request.logprobs its log-probability and
                                      the likeliest alternatives ({id: logprob})
    ("done", "stop" | "length")       <|endoftext|>, or max_tokens reached
    ("error", message)                the model's output was unusable (logits that are not finite)
"""

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from env import UserError
from model import GPT2_VOCAB_SIZE, KVCache
from sampling import make_generator, sample_next
from tokenizer import EOT


class QueueFull(Exception):
    """No room: the batch is full and so is the queue of requests waiting for a row."""


@dataclass
class Request:
    prompt: list  # token ids, at least one
    max_tokens: int  # new tokens at most; 0: only the prompt's log-probabilities
    deliver: Callable  # called with each event, from the engine's thread
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # a generator of the request's own: the same seed, the same text
    logprobs: int = 0  # with each new token, its log-probability and this many likeliest alternatives
    prompt_logprobs: bool = False  # the log-probability of every prompt token after the ones before
    finished: bool = False  # done; or, set from outside, the client has gone or a stop string ended its text
    generated: int = 0
    last: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)


class Engine:
    """Decodes the requests of many clients in one batch of at most `max_batch` rows, with up to
    `max_queue` more waiting for a row."""

    def __init__(self, model, runtime, max_batch=8, max_queue=64):
        self.model, self.runtime = model, runtime
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = KVCache(model.config, max_batch)
        self.waiting = collections.deque()
        self.active = []  # the request of every row, rows 0 .. len - 1
        self.lock = threading.Condition()
        self.closing = False

    def submit(self, request):
        """Queue a request for the next free row; QueueFull when the rows and the queue are full."""
        with self.lock:
            if self.closing or len(self.waiting) >= self.max_queue + self.max_batch - len(self.active):
                raise QueueFull
            self.waiting.append(request)
            self.lock.notify()

    def load(self):
        """Return (requests decoding, requests waiting)."""
        with self.lock:
            return len(self.active), len(self.waiting)

    def close(self):
        """Take no more requests: run() returns once those already taken are finished."""
        with self.lock:
            self.closing = True
            self.lock.notify()

    def run(self):
        """Decode until close(): call it from the thread that owns the model."""
        with torch.no_grad(), self.runtime.autocast():
            while True:
                with self.lock:
                    while not (self.waiting or self.active or self.closing):
                        self.lock.wait()
                    if self.closing and not (self.waiting or self.active):
                        return
                    room = self.max_batch - len(self.active)
                    admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                for request in admitted:
                    self.guarded(self.admit, [request], request)
                self.release()
                if self.active:
                    self.guarded(self.step, self.active)
                    self.release()

    def guarded(self, work, requests, *args):
        """Do the work; should it fail, end its requests with the error rather than the engine."""
        try:
            work(*args)
        except Exception as error:  # whatever it is, the server must go on serving the others
            for request in list(requests):
                request.deliver(("error", f"{type(error).__name__}: {error}"))
                request.finished = True

    def admit(self, request):
        """Run the request's prompt into the next free row, and take its first token."""
        if request.finished:
            return
        row = len(self.active)
        self.active.append(request)
        self.cache.lengths[row] = 0
        if request.seed is not None:
            request.generator = make_generator(self.runtime.device, request.seed)
        prompt = torch.tensor([request.prompt], device=self.runtime.device)
        hidden = self.model.hidden(prompt, cache=self.cache.use(row, 1))[0]  # (T, n_embd)
        if request.prompt_logprobs:  # every prompt token after the ones before it (the first has none)
            logits = self.model.lm_head(hidden[:-1])
            request.deliver(("prompt", [(None, None)] + with_alternatives(logits, prompt[0, 1:], request.logprobs)))
        if request.max_tokens == 0:
            request.deliver(("done", "length"))
            request.finished = True
            return
        self.take(request, self.model.lm_head(hidden[-1:])[0])

    def step(self):
        """Run every row's last token through the model together, and take each row's next one."""
        tokens = torch.tensor([[request.last] for request in self.active], device=self.runtime.device)
        logits = self.model.lm_head(self.model.hidden(tokens, cache=self.cache.use(0, len(self.active)))[:, -1])
        for request, row_logits in zip(list(self.active), logits):
            if not request.finished:
                self.take(request, row_logits)

    def take(self, request, logits):
        """Sample the request's next token from its logits (vocab_size,) and hand it over."""
        try:
            token = sample_next(logits[None], request.temperature, request.top_k, request.top_p,
                                request.generator).item()
        except UserError as error:  # logits that are not finite: this request ends, the others go on
            request.deliver(("error", str(error)))
            request.finished = True
            return
        logprob, top = None, None
        if request.logprobs:
            (logprob, top), = with_alternatives(logits[None], torch.tensor([token]), request.logprobs)
        request.generated, request.last = request.generated + 1, token
        request.deliver(("token", token, logprob, top))
        if token == EOT or request.generated == request.max_tokens:
            request.deliver(("done", "stop" if token == EOT else "length"))
            request.finished = True

    def release(self):
        """Let finished and abandoned requests go, the last row moving into each gap."""
        for row in reversed(range(len(self.active))):
            if self.active[row].finished:
                last = len(self.active) - 1
                if row != last:
                    self.cache.move(last, row)
                    self.active[row] = self.active[last]
                self.active.pop()


def with_alternatives(logits, tokens, k):
    """Return, for each row of logits (rows, vocab_size) and its token, the token's log-probability
    and the k likeliest tokens' ({id: logprob})."""
    logprobs = F.log_softmax(logits[:, :GPT2_VOCAB_SIZE].float(), dim=-1)
    chosen = logprobs.gather(1, tokens.to(logprobs.device)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(max(k, 1), dim=-1)
    return [(lp, dict(zip(row_ids, row_values))) for lp, row_ids, row_values in zip(chosen, ids.tolist(), values.tolist())]
