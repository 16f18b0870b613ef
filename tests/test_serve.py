"""serve.py: one server, started as a user would on a free port with a tiny trained checkpoint in
float32, answers the OpenAI SDK as sampling.py and prompt.py would, many clients at once, refuses
what it cannot do in OpenAI's error shape, serves a chat page a real browser can use, and drains
on SIGTERM. (The last test stops the server.)"""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from torch.nn import functional as F

import checkpoint
import device
import prompt
import sampling
import serve
from batching import QueueFull
from bench.processes import free_port
from documents import qa_document, question_prompt
from starlette.testclient import TestClient
from test_train import ROOT, run_train, subprocess_env
from tokenizer import EOT, decode, encode

KEY = "test-key-not-secret"
QUESTIONS = [f"What is {a} plus {b}?" for a, b in ((1, 2), (12, 30), (7, 7), (40, 2), (3, 90), (5, 5), (61, 8), (9, 19))]


@pytest.fixture(scope="module")
def trained(token_dataset, tmp_path_factory):
    """A tiny checkpoint trained on the sums of the token dataset, and the model read back from it."""
    log_dir = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        run_train(mp, token_dataset, log_dir, MAX_STEPS=30, WARMUP_STEPS=5, MAX_LR="1e-2", MIN_LR="1e-3",
                  EVAL_INTERVAL=1000, CHECKPOINT_INTERVAL=1000)
    path = checkpoint.latest_checkpoint(str(log_dir))
    model, _ = checkpoint.load_model(path)
    return path, model


@pytest.fixture(scope="module")
def server(trained, token_dataset, tmp_path_factory):
    path, _ = trained
    port = free_port()
    env = {**subprocess_env(token_dataset, tmp_path_factory.mktemp("serve_log")), "SERVE_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", path, "--port", str(port),
                                "--max-queue", "16"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the server did not start"
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield {"url": url, "process": process}
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)


def greedy(model, ids, max_tokens):
    """sampling.py's greedy tokens after ids, cut before <|endoftext|>."""
    return sampling.generate(model, ids, max_tokens, temperature=0)[0]


def answer(model, ids, max_tokens):
    """prompt.py's answer to the document ids end with."""
    return "".join(prompt.answer_pieces(greedy(model, ids, max_tokens)))


def chat_ids(*turns):
    """The token ids of a chat: earlier (question, answer) pairs, then the last question."""
    *pairs, question = turns
    documents = [qa_document(q, a) for q, a in pairs] + [question_prompt(question)]
    return [token for document in documents for token in [EOT] + encode(document)]


# ---- the OpenAI SDK as client ---------------------------------------------------------------------

def test_completions_are_sampling_pys_text(client, trained):
    _, model = trained
    for question in QUESTIONS[:3]:
        text = question_prompt(question)
        response = client.completions.create(model="any", prompt=text, max_tokens=20, temperature=0)
        expected = greedy(model, [EOT] + encode(text), 20)
        assert response.choices[0].text == decode(expected)
        assert response.choices[0].finish_reason == ("stop" if len(expected) < 20 else "length")
        assert response.usage.prompt_tokens == len(encode(text)) + 1
        streamed = client.completions.create(model="any", prompt=text, max_tokens=20, temperature=0, stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
        assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_chat_is_prompt_pys_answer_with_earlier_turns_and_no_system_message(client, trained):
    _, model = trained
    first = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=24)
    assert first.choices[0].message.content == answer(model, chat_ids(QUESTIONS[0]), 24)
    messages = [{"role": "system", "content": "You are helpful."},  # accepted, ignored: the model never saw one
                {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24)
    expected = answer(model, chat_ids((QUESTIONS[0], first.choices[0].message.content), QUESTIONS[1]), 24)
    assert second.choices[0].message.content == expected
    streamed = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24,
                                              stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected


def test_a_chat_without_max_tokens_keeps_the_turns_that_fit(client):
    turns = [("What is 1 plus 2?", "3."), ("And 2 plus 2?", "4."), "And 3 plus 3?"]
    messages = [{"role": role, "content": text} for pair in turns[:-1] for role, text in zip(("user", "assistant"), pair)]
    response = client.chat.completions.create(model="any", messages=messages + [{"role": "user", "content": turns[-1]}],
                                              temperature=0)
    assert response.usage.prompt_tokens == len(chat_ids(*turns))  # 38 tokens of a context of 64: all kept


def test_a_seed_repeats_a_sampled_text(client):
    def sampled(seed):
        return client.completions.create(model="any", prompt="Question:", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(8, 12)}) > 1


def test_echo_and_logprobs_are_the_models_own(client, trained):
    _, model = trained
    text = question_prompt(QUESTIONS[2])
    response = client.completions.create(model="any", prompt=text, max_tokens=1, temperature=0, echo=True,
                                         logprobs=3)
    logprobs = response.choices[0].logprobs
    ids = encode(text)
    with torch.no_grad():  # every prompt token after <|endoftext|> and the ones before it
        expected = F.log_softmax(model(torch.tensor([[EOT] + ids]))[0][0, :, :50257], dim=-1)
    assert response.choices[0].text.startswith(text)
    assert len(logprobs.token_logprobs) == len(ids) + 1 == len(logprobs.tokens) == len(logprobs.text_offset)
    for position, token in enumerate(ids):
        assert logprobs.token_logprobs[position] == pytest.approx(expected[position, token].item(), abs=1e-5)
        assert len(logprobs.top_logprobs[position]) == 3
        assert max(logprobs.top_logprobs[position].values()) == pytest.approx(expected[position].max().item(), abs=1e-5)
    # token ids as the prompt (lm-evaluation-harness sends them): the first has nothing before it
    tokens = client.completions.create(model="any", prompt=[EOT] + ids, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1).choices[0].logprobs
    assert tokens.token_logprobs[0] is None
    assert tokens.token_logprobs[1:len(ids) + 1] == pytest.approx(logprobs.token_logprobs[:len(ids)], abs=1e-5)


