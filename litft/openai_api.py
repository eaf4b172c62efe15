"""The OpenAI HTTP API over litft's engine, so that any OpenAI client can talk to a fine-tune.

    GET  /v1/models               the base model and every LoRA, by name
    GET  /v1/models/{model}       one of them (404 for another name)
    POST /v1/chat/completions     {"model", "messages", ...}: the reply to a conversation, in the model's chat format
    POST /v1/completions          {"model", "prompt", ...}: the continuation of a text, as given

Both POSTs take `max_tokens`, `temperature` (0: greedy), `top_p`, `stop` (strings that end the text, not included),
`seed` and `stream`. With `"stream": true` the answer comes as server-sent events, one `data: {json}` chunk per
piece of text and `data: [DONE]` at the end; otherwise as one JSON object with `usage` (token counts). `model`
names the base (the checkpoint folder's name) or a LoRA given to scripts/serve.py; requests naming different
LoRAs are decoded in the same batch (litft/engine.py, litft/multi_lora.py).

A bad request gets a 4xx status and OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`,
and the server goes on serving the others. A client that disconnects, streaming or not, takes its row out of the
batch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from litft.batch_generate import Row
from litft.conversation import encode_conversation, turn_stops
from litft.engine import Engine, Stopping
from litft.errors import UserError
from litft.prompts import PromptStyle
from litft.stop_strings import StopStrings
from litft.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Served:
    """A name the server answers to: the base model (lora None) or one LoRA over it."""

    name: str
    lora: str | None
    style: PromptStyle | None  # how chat messages are laid out for it
    stop_ids: frozenset[int]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def create_app(engine: Engine, tokenizer: Tokenizer, models: dict[str, Served], block_size: int,
               default_max_tokens: int = 512) -> FastAPI:
    app = FastAPI(title="litft")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)  # an unknown path or method: OpenAI's error shape too
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    created = int(time.time())

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(name, created) for name in models]}

    @app.get("/v1/models/{name:path}")  # a LoRA's name may hold a slash
    async def retrieve_model(name: str) -> dict:
        return model_card(find_model({"model": name}, models).name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        served = find_model(body, models)
        with as_api_error("messages"):
            ids = encode_conversation(tokenizer, served.style, body.get("messages"))
        return await answer(request, body, served, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        served = find_model(body, models)
        return await answer(request, body, served, tokenizer.encode(text_prompt(body)), chat=False)

    async def answer(request: Request, body: dict, served: Served, ids: torch.Tensor, chat: bool):
        param = "messages" if chat else "prompt"  # the field an error about the prompt names
        row, stops = make_row(body, served, ids.to(engine.device), block_size, default_max_tokens, param)
        stream, usage = streaming(body)
        with as_api_error(param):
            events = engine.submit(row)
        pieces = completion_text(events, row, tokenizer, stops + (turn_stops(served.style) if chat else []))
        reply = Reply(served.name, chat, len(ids))
        if stream:  # the row leaves the batch after the stream, even one cancelled before its first chunk
            return StreamingResponse(reply.events(pieces, usage), media_type="text/event-stream",
                                     background=BackgroundTask(setattr, row, "done", True))
        return await unless_client_leaves(request, reply.whole(pieces))

    return app


async def unless_client_leaves(request: Request, answer: Awaitable[JSONResponse], poll: float = 0.25) -> Response:
    """The whole answer, or, if the client disconnects first, an empty response nobody reads: `answer` is
    cancelled, which closes its text (completion_text) and so takes the row out of the batch at the next step."""
    task = asyncio.ensure_future(answer)
    while not (await asyncio.wait({task}, timeout=poll))[0]:  # (done, pending): not done yet
        if await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; the client is gone
    return task.result()


def model_card(name: str, created: int) -> dict:
    """A model object as OpenAI's "List models" and "Retrieve model" give it."""
    return {"id": name, "object": "model", "created": created, "owned_by": "litft"}


async def read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # deeper than Python's stack: json.loads recurses once per level
        raise APIError(400, "the request body is not valid JSON this server can read (nested too deeply)") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise APIError(400, "the request body is not valid JSON this server can read (an integer of more than "
                       f"{sys.get_int_max_str_digits()} digits)") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:  # JSON can spell a lone surrogate ("\\ud800"), which is not text and no tokenizer can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the request holds an unpaired surrogate ({e.object[e.start]!a}), which is not "
                       "valid Unicode text") from None
    return body


