"""scripts/serve.py as a user runs it: a real server process on 127.0.0.1, spoken to with the official `openai` client.

Truth: the `openai` package parses every answer (its types, its streaming); each greedy answer equals litft's
one-prompt decoding (itself tested against transformers) of the same conversation with the same LoRA loaded the
ordinary way; answers to requests sent together equal their one-at-a-time answers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, assert_user_error, run_main, run_script
from test_batch_generate import LORAS, PROMPTS, base, runs  # noqa: F401 (fixtures)
from test_chat import parrot_checkpoint, smollm2_dir  # noqa: F401 (fixtures)
from test_merge_export import bases, make_run  # noqa: F401 (fixtures)

from litft.adapter import AdapterConfig
from litft.base_checkpoint import record_base
from litft.batch_generate import Row
from litft.conversation import encode_conversation
from litft.engine import Engine, Stopping
from litft.generate import generate, stop_token_ids
from litft.load_finetuned import load_finetuned
from litft.lora import LoRAConfig
from litft.multi_lora import add_loras
from litft.openai_api import APIError, Reply, Served, completion_text, create_app
from litft.prompts import resolve_style
from litft.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

QUESTIONS = ["Name a primary color.", "What is two plus two?", "Say hello.", "Name a fruit.", "Count to three.",
             "Which is larger, 3 or 7?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(base, runs):
    """scripts/serve.py on a free local port, serving the base and both LoRAs; stopped after the module."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts/serve.py"), "--checkpoint_dir", str(base), "--port", str(port),
           "--max_tokens", "16", *(f"--lora={name}={path}" for name, path in runs.items())]
    log = tempfile.TemporaryFile("w+")  # not a pipe: one nobody reads until the end could fill and block the server
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the server did not start:\n{read(log)[-3000:]}")
            time.sleep(0.3)
    yield client, port, proc
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not stop within 60 s of SIGTERM:\n{read(log)[-3000:]}") from None
    stderr = read(log)
    assert "Traceback" not in stderr, stderr  # every bad request below was answered, none crashed a handler


def read(log) -> str:
    log.seek(0)
    return log.read()


def expected_reply(base, runs, model: str, question: str, max_tokens: int) -> str:
    """litft's one-prompt greedy decoding of the same conversation, the LoRA loaded the ordinary way."""
    run_dir = runs[model].parent if model in runs else None
    style = resolve_style(None, *(d for d in (run_dir, base) if d is not None))
    tokenizer = Tokenizer(base)
    llm = load_finetuned(base, runs.get(model))
    ids = encode_conversation(tokenizer, style, [{"role": "user", "content": question}])
    return tokenizer.decode(list(generate(llm, ids, max_tokens, temperature=0,
                                          stop_ids=stop_token_ids(tokenizer, style))))


def ask(client, model: str, question: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=12, **kw)


def test_models_and_greedy_answers_of_each_lora(server, base, runs):
    client, _, _ = server
    assert {m.id for m in client.models.list().data} == {base.name, *runs}
    for model in (base.name, *runs):
        reply = ask(client, model, QUESTIONS[0])
        assert reply.choices[0].message.content == expected_reply(base, runs, model, QUESTIONS[0], 12), model
        assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
        streamed = ask(client, model, QUESTIONS[0], stream=True, stream_options={"include_usage": True})
        *chunks, last = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length" and last.usage == reply.usage
    texts = {ask(client, m, QUESTIONS[0]).choices[0].message.content for m in (base.name, *runs)}
    assert len(texts) == 3  # the LoRAs really change the answer


def test_requests_sent_together_equal_their_one_at_a_time_answers(server, base):
    client, _, _ = server
    jobs = [(model, q) for q in QUESTIONS for model in ("qv", "all", base.name)]
    alone = [ask(client, m, q).choices[0].message.content for m, q in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(client, *job).choices[0].message.content, jobs))
    assert together == alone