# ---- many clients at once -------------------------------------------------------------------------

def test_eight_clients_at_once_get_what_each_gets_alone_and_a_dropped_one_changes_nothing(client, server, trained):
    _, model = trained
    expected = [answer(model, chat_ids(question), 30) for question in QUESTIONS]
    results = [None] * len(QUESTIONS)

    def chat(i):
        stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                temperature=0, max_tokens=30, stream=True)
        results[i] = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    def dropped():  # reads two events, then hangs up
        with httpx.stream("POST", f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "Question:", "max_tokens": 60, "stream": True}) as response:
            for _, _ in zip(range(2), response.iter_lines()):
                pass

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(QUESTIONS))] + [threading.Thread(target=dropped)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected
    assert httpx.get(f"{server['url']}/health").json()["waiting"] == 0


# ---- refusals, in OpenAI's error shape --------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, param, message", [
    ("/v1/completions", "{not json", 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature must be a number"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "between 0.0 and 2.0"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", "between 0 and 5"),
    ("/v1/completions", {"prompt": " x" * 70}, 400, "prompt", "the prompt has 71 tokens, more than the model's context of 64"),
    ("/v1/completions", {"prompt": [[EOT, 99999]]}, 400, "prompt", "token ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools",
     "unsupported parameter: tools"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "the user's"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "non-empty list"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed", "between"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True}, 400, "logprobs", "not supported with stream"),
    ("/v1/completions", {"prompt": ["x"] * 25}, 400, "prompt", "25 prompts in one request"),  # 8 rows + 16 waiting
    ("/v1/nothing", {}, 404, None, "no such route"),
])
def test_refusals(server, path, body, status, param, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server["url"] + path, content=content, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and message in error["message"]
    assert httpx.get(f"{server['url']}/health").status_code == 200  # and it still answers


def test_a_key_a_size_limit_and_the_room_left(server, client, trained):
    url = f"{server['url']}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["object"] == "model"
    response = httpx.post(f"{server['url']}/v1/completions", content=b"x" * (2**20 + 1),
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413
    # 60 prompt tokens in a context of 64: max_tokens is cut to the 4 left
    response = client.completions.create(model="any", prompt=[EOT] * 60, max_tokens=50, temperature=0)
    expected = greedy(trained[1], [EOT] * 60, 4)  # sampling.py's tokens in the room left, cut at <|endoftext|>
    assert response.usage.completion_tokens == min(len(expected) + 1, 4)  # + <|endoftext|> itself, if it came
    assert response.choices[0].finish_reason == ("length" if len(expected) == 4 else "stop")


def test_a_full_server_answers_429_with_retry_after(trained):
    _, model = trained

    class Full:
        max_batch, max_queue = 8, 4

        def submit(self, request):
            raise QueueFull

        def load(self):
            return 8, 4

    app = serve.make_app(Full(), model.config.block_size, "tiny")
    response = TestClient(app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                   "stream": True})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_listening_beyond_this_machine_warns_and_a_busy_port_is_one_line(trained, monkeypatch, capsys):
    path, model = trained
    monkeypatch.setattr(checkpoint, "load_testing_model", lambda chosen: (model, device.Runtime("cpu", torch.float32),
                                                                          path))
    monkeypatch.setattr(serve.Server, "run", lambda self, sockets: (sockets[0].close(), setattr(self, "started", True)))
    monkeypatch.setenv("SERVE_API_KEY", KEY)
    monkeypatch.setattr(sys, "argv", ["serve.py", "--host", "0.0.0.0", "--port", "0"])
    serve.main()
    out, err = capsys.readouterr()
    assert f"Serving {path}" in out and "Warning: listening on 0.0.0.0: anyone who can reach this machine" in err
    assert KEY not in out + err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(sys, "argv", ["serve.py", "--port", str(busy.getsockname()[1])])
        with pytest.raises(SystemExit):
            serve.main()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: cannot listen on 127.0.0.1:")


# ---- the chat page, in a real browser -------------------------------------------------------------

def test_the_chat_page_streams_an_answer_in_a_browser(server):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no chromium and chromedriver (Debian's chromium and chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(server["url"] + "/")
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[0])
        browser.find_element(By.ID, "send").click()
        alert = WebDriverWait(browser, 20).until(expected_conditions.alert_is_present())  # the key: asked once
        alert.send_keys(KEY)
        alert.accept()
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant")
                                         and b.find_element(By.ID, "send").is_enabled())
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == QUESTIONS[0]
        assert browser.find_element(By.ID, "error").text == ""
        assert len(browser.find_element(By.CSS_SELECTOR, ".assistant").text) > 0
    finally:
        browser.quit()


# ---- the last: SIGTERM ----------------------------------------------------------------------------

def test_sigterm_lets_the_answer_under_way_finish_and_exits_0(server):
    events = []
    with httpx.stream("POST", f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Question:", "max_tokens": 40, "temperature": 0, "stream": True}) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        server["process"].send_signal(signal.SIGTERM)
        events += [line for line in lines if line]  # (events end with a blank line)
    assert events[-1] == "data: [DONE]"
    assert any('"finish_reason": "' in event for event in events)
    out, err = server["process"].communicate(timeout=30)
    assert server["process"].returncode == 0, err[-2000:]
    assert out.strip().endswith("Stopped.")