def text_prompt(body: dict) -> str:
    """A completion's prompt: a string, or a list of one string (OpenAI's API takes a list; litft answers one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt:
        raise APIError(400, "prompt must be one string: several prompts, or token ids, are not supported; send one "
                       "request per prompt", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string", "prompt")
    return prompt


def find_model(body: dict, models: dict[str, Served]) -> Served:
    name = body.get("model")
    if not isinstance(name, str):
        raise APIError(400, f"model must be a string naming one of {', '.join(models)}", "model")
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist; choose one of {', '.join(models)} (GET /v1/models)",
                       "model", "model_not_found")
    return models[name]


@contextmanager
def as_api_error(param: str) -> Iterator[None]:
    """A UserError raised inside the block becomes a 400 naming `param`; a server that is stopping, a 503."""
    try:
        yield
    except UserError as e:
        raise APIError(400, str(e), param) from None
    except Stopping as e:
        raise APIError(503, str(e)) from None


UNSUPPORTED = {  # parameters litft does not implement, and the values that ask for nothing from it
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    # with no tools (refused above), "none" and "auto" both mean a plain message, and parallel calls mean nothing
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "modalities": (None, ["text"]), "audio": (None,), "web_search_options": (None,), "moderation": (None,),
    "verbosity": (None, "medium"), "reasoning_effort": (None, "none"),
}


def refuse_unsupported(body: dict) -> None:
    """A request that asks for something litft does not do gets a 400 naming it, not an answer without it."""
    for key, neutral in UNSUPPORTED.items():
        value = body.get(key)
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise APIError(400, f"{key} is not supported by this server; leave it out", key)


def make_row(body: dict, served: Served, ids: torch.Tensor, block_size: int, default_max_tokens: int,
             prompt_param: str) -> tuple[Row, list[str]]:
    """The request's sampling settings, checked, as a row for the engine; and its stop strings."""
    refuse_unsupported(body)
    temperature = number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = number(body, "top_p", 1.0, low=0.0, high=1.0)
    if not (body.get("n") is None or (type(body["n"]) is int and body["n"] == 1)):
        raise APIError(400, "n must be 1: litft returns one choice per request", "n")
    max_tokens = reply_length(body, len(ids), block_size, default_max_tokens, prompt_param)
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not -2 ** 63 <= seed < 2 ** 64):
        raise APIError(400, f"seed must be an integer in [-2^63, 2^64), got {seed!r}", "seed")
    generator = torch.Generator(ids.device).manual_seed(seed if seed is not None else secrets.randbits(63))
    row = Row(ids, max_tokens, temperature, None, top_p, served.stop_ids, generator, served.lora)
    return row, stop_strings(body.get("stop"))


def reply_length(body: dict, prompt_tokens: int, block_size: int, default: int, prompt_param: str) -> int:
    """The most tokens the reply may have: max_completion_tokens, else max_tokens (its older name), else as many as
    the context leaves, up to `default`."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        if prompt_tokens >= block_size:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) leaves no room for a reply in the model's "
                           f"context ({block_size} tokens); shorten it", prompt_param, "context_length_exceeded")
        return min(default, block_size - prompt_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise APIError(400, f"{key} must be a positive integer, got {max_tokens!r}", key)
    if prompt_tokens + max_tokens > block_size:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus {key} ({max_tokens}) exceeds the model's "
                       f"context ({block_size} tokens); shorten the prompt or lower {key}", key)
    return max_tokens


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def stop_strings(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from `stream` and `stream_options`."""
    stream, options = body.get("stream"), body.get("stream_options") or {}
    stream = False if stream is None else stream
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be true or false, and stream_options an object", "stream")
    if body.get("stream_options") is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    return stream, bool(options.get("include_usage", False))


async def completion_text(events, row: Row, tokenizer: Tokenizer,
                          stops: list[str]) -> AsyncIterator[tuple[str, str | None, int]]:
    """The engine's tokens as text: yields (new text, finish reason or None, tokens so far). Text that may begin
    a stop string is held back (litft/stop_strings.py); at a stop string the text ends before it, and the row is
    taken out of the batch."""
    decoder, text, finish = StreamDecoder(tokenizer), StopStrings(stops), None
    try:
        while finish is None:
            event = await events.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, str):  # "stop" (a stop token), "length" (max_tokens) or "cancelled"
                finish = {"stop": "stop", "length": "length"}.get(event, "cancelled")
                new = text.add(decoder.flush(), final=True)
            else:
                new = text.add(decoder.step(event))
            finish = "stop" if text.stopped else finish
            if new or finish:
                yield new, finish, len(decoder.ids)
    finally:
        row.done = True  # finished, a stop string, or a client that went away: the row leaves the batch


@dataclass
class Reply:
    """An answer in OpenAI's shapes: one JSON object, or a stream of chunks."""

    model: str
    chat: bool
    prompt_tokens: int

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    async def whole(self, pieces: AsyncIterator) -> JSONResponse:
        text, finish, n = "", None, 0
        try:
            async with aclosing(pieces):
                async for piece, finish, n in pieces:
                    text += piece
        except Stopping as e:  # it came while the server was stopping
            raise APIError(503, str(e)) from None
        except Exception as e:  # noqa: BLE001 (the engine failed on this batch)
            raise APIError(500, f"generation failed: {e}") from None
        message = {"role": "assistant", "content": text}
        choice = {"message": message} if self.chat else {"text": text, "logprobs": None}
        return JSONResponse({**self.head(chunk=False), "choices": [{"index": 0, **choice, "finish_reason": finish}],
                             "usage": self.usage(n)})

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def events(self, pieces: AsyncIterator, usage: bool) -> AsyncIterator[str]:
        """Chunks of text; with `usage` (stream_options.include_usage), a last chunk with the token counts."""
        try:
            async with aclosing(pieces):  # a client that leaves closes `pieces` now, which takes its row out
                if self.chat:
                    yield self.chunk({"role": "assistant", "content": ""}, None)
                async for piece, finish, n in pieces:
                    if piece or finish:
                        yield self.chunk({"content": piece} if piece else {}, finish)
            if usage:
                yield f"data: {json.dumps({**self.head(chunk=True), 'choices': [], 'usage': self.usage(n)})}\n\n"
        except Exception as e:  # noqa: BLE001 (the stream has begun: the error is its last event)
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    def head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict, finish: str | None) -> str:
        choice = {"delta": delta} if self.chat else {"text": delta.get("content", ""), "logprobs": None}
        data = {**self.head(chunk=True), "choices": [{"index": 0, **choice, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"