def test_completions_stop_strings_seed_and_max_tokens(server, base):
    client, _, _ = server
    free = client.completions.create(model=base.name, prompt="one two three", temperature=0, max_tokens=10)
    text = free.choices[0].text
    assert len(text) > 4 and free.usage.completion_tokens == 10
    stop = text[2:4]
    cut = client.completions.create(model=base.name, prompt="one two three", temperature=0, max_tokens=10, stop=stop)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=base.name, prompt="one two three", temperature=0, max_tokens=10,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    draws = [client.completions.create(model=base.name, prompt="one", temperature=1.0, max_tokens=8, seed=s)
             .choices[0].text for s in (7, 7, 8)]
    assert draws[0] == draws[1] != draws[2]  # a seed makes sampling reproducible (and matters)
    default = client.completions.create(model=base.name, prompt="one", temperature=0)
    assert default.usage.completion_tokens == 16  # the server's --max_tokens when a request sets none
    nucleus_of_one = client.completions.create(model=base.name, prompt="one", temperature=1.0, top_p=0)
    assert nucleus_of_one.choices[0].text == default.choices[0].text  # OpenAI's top_p 0: the most likely token
    one = client.completions.create(model=base.name, prompt="one two three", temperature=0, max_tokens=1)
    assert one.usage.completion_tokens == 1 and text.startswith(one.choices[0].text)  # the API's smallest reply


def test_a_seed_is_taken_exactly_where_torch_takes_it(server, base):
    """The seeds at the ends of the range torch.Generator.manual_seed accepts, and one past each: answered, or
    refused with a 400 naming seed, as torch accepts or refuses them (never a 500 from torch)."""
    _, port, _ = server
    for seed in (2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1):
        try:
            torch.Generator().manual_seed(seed)
            takes = True
        except (RuntimeError, ValueError):
            takes = False
        status, answer = post(port, "/v1/completions", json.dumps({"model": base.name, "prompt": "one",
                                                                    "max_tokens": 2, "seed": seed}))
        assert (status, "seed" in str(answer.get("error", {}).get("param"))) == ((200, False) if takes else (400, True))


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "qv"}, 400, "messages must be a non-empty list"),
    ({"model": "qv", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "qv", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "exceeds"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    ('{"model": "qv", "messages": [', 400, "not valid JSON"),
    ({"model": ["qv"], "messages": [{"role": "user", "content": "hi"}]}, 400, "model must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model must be a string"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 70}, 400, "seed"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens must be a positive integer"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "stream": "no"}, 400, "stream"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": 1}, 400,
     "stream_options"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "stream_options is only allowed when stream is true"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}, "stream": False},
     400, "stream_options is only allowed when stream is true"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "n must be 1"),
    # asked for what litft does not do: refused by name, not answered without it
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs is not"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools is not"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format is not"),
    ({"model": "qv", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
     "presence_penalty is not"),
    ('{"model": "qv", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "unpaired surrogate"),
    # JSON that Python's parser gives up on: deeper than its stack, an integer longer than it converts
    ("[" * 100000 + "]" * 100000, 400, "nested too deeply"),
    ('{"model": "qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}", 400,
     "an integer of more than 4300 digits"),
])
def test_bad_requests_get_a_json_error_and_the_server_goes_on(server, body, status, fragment):
    client, port, _ = server
    got_status, answer = post(port, "/v1/chat/completions", body if isinstance(body, str) else json.dumps(body))
    assert got_status == status and fragment in answer["error"]["message"], answer
    assert ask(client, "qv", "hi").choices[0].message.content  # still serving


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", {"model": "qv", "prompt": ""}, "prompt must be a non-empty string"),
    ("/v1/completions", {"model": "qv", "prompt": 5}, "prompt must be a non-empty string"),
    ("/v1/completions", {"model": "qv", "prompt": ["one", "two"]}, "several prompts, or token ids, are not"),
    ("/v1/completions", {"model": "qv", "prompt": [15, 16]}, "several prompts, or token ids, are not"),
    ("/v1/completions", {"model": "qv", "prompt": [15]}, "several prompts, or token ids, are not"),
    ("/v1/completions", {"model": "qv"}, "prompt must be a non-empty string"),
    ("/v1/chat/completions", '["model", "qv"]', "must be a JSON object"),
    ("/v1/completions", '"one two"', "must be a JSON object"),
])
def test_bad_completions_and_bodies_are_400(server, path, body, fragment):
    """OpenAI's status for a malformed request is 400 (its client raises BadRequestError; a 401 would read as a bad
    API key). One prompt may come as a list of one string, as OpenAI's API allows; more than one is refused."""
    client, port, _ = server
    got_status, answer = post(port, path, body if isinstance(body, str) else json.dumps(body))
    assert got_status == 400 and fragment in answer["error"]["message"], answer
    one = client.completions.create(model="qv", prompt=["one two three"], temperature=0, max_tokens=6)
    assert one.choices[0].text == client.completions.create(model="qv", prompt="one two three", temperature=0,
                                                            max_tokens=6).choices[0].text


