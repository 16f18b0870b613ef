"""Serve a trained checkpoint to many clients at once: an OpenAI-compatible API and a chat page.

    uv run serve.py                                      # the newest checkpoint in $LOG_DIR, http://127.0.0.1:8000
    uv run serve.py --checkpoint log/model_00099.pt --port 8080
    SERVE_API_KEY=secret uv run serve.py --host 0.0.0.0  # for other machines too: with a key

    GET  /                      a chat page
    GET  /v1/models, /health
    POST /v1/completions        OpenAI's legacy completions: a prompt (a string, token ids, or a list of
                                either), max_tokens, temperature (0: greedy), top_p, stop, seed, stream,
                                echo and logprobs (up to 5, for lm-evaluation-harness)
    POST /v1/chat/completions   messages (system messages are accepted and ignored: the model never saw
                                one), max_tokens, temperature, top_p, stop, seed, stream

A string prompt follows <|endoftext|>, as every training document does; a chat becomes documents
in the Question/Answer form (documents.py), the oldest turns dropped first when the conversation
and max_tokens do not fit the model's context. Requests decode together (batching.py), off the
event loop. The model, its device and precision come as for prompt.py (TESTING_MODEL_PATH, DEVICE,
DTYPE); with SERVE_API_KEY set, every /v1 request needs "Authorization: Bearer <key>". SIGTERM or
Ctrl-C: no new requests, the answers under way finish (5 seconds at most), exit 0.
"""

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import checkpoint
from batching import Engine, QueueFull, Request
from documents import NEXT_QUESTION, qa_document, question_prompt
from env import ArgumentParser, UserError, cli
from model import GPT2_VOCAB_SIZE
from settings import ServeConfig
from tokenizer import EOT, TextStream, decode, encode, get_encoding

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
MAX_BODY = 2**20  # bytes of a request: a full context of token ids is a few kB
CHAT_ROOM = 256  # tokens kept free for the answer when a chat gives no max_tokens and the history is long
DRAIN_SECONDS = 5  # after SIGTERM or Ctrl-C, for the answers under way
COMPLETIONS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
               "echo", "logprobs", "n", "user"}
CHAT = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
        "stream_options", "n", "user"}


class APIError(Exception):
    """A request the API refuses, answered in OpenAI's error shape with the HTTP status."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status, message, param=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers

    def response(self):
        error = {"message": str(self), "type": self.TYPES.get(self.status, "invalid_request_error"),
                 "param": self.param, "code": None}
        return JSONResponse({"error": error}, self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------
# reading a request

async def read_json(request):
    """Return the request's JSON object, read up to MAX_BODY bytes."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"the request body is larger than {MAX_BODY:,} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def option(data, name, kind, default, low=None, high=None):
    """Return the request's `name`, checked: of type `kind` (a float may be given as an integer),
    between low and high; `default` where it is absent or null."""
    value = data.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):  # JSON as Python reads it allows NaN and Infinity
        ok = False
    if not ok:
        raise APIError(400, f"{name} must be {'a number' if kind is float else kind.__name__}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must be between {low} and {high}, got {value}", name)
    return value


def check_parameters(data, supported):
    """Refuse parameters this server does not do, naming them, rather than ignore them."""
    for name in sorted(data):
        if name not in supported:
            raise APIError(400, f"unsupported parameter: {name}", name)
    if option(data, "n", int, 1) != 1:
        raise APIError(400, "n must be 1: one choice per request", "n")


def stop_strings(data):
    stop = data.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) for s in stops)):
        raise APIError(400, "stop must be a string or a list of at most 4 strings", "stop")
    return stops