def test_neutral_values_of_unsupported_parameters_and_nulls_are_accepted(server):
    """What clients send when they ask for nothing (logprobs false, penalties 0, stream null), and max_tokens beside
    a null max_completion_tokens, answer as the plain request does; an unknown path gets OpenAI's error shape."""
    client, port, _ = server
    plain = {"model": "qv", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 5, "temperature": 0}
    status, expected = post(port, "/v1/chat/completions", json.dumps(plain))
    neutral = {**plain, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
               "stream": None, "response_format": {"type": "text"}, "max_completion_tokens": None}
    status, got = post(port, "/v1/chat/completions", json.dumps(neutral))
    assert status == 200 and got["choices"][0]["message"] == expected["choices"][0]["message"]
    assert got["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"] == 5
    status, missing = post(port, "/v1/embeddings", "{}")
    assert status == 404 and "/v1/embeddings" in missing["error"]["message"]


@pytest.mark.parametrize("param, value", [
    ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", {"name": "f"}), ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("web_search_options", {}), ("verbosity", "low"), ("reasoning_effort", "high"),
    ("moderation", {"model": "omni-moderation-latest"}), ("logit_bias", {"5": 100}), ("top_logprobs", 2),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
])
def test_what_litft_cannot_honour_is_refused_by_name_to_the_openai_client(server, param, value):
    """Parameters of OpenAI's chat completions that would change the answer, set to ask for something: the official
    client raises BadRequestError (400) naming the parameter, rather than getting an answer made without it."""
    client, _, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "qv", "hi", **{param: value})
    assert refused.value.param == param and f"{param} is not supported" in refused.value.message


def test_tool_choice_without_tools_and_other_neutral_values_answer_as_the_plain_request(server):
    """OpenAI's spec: with no tools, tool_choice "none" (the default then) and "auto" both give a message, and
    parallel_tool_calls has no tool calls to apply to; modalities ["text"] and verbosity "medium" are the defaults;
    a prediction (Predicted Outputs) makes an answer faster, not different."""
    client, _, _ = server
    plain = ask(client, "qv", QUESTIONS[1]).choices[0].message.content
    for neutral in ({"tool_choice": "none", "parallel_tool_calls": False},
                    {"tool_choice": "auto", "parallel_tool_calls": True, "modalities": ["text"], "verbosity": "medium"},
                    {"prediction": {"type": "content", "content": plain}}):
        assert ask(client, "qv", QUESTIONS[1], **neutral).choices[0].message.content == plain, neutral


def test_retrieve_model_as_the_openai_client_does(server, base, runs):
    client, _, _ = server
    listed = {m.id: m for m in client.models.list().data}
    for name in (base.name, *runs):
        assert client.models.retrieve(name) == listed[name]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "model_not_found" and "'nope' does not exist" in missing.value.message


def test_token_limit_errors_name_what_the_request_sent(server, base):
    """The field named is the one the request used (max_completion_tokens, or its older name max_tokens); a prompt
    that fills the context alone says so, with OpenAI's code for it, and names no max_tokens the request did not
    send."""
    client, _, _ = server
    with pytest.raises(openai.BadRequestError) as zero:
        client.chat.completions.create(model="qv", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=0)
    assert zero.value.param == "max_completion_tokens" and "max_completion_tokens must be" in zero.value.message
    long = "word " * 80  # more tokens than the test model's context of 64
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="qv", messages=[{"role": "user", "content": long}])
    with pytest.raises(openai.BadRequestError) as text:
        client.completions.create(model=base.name, prompt=long)
    for error, param in ((chat, "messages"), (text, "prompt")):
        assert (error.value.param, error.value.code) == (param, "context_length_exceeded")
        assert "leaves no room for a reply" in error.value.message and "max_tokens" not in error.value.message


def test_a_client_that_leaves_mid_stream_does_not_stop_the_others(server):
    client, port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "all", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # gone mid-stream
    assert ask(client, "all", QUESTIONS[1]).choices[0].message.content


def post(port: int, path: str, body: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def serve_queued(engine: Engine, rows: list[Row]) -> list[tuple[list[int], object]]:
    """Queue `rows` on an engine not yet started (so that they wait together), start it, and return each row's
    tokens and the event that ended them; the engine is stopped after."""
    async def serve() -> list[tuple[list[int], object]]:
        queues = [engine.submit(row) for row in rows]
        engine.start()
        out = []
        for q in queues:
            tokens = []
            while isinstance(event := await asyncio.wait_for(q.get(), 60), int):
                tokens.append(event)
            out.append((tokens, event))
        return out

    try:
        return asyncio.run(serve())
    finally:
        engine.stop()


def test_requests_waiting_together_are_decoded_in_one_batch(base, runs):
    """The engine in-process: four requests queued at once are decoded as one batch of four."""
    model = add_loras(load_finetuned(base), runs)
    engine = Engine(model, max_batch_size=8)
    names = ["qv", None, "all", "qv"]
    served = serve_queued(engine, [Row(torch.tensor(p), 6, lora=n) for p, n in zip(PROMPTS, names)])
    assert [end for _, end in served] == ["length"] * 4
    assert engine.largest_batch == 4
    for p, n, (tokens, _) in zip(PROMPTS, names, served):
        assert tokens == list(generate(load_finetuned(base, runs[n] if n else None), torch.tensor(p), 6,
                                       temperature=0)), n


def test_a_client_that_leaves_takes_its_row_out_of_the_batch(base):
    """The server's text stream closed after two pieces (as Starlette closes it when the client goes away): the
    engine takes the row out at its next step and reports it cancelled, long before max_tokens."""
    engine = Engine(load_finetuned(base), max_batch_size=4)
    engine.start()

    async def leave_early() -> list:
        row = Row(torch.tensor(PROMPTS[2]), 50)
        events = engine.submit(row)
        pieces = completion_text(events, row, Tokenizer(base), [])
        got = [await anext(pieces), await anext(pieces)]
        await pieces.aclose()
        assert row.done
        later = []
        while not isinstance(event := await asyncio.wait_for(events.get(), 60), str):
            later.append(event)
        return got, later, event

    got, later, final = asyncio.run(leave_early())
    engine.stop()
    assert final == "cancelled" and len(later) < 48  # not "length": the row left before its 50 tokens


def request_then_leave(base, body: dict, send) -> tuple[str, int]:
    """POST `body` to /v1/completions of an app in this process, as uvicorn would (ASGI spec 2.3), from a client
    that is gone from the request's second `receive` on; `send` gets what the app answers. Returns the row's last
    engine event and how many tokens it got before it."""
    model = load_finetuned(base)
    engine, queues = Engine(model, max_batch_size=4), []
    submit = engine.submit
    engine.submit = lambda row: queues.append(submit(row)) or queues[-1]  # the test's view of the row's events
    app = create_app(engine, Tokenizer(base), {"base": Served("base", None, None, frozenset())},
                     model.config.block_size)
    received = []

    async def receive() -> dict:
        received.append(1)
        if len(received) == 1:
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        return {"type": "http.disconnect"}

    async def request() -> tuple[str, int]:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        await asyncio.wait_for(app(scope, receive, send), 20)  # a server that does not watch waits here forever
        engine.start()  # only now: the row was queued while the client left
        tokens = 0
        while not isinstance(event := await asyncio.wait_for(queues[0].get(), 60), str):
            tokens += 1
        return event, tokens

    try:
        return asyncio.run(request())
    finally:
        engine.stop()


def test_a_client_that_leaves_before_a_whole_answer_takes_its_row_out(base):
    """Without streaming, the server watches the connection while the answer is decoded. Here the client closes it
    right after sending the request (the http.disconnect message uvicorn gives from then on), before the engine
    starts: the server answers nobody (499) and the row ends "cancelled" at its first step, not after max_tokens."""
    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    final, tokens = request_then_leave(base, {"model": "base", "prompt": "one two three", "max_tokens": 40}, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert final == "cancelled" and tokens <= 1, (final, tokens)


def test_a_stream_whose_client_leaves_before_its_first_chunk_takes_its_row_out(base):
    """Starlette cancels a stream when the client disconnects, here before its first chunk: its text generator never
    started, so nothing inside it can free the row; the response's background task does, and the row ends
    "cancelled" at its first step, not after max_tokens."""

    async def send(message: dict) -> None:
        await asyncio.sleep(0.05)  # the disconnect is heard while the response starts

    body = {"model": "base", "prompt": "one two three", "max_tokens": 40, "stream": True}
    final, tokens = request_then_leave(base, body, send)
    assert final == "cancelled" and tokens <= 1, (final, tokens)


def test_a_plain_chat_answer_ends_where_the_model_starts_the_users_next_line(parrot_checkpoint):
    """A base served without a chat format (plain) has no end-of-turn token: a chat answer ends at "\nUser:", as
    generate/chat.py's does, streamed or not; a completion (text, not turns) goes on. The parrot model writes
    " Red.\nUser: Red.\nUser: ..." (test_chat.py)."""
    from fastapi.testclient import TestClient

    model = load_finetuned(parrot_checkpoint)
    engine = Engine(model, max_batch_size=2)
    app = create_app(engine, Tokenizer(parrot_checkpoint), {"base": Served("base", None, None, frozenset())},
                     model.config.block_size)
    ask = {"model": "base", "temperature": 0, "max_tokens": 12}
    engine.start()
    try:
        with TestClient(app) as client:
            text = client.post("/v1/completions", json={**ask, "prompt": "Say:"}).json()["choices"][0]["text"]
            chat = client.post("/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": "Say:"}]})
            streamed = client.post("/v1/chat/completions", json={**ask, "stream": True,
                                                                 "messages": [{"role": "user", "content": "Say:"}]})
    finally:
        engine.stop()
    assert text.count("\nUser:") > 1, text
    choice = chat.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (text[:text.find("\nUser:")], "stop")
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]