def sampling_options(data):
    top_p = option(data, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be above 0 (and at most 1), got 0", "top_p")
    return dict(temperature=option(data, "temperature", float, 1.0, 0.0, 2.0), top_p=top_p,
                seed=option(data, "seed", int, None, -2**63, 2**64 - 1))


def completion_prompts(data):
    """Return the prompts of a completions request: [(token ids the model reads, the ids it echoes,
    their text)]. A string follows <|endoftext|> (not echoed), as a training document does; token
    ids are taken as they are."""
    prompt = data.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt):
        raise APIError(400, "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    prompts = []
    for one in prompt:
        if isinstance(one, str):
            ids = encode(one)
            prompts.append(([EOT] + ids, ids, one))
        elif isinstance(one, list) and one and all(isinstance(i, int) and 0 <= i < GPT2_VOCAB_SIZE for i in one):
            prompts.append((one, one, decode(one)))
        else:
            raise APIError(400, f"prompt must hold strings or lists of token ids (0 to {GPT2_VOCAB_SIZE - 1})",
                           "prompt")
    return prompts


def chat_documents(messages):
    """Return the documents a chat becomes, as token ids, each after its <|endoftext|>: every
    earlier question with its answer, then the open question, the last user message."""
    if not (isinstance(messages, list) and messages):
        raise APIError(400, "messages must be a non-empty list", "messages")
    pairs, question = [], None
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, "every message needs a role: system, user or assistant", "messages")
        text = message_text(message.get("content"))
        if message["role"] == "user":
            question = text if question is None else f"{question}\n{text}"
        elif message["role"] == "assistant" and question is not None:
            pairs.append((question, text))
            question = None
    if question is None:
        raise APIError(400, "the last message must be the user's: the model answers questions", "messages")
    documents = [qa_document(q, a) for q, a in pairs] + [question_prompt(question)]
    return [[EOT] + encode(document) for document in documents]


def message_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise APIError(400, "a message's content must be text", "messages")


# ----------------------------------------------------------------------------------------------
# running it

class Choice:
    """One prompt's way through the engine, as the handlers see it: its text so far, its tokens
    and their log-probabilities, and why it ended."""

    def __init__(self, index, job, text, echo=None):
        self.index, self.job, self.text = index, job, text
        self.echo = echo  # (ids, text) shown before the completion, for echo
        self.tokens, self.logprobs, self.prompt_logprobs = [], [], []
        self.finish_reason = None

    def take(self, event):
        """Handle one engine event; return the new text ("" if none)."""
        kind = event[0]
        if kind == "prompt":
            self.prompt_logprobs = event[1][len(event[1]) - len(self.echo[0]):] if self.echo else []
            return ""
        if self.finish_reason:  # a stop string ended it already: later tokens are not part of it
            return ""
        if kind == "error":
            raise APIError(500, event[1])
        if kind == "done":  # <|endoftext|> ("stop"), or max_tokens ("length") unless a stop string came last
            piece = self.text.finish()
            self.finish_reason = "stop" if event[1] == "stop" or self.text.hit else "length"
            return piece
        _, token, logprob, top = event
        self.tokens.append(token)
        self.logprobs.append((logprob, top))
        piece = self.text.push(token)
        if self.text.stopped:
            self.finish_reason = "stop"
            self.job.finished = True  # the engine lets its row go at the next step
        return piece