def test_a_stopping_server_answers_503_and_a_second_signal_stops_it_at_once(base):
    """After Ctrl-C the batch being decoded finishes; a request that comes meanwhile gets 503 at once (OpenAI's
    clients retry those), one that was already waiting is told the same, and a second Ctrl-C ends the process."""
    from fastapi.testclient import TestClient

    from scripts.serve import stop

    model = load_finetuned(base)
    engine = Engine(model, max_batch_size=4)
    app = create_app(engine, Tokenizer(base), {"base": Served("base", None, None, frozenset())},
                     model.config.block_size)

    async def waiting_then_stopped():
        events = engine.submit(Row(torch.tensor(PROMPTS[0]), 5))  # queued; the loop has not taken it yet
        stop(engine)
        engine.run()  # ends at once: nothing was being decoded, and what waits is told
        return await asyncio.wait_for(events.get(), 10)

    told = asyncio.run(waiting_then_stopped())
    assert "the server is stopping" in str(told)
    answer = TestClient(app).post("/v1/completions", json={"model": "base", "prompt": "one two", "max_tokens": 3})
    assert answer.status_code == 503 and "the server is stopping" in answer.json()["error"]["message"]
    with pytest.raises(KeyboardInterrupt):
        stop(engine)


@pytest.mark.parametrize("failure, status", [(Stopping(), 503), (RuntimeError("out of memory"), 500)],
                         ids=["queued-when-the-server-stopped", "the-engine-failed"])