def start(choices, engine):
    """Submit the choices' jobs; return the queue on which their events come back. A full engine
    is refused now, before any answer has begun."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    if len(choices) > engine.max_batch + engine.max_queue:
        raise APIError(400, f"{len(choices)} prompts in one request, more than this server takes at once "
                            f"({engine.max_batch + engine.max_queue})", "prompt")

    def deliver(event, choice):
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server has stopped, nobody listens
            loop.call_soon_threadsafe(events.put_nowait, (choice, event))

    for choice in choices:
        choice.job.deliver = functools.partial(deliver, choice=choice)
    try:
        for choice in choices:
            engine.submit(choice.job)
    except QueueFull:
        for choice in choices:
            choice.job.finished = True
        raise APIError(429, f"the server is busy ({engine.max_batch} requests decoding, {engine.max_queue} waiting): "
                            "retry in a moment", headers={"Retry-After": "1"}) from None
    return events


async def follow(choices, events, endings=False):
    """Yield (choice, new text) as the engine hands back tokens (with `endings`, each choice's end
    too, even without new text) until every choice is finished. Whoever stops listening (a client
    gone) drops the jobs: the engine lets their rows go at its next step."""
    try:
        while any(choice.finish_reason is None for choice in choices):
            choice, event = await events.get()
            piece = choice.take(event)
            if piece or (endings and choice.finish_reason):
                yield choice, piece
    finally:
        for choice in choices:
            choice.job.finished = True


async def whole(request, choices, events):
    """Return each choice's whole text ({index: text}), or None if the client went before the end
    (its jobs are dropped then: the engine lets their rows go at its next step)."""
    texts = {choice.index: "" for choice in choices}

    async def collect():
        async for choice, piece in follow(choices, events):
            texts[choice.index] += piece

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait([collecting, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        collecting.cancel()
        watching.cancel()
    if collecting not in done:
        return None
    collecting.result()  # the engine's error, if any
    return texts


class Streaming(StreamingResponse):
    """Server-sent events whose jobs are dropped however the answer ends: a client that goes even
    before the first event frees its rows."""

    def __init__(self, events, choices):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.choices = choices

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for choice in self.choices:
                choice.job.finished = True


def logprobs_object(choice, k):
    """Return OpenAI's legacy logprobs of a completion (with echo, its prompt's first)."""
    encoding = get_encoding()
    ids = (list(choice.echo[0]) if choice.echo else []) + choice.tokens
    values = (choice.prompt_logprobs if choice.echo else []) + choice.logprobs
    text = [encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    offsets = list(itertools.accumulate(map(len, text), initial=0))[:-1]  # where each token's text starts
    return {"tokens": text, "token_logprobs": [lp for lp, _ in values],
            "top_logprobs": [None if top is None else {decode([i]): v for i, v in list(top.items())[:k]}
                             for _, top in values],
            "text_offset": offsets}


def usage(prompt_tokens, choices):
    completion = sum(len(choice.tokens) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(data):
    return f"data: {json.dumps(data)}\n\n"


def make_app(engine, context, name, api_key=""):
    """Return the web application serving the model named `name`, of `context` tokens, through `engine`."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    def authorize(request):
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <SERVE_API_KEY>")

    def fit(ids, max_tokens, param):
        """Return max_tokens cut to the room the prompt leaves in the context (finish_reason
        "length" where that ends the text)."""
        if len(ids) > context:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the model's context of {context}", param)
        return min(max_tokens, context - len(ids))

    async def completions(request):
        authorize(request)
        data = await read_json(request)
        check_parameters(data, COMPLETIONS)
        prompts = completion_prompts(data)
        max_tokens = option(data, "max_tokens", int, 16, 0)
        echo = option(data, "echo", bool, False)
        logprobs = option(data, "logprobs", int, 0, 0, 5)
        stream = option(data, "stream", bool, False)
        include_usage = option(option(data, "stream_options", dict, {}), "include_usage", bool, False)
        if stream and (echo or logprobs):
            raise APIError(400, f"{'echo' if echo else 'logprobs'} is not supported with stream", "echo" if echo else "logprobs")
        stops, sampling = stop_strings(data), sampling_options(data)
        choices = []
        for index, (ids, shown, text) in enumerate(prompts):
            job = Request(ids, fit(ids, max_tokens, "prompt"), deliver=None, prompt_logprobs=echo and logprobs > 0,
                          logprobs=logprobs, **sampling)
            choices.append(Choice(index, job, TextStream(stops), (shown, text) if echo else None))
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)

        def body(choice, text):
            return {"text": text, "index": choice.index, "finish_reason": choice.finish_reason,
                    "logprobs": logprobs_object(choice, logprobs) if logprobs else None}

        events = start(choices, engine)
        if not stream:
            texts = await whole(request, choices, events)
            if texts is None:
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": name,
                                 "choices": [body(c, (c.echo[1] if c.echo else "") + texts[c.index]) for c in choices],
                                 "usage": usage(prompt_tokens, choices)})

        def chunk(**fields):
            return sse({"id": ident, "object": "text_completion", "created": created, "model": name, **fields})

        async def stream_events():
            async for choice, piece in follow(choices, events, endings=True):
                yield chunk(choices=[{"text": piece, "index": choice.index, "logprobs": None,
                                      "finish_reason": choice.finish_reason}])
            if include_usage:
                yield chunk(choices=[], usage=usage(prompt_tokens, choices))

        return streaming(stream_events(), choices)

    async def chat(request):
        authorize(request)
        data = await read_json(request)
        check_parameters(data, CHAT)
        documents = chat_documents(data.get("messages"))
        stream = option(data, "stream", bool, False)
        include_usage = option(option(data, "stream_options", dict, {}), "include_usage", bool, False)
        limit = option(data, "max_completion_tokens", int, None, 1) or option(data, "max_tokens", int, None, 1)
        room = limit or min(CHAT_ROOM, context // 4)  # without max_tokens: room for an answer, the rest is history
        while len(documents) > 1 and sum(map(len, documents)) + room > context:
            documents.pop(0)  # the oldest turn first: chat pages send the whole history every time
        ids = [token for document in documents for token in document]
        job = Request(ids, fit(ids, limit or context, "messages"), deliver=None, **sampling_options(data))
        choices = [Choice(0, job, TextStream([NEXT_QUESTION, *stop_strings(data)], lstrip=True))]
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        events = start(choices, engine)
        if not stream:
            texts = await whole(request, choices, events)
            if texts is None:
                return Response(status_code=499)
            text = texts[0]
            return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": choices[0].finish_reason}],
                                 "usage": usage(len(ids), choices)})

        def chunk(**fields):
            return sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, **fields})

        async def stream_events():
            yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for choice, piece in follow(choices, events, endings=True):
                yield chunk(choices=[{"index": 0, "delta": {"content": piece} if piece else {},
                                      "finish_reason": choice.finish_reason}])
            if include_usage:
                yield chunk(choices=[], usage=usage(len(ids), choices))

        return streaming(stream_events(), choices)

    def streaming(chunks, choices):
        """Answer with server-sent events, ending with [DONE]; an error once the answer has begun
        (the status is sent by then) comes as an event of OpenAI's error shape."""
        async def events():
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as error:
                yield sse(json.loads(error.response().body))
            yield "data: [DONE]\n\n"

        return Streaming(events(), choices)

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                          "owned_by": "mini-gpt2"}]})

    async def health(request):
        decoding, waiting = engine.load()
        return JSONResponse({"status": "ok", "decoding": decoding, "waiting": waiting})

    async def home(request):
        return HTMLResponse(page, headers={"X-Content-Type-Options": "nosniff"})

    def api(handler):
        async def answer(request):
            try:
                return await handler(request)
            except APIError as error:
                return error.response()
        return answer

    async def not_found(request, exc):
        return APIError(exc.status_code, f"no such route: {request.method} {request.url.path}").response()

    routes = [Route("/", home), Route("/health", health), Route("/v1/models", api(models)),
              Route("/v1/completions", api(completions), methods=["POST"]),
              Route("/v1/chat/completions", api(chat), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


# ----------------------------------------------------------------------------------------------
# the server

class Server(uvicorn.Server):
    """uvicorn's server, in a thread beside the main one (which decodes: batching.py says why)."""

    @contextlib.contextmanager
    def capture_signals(self):
        """Signals reach the main thread only: main() takes them there."""
        yield


def listen(host, port):
    """Return a socket bound to host:port, or one line saying why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as error:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}") from None
    return sock


@cli
def main():
    parser = ArgumentParser(description="Serve a checkpoint: an OpenAI-compatible API and a chat page.")
    parser.add_argument("--checkpoint", default="", help="a checkpoint, or a folder: its newest (default: "
                        "$TESTING_MODEL_PATH, else the newest in $LOG_DIR)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a place at most (then 429)")
    args = parser.parse_args()
    if args.max_batch < 1 or args.max_queue < 0:
        raise UserError("--max-batch must be at least 1 and --max-queue at least 0")
    api_key = ServeConfig.from_env().serve_api_key
    sock = listen(args.host, args.port)
    model, runtime, path = checkpoint.load_testing_model(args.checkpoint)
    name = os.path.basename(os.path.normpath(path))
    engine = Engine(model, runtime, args.max_batch, args.max_queue)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {path} ({model.num_params(non_embedding=False):,} parameters, {runtime.device}, "
          f"{runtime.dtype_name}) at http://{shown}:{sock.getsockname()[1]}/ (the API under /v1)", flush=True)
    if not ipaddress.ip_address(socket.gethostbyname(args.host) if ":" not in args.host else args.host).is_loopback:
        print(f"Warning: listening on {args.host}: anyone who can reach this machine can use the model"
              + ("" if api_key else " (set SERVE_API_KEY to require a key)"), file=sys.stderr, flush=True)
    config = uvicorn.Config(make_app(engine, model.config.block_size, name, api_key), log_level="warning",
                            timeout_graceful_shutdown=DRAIN_SECONDS)
    server = Server(config)

    def serve():
        try:
            server.run(sockets=[sock])
        finally:
            engine.close()

    # SIGTERM or Ctrl-C stop the server as uvicorn does (no new requests, those under way finish), but
    # then the process exits 0 (uvicorn would raise the signal again): a server that drained has lost nothing
    previous = {number: signal.signal(number, server.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=serve, name="http").start()
        engine.run()
    finally:
        server.should_exit = True  # should the engine fail, the web server stops too
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not server.started:
        raise UserError("the web server did not start (its error is above)")
    print("Stopped.", flush=True)


if __name__ == "__main__":
    main()