def test_a_reply_that_cannot_finish_is_a_server_error_in_openais_shape(failure, status):
    """A non-streamed reply whose engine rows end in an exception: 503 Service Unavailable for a server that is
    stopping (RFC 9110 §15.6.4: temporary; OpenAI's clients retry it), 500 for a failed generation; both with
    OpenAI's error object of type "server_error" (4xx statuses are "invalid_request_error")."""
    async def pieces():
        raise failure
        yield  # an async generator

    with pytest.raises(APIError) as e:
        asyncio.run(Reply("base", chat=False, prompt_tokens=3).whole(pieces()))
    body = json.loads(e.value.response().body)
    assert e.value.response().status_code == status and body["error"]["type"] == "server_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_an_address_in_use_is_refused_in_one_line(base):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_script("scripts/serve.py", "--checkpoint_dir", base, "--port", str(taken.getsockname()[1]),
                          timeout=120)
    assert_user_error(proc, "cannot listen on 127.0.0.1:", "pass another --port")


def test_an_ipv6_host_is_checked_as_ipv6():
    from scripts.serve import check_address

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    check_address("::1", port)  # an IPv4 socket was tried before: "Address family for hostname not supported"


def test_an_empty_host_is_every_interface_as_uvicorn_takes_it():
    from scripts.serve import address, check_address

    check_address("", free_port())
    assert address("", 8000) == "0.0.0.0:8000" and address("::1", 8000) == "[::1]:8000"


@pytest.mark.parametrize("lora, quantize, fragment", [
    (LoRAConfig(r=2, targets=["q", "embed"]), [], "adapts the embedding or adds tokens"),
    (LoRAConfig(r=2, targets=["q"], quantize="nf4"), [], "serve the base with --quantize nf4"),
    (LoRAConfig(r=2, targets=["q"], quantize="nf4"), ["--quantize", "nf4-dq"], "serve the base with --quantize nf4"),
])
def test_a_lora_that_cannot_be_served_is_refused_before_the_base_loads(base, tmp_path, monkeypatch, lora, quantize,
                                                                       fragment):
    """howto/serve.md: at start-up, before the model is loaded (minutes for a 7B base), one line."""
    import litft.load_finetuned

    def load_finetuned(*args, **kwargs):
        raise AssertionError("the base was loaded before the LoRAs were checked")

    monkeypatch.setattr(litft.load_finetuned, "load_finetuned", load_finetuned)
    make_run(base, tmp_path / "run", lora)
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", f"x={tmp_path / 'run'}", *quantize)
    assert_user_error(proc, "LoRA 'x'", fragment)


def test_a_lora_of_another_base_is_refused_at_start_up(base, bases, tmp_path):
    make_run(bases[True], tmp_path / "other", LoRAConfig(r=2, targets=["q"]))  # same shapes, other weights
    record_base(tmp_path / "other", bases[True])
    lora = f"x={tmp_path / 'other'}"  # the run's directory: its lit_model_lora.pth
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", lora)
    assert_user_error(proc, "--lora x", "was trained on", "fingerprints differ")
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", "no-equals-sign")
    assert_user_error(proc, "is not NAME=PATH")
    AdapterConfig().save(tmp_path / "adapter_run")
    (tmp_path / "adapter_run" / "lit_model_adapter.pth").touch()
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", f"a={tmp_path / 'adapter_run'}")
    assert_user_error(proc, "lit_model_adapter.pth is from an adapter run, not a LoRA run")
    missing = tmp_path / "none" / "lit_model_lora.pth"
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", f"m={missing}")
    assert_user_error(proc, f"--lora m: {missing} does not exist; pass the run's directory or its lit_model_lora.pth")
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--lora", f"e={tmp_path}")  # a folder of no run
    assert_user_error(proc, f"--lora e: {tmp_path} is no LoRA run's weights file")


def test_a_negative_min_shared_is_refused_in_one_line(base):
    proc = run_main("scripts/serve.py", "--checkpoint_dir", base, "--min_shared", "-1")
    assert_user_error(proc, "--min_shared must be at least 0, got -1")
