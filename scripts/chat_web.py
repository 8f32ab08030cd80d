"""Stage chat-web: the chat page and an OpenAI-compatible API in front of a chat checkpoint.

    python -m scripts.chat_web                          # newest checkpoint (auto source), :8000
    python -m scripts.chat_web --source=sft --port=8080
    python -m scripts.chat_web --host=0.0.0.0 --workers=2 --queue=32
    NANOCHAT_API_KEY=secret python -m scripts.chat_web  # /v1/* then needs the key
    make chat-web SOURCE=sft                            # the same through the front door

Endpoints (127.0.0.1 only unless ``--host`` says otherwise):

- ``GET /``: the chat page (``nanochat/serve/index.html``, one self-contained file). With an API
  key, open ``http://HOST:PORT/?key=KEY``: the page keeps the key for the tab and sends it.
- ``POST /v1/chat/completions``: OpenAI Chat Completions, plain JSON or streamed as
  server-sent events (``stream: true``; ``stream_options.include_usage`` adds a usage chunk).
  Fields: ``messages`` (system/user/assistant, content a string or a list of text parts),
  ``temperature`` 0-2, ``top_p`` (0, 1], ``top_k`` 0-200 (extension; 0 = off),
  ``max_tokens`` (or ``max_completion_tokens``) 1..``--max-tokens-limit`` per choice,
  ``n`` 1-8 choices (generated one after another on the request's worker, each with its own
  ``index``, streamed too), ``stop`` (a string or up to 4: the reply ends before the first
  one, which is never sent, with finish_reason "stop"; matched in the reply's text, not
  inside calculator calls), ``seed`` (a signed 64-bit integer; choice i uses seed + i), and
  ``model``, echoed in the answer (the served id when absent). Fields this server cannot
  honour are refused with a 400 naming them when they ask for something (``logprobs``,
  ``top_logprobs``, ``tools``, ``tool_choice``/``function_call`` other than none/auto,
  ``functions``, ``response_format`` other than text, ``logit_bias``, non-zero
  ``frequency_penalty``/``presence_penalty``, audio); any other field is ignored.
- ``GET /v1/models``: the one model served, ``nanochat-<source>-<tag>``.
- ``GET /health``: status, model, workers, busy workers, queue depth (never needs the key).

Limits (DESIGN B.8, upstream's numbers): 1-500 messages, 8,000 characters per message, 32,000
in all, the last message from the user. A conversation longer than the model's context loses
its oldest turns (the system message and the last user message stay) until the prompt leaves
room for the reply (``max_tokens``, at most half the context); when even that does not fit the
request is refused with 400. Errors are OpenAI-shaped JSON, whatever refuses the request:
``{"error": {"message", "type", "param", "code"}}``.

Guards (``nanochat/serve/http_guard.py``), so that neither a web page nor a slow client can misuse
the server:

- Bodies: at most 1 MiB, read piece by piece (413 as soon as the limit is passed, chunked or
  not); JSON nested deeper than 64 levels, NaN/Infinity and numbers out of range (``seed``
  beyond 64 bits, ``n``, ``max_tokens`` ...) are a 400 naming the problem.
- Other sites: POSTs to ``/v1/*`` must be ``Content-Type: application/json`` (415), and API
  requests a browser sends from another site's page (``Origin`` not this server's,
  ``Sec-Fetch-Site: cross-site``) get 403; the server's own page is same-origin. On a loopback
  ``--host`` (the default) the ``Host`` header must be a loopback name (localhost, 127.0.0.1,
  [::1], any port; ``--allowed-hosts`` adds names), else 403: a page cannot reach the
  server through a DNS name of its own (DNS rebinding). These checks keep pages out, not
  programs: on a shared network, set ``NANOCHAT_API_KEY``.
- Slow clients: a request's headers must arrive within 10 s of the connection opening (or
  of the previous answer), its body within 15 s after them; else 408 and the connection is
  closed (slowloris). An idle keep-alive connection closes after 5 s (uvicorn's default).

Workers: one engine per GPU (``--workers`` more or fewer, round-robin over the GPUs), or
``--workers`` engines on CPU sharing one copy of the weights (default 1). Each request borrows
a worker for its whole generation; at most ``--queue`` requests wait for one (first come,
first served) and the next gets 429 with ``Retry-After``. Generation runs in a thread, never on
the event loop, and hands every piece to the stream as soon as it exists
(``loop.call_soon_threadsafe`` into an ``asyncio.Queue``). A client that disconnects stops
its generation at the next token, which frees the worker; one that leaves while waiting
gives up its place in the queue.

Tool calls: the engine reports the python expression the model writes and the calculator's
output as separate events. In ``content`` they appear inline and readable
(``\\n```python\\n2+3\\n```\\n= 5\\n``), so any client shows them; each such delta also carries
``nanochat_tool: {"type": "python" | "python_output", "text": ...}`` (extension) and the
non-streamed message ``nanochat_parts``, which the page renders distinctly and sends back as
assistant content parts of those types (accepted here as an extension).
Text is streamed only in whole UTF-8 characters (the engine's ``stream_events`` guarantees it).

One log line per request (method, path, status, prompt+completion tokens, milliseconds);
never the conversation's text.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import nanochat
from nanochat.common import (
    CliParser,
    UsageError,
    base_dir,
    die,
    log,
    non_negative_int,
    one_line,
    positive_int,
    run_main,
)
from nanochat.inference.engine import Engine, load_chat_model
from nanochat.serve.http_guard import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    TIMED_OUT,
    BodyTooLarge,
    SiteGuard,
    is_loopback,
    json_depth,
    openai_error,
    read_limited,
    slow_client_protocol,
)

SOURCES = ("auto", "base", "mid", "sft", "rl")
API_KEY_ENV = "NANOCHAT_API_KEY"
PAGE = Path(nanochat.__file__).parent / "serve" / "index.html"  # shipped inside the package

# Request limits: upstream's server used these numbers (DESIGN B.8).
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TOP_K = 200
DEFAULT_MAX_TOKENS_LIMIT = 4_096
# JSON escapes can take 6 bytes per character (\uXXXX): 32,000 characters fit with room.
MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 64  # a chat request nests 4 deep; json.loads recurses about 1000 at most
MAX_CHOICES = 8  # n: each choice is a whole generation on the request's worker
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_MODEL_CHARS = 256  # `model` is echoed in every chunk of a stream
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI documents it
# A temperature this small is greedy sampling in all but name, and a far smaller one (1e-40)
# divides float32 logits into infinities, which torch cannot sample: below it, argmax.
MIN_TEMPERATURE = 1e-4
DEFAULT_QUEUE = 16
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer "system"
ASSISTANT_PART_TYPES = ("text", "python", "python_output")  # python*: our extension
TOOL_PART = {"python": "python", "output": "python_output"}  # engine event -> part type


# --- arguments ------------------------------------------------------------------------------


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {text!r}")
    return port


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.chat_web",
        description="Serve the chat page and an OpenAI-compatible API (stage chat-web).",
        epilog=f"Slow clients are cut off: a request's headers must arrive within "
        f"{HEADER_TIMEOUT_S:g} s of connecting (or of the previous answer) and its body "
        f"within {BODY_TIMEOUT_S:g} s more, else HTTP 408 and the connection closes; bodies "
        f"over {MAX_BODY_BYTES} bytes get 413 as soon as they pass that. Set "
        f"${API_KEY_ENV} to require 'Authorization: Bearer <key>' on /v1/*.",
    )
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="which training stage's checkpoints: base, mid, sft, rl, or auto = the most "
        "trained one that exists (default: auto)",
    )
    ckpt.add_argument("--tag", help="run folder, e.g. d20 (default: the newest)")
    ckpt.add_argument(
        "--step", type=non_negative_int, help="training step (default: the latest complete)"
    )
    net = parser.add_argument_group("server")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every "
        "interface)",
    )
    net.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000)")
    net.add_argument(
        "--allowed-hosts",
        type=host_list,
        help="comma-separated names besides localhost, 127.0.0.1 and [::1] (always accepted) "
        "that the Host header of a request may carry, any port, e.g. chat.example.org behind "
        "a reverse proxy that keeps the Host; * = any. Requests to other names get HTTP 403, "
        "so that no web page reaches the server through a DNS name of its own (DNS "
        "rebinding). Default: none when --host is a loopback address, any otherwise",
    )
    net.add_argument(
        "--workers",
        type=positive_int,
        help="model replicas serving requests at the same time (default: one per GPU, "
        "1 on CPU; CPU replicas share one copy of the weights)",
    )
    net.add_argument(
        "--queue",
        type=non_negative_int,
        default=DEFAULT_QUEUE,
        help="requests that may wait for a free worker; the next one gets HTTP 429 "
        f"(default: {DEFAULT_QUEUE})",
    )
    net.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        help="largest max_tokens a request may ask for, in tokens; replies are also cut "
        f"at the model's context (default: {DEFAULT_MAX_TOKENS_LIMIT})",
    )
    return parser


def host_list(text: str) -> tuple[str, ...]:
    """argparse type for --allowed-hosts: the names (("*",) for any)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected host names separated by commas, or *")
    return ("*",) if "*" in names else names


# --- errors and the request schema ----------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        return openai_error(self.message, self.kind, self.param, self.code)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we read; UNSUPPORTED ones are checked before; anything else is ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])


def _off_or(*values):
    """An UNSUPPORTED test: the field asks for something unless it is one of ``values``."""
    return lambda value: value not in values


# OpenAI fields this server can not honour: refused (400 naming the field) when they ask for
# something. Clients that send them with their "off" value (null, false, 0, [], "none",
# {"type": "text"}) are served as if they had left them out.
UNSUPPORTED: dict[str, Any] = {
    "logprobs": bool,
    "top_logprobs": bool,
    "tools": bool,
    "functions": bool,
    "tool_choice": _off_or(None, "none", "auto"),
    "function_call": _off_or(None, "none", "auto"),
    "response_format": _off_or(None, {"type": "text"}),
    "logit_bias": bool,
    "frequency_penalty": _off_or(None, 0),
    "presence_penalty": _off_or(None, 0),
    "modalities": _off_or(None, ["text"]),
    "audio": _off_or(None),
}


def _param_name(loc: tuple) -> str:
    """pydantic's ('messages', 3, 'content') as OpenAI's 'messages[3].content'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[ContentPart]") or "[" in str(part):
            continue  # the union branch pydantic tried, not a field
        else:
            name += f".{part}" if name else str(part)
    return name


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a ChatRequest; ApiError(400) with the first problem otherwise."""
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:  # UTF-8 only (RFC 8259): json.loads(bytes) would also take UTF-16, whose bytes
        text = body.decode("utf-8")  # hide brackets from the depth scan
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 JSON: {one_line(exc)}") from None
    if json_depth(body) > MAX_JSON_DEPTH:  # before json.loads recurses into it
        raise ApiError(
            400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
        )
    try:
        data = json.loads(text, parse_constant=_no_constant)  # NaN, Infinity
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name, asks in UNSUPPORTED.items():
        if data.get(name) is not None and asks(data[name]):
            raise ApiError(
                400,
                f"{name} is not supported by this server (leave it out)",
                name,
                "unsupported_parameter",
            )
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_name(tuple(first.get("loc", ())))
        raise ApiError(400, f"{param}: {first.get('msg')}", param, "invalid_value") from None


@dataclass
class Options:
    """Sampling settings for one request, checked and resolved."""

    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int | None  # per choice; None: as long as the context allows (up to the limit)
    seed: int
    stream: bool
    include_usage: bool
    n: int = 1
    stop: tuple[str, ...] = ()

    def choice_seed(self, index: int) -> int:
        """Choice ``index``'s seed, in torch's range: choice 0 samples as n=1 would."""
        return (self.seed + index) % 2**64


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (an empty one would end every reply at once,
    so it is dropped); ApiError when there are too many or one is too long."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    for i, text in enumerate(stops):
        if len(text) > MAX_STOP_CHARS:
            raise ApiError(
                400, f"stop[{i}] has {len(text)} characters: at most {MAX_STOP_CHARS}", "stop"
            )
    return tuple(text for text in stops if text)


def check_options(request: ChatRequest, max_tokens_limit: int) -> Options:
    max_tokens = request.max_tokens or request.max_completion_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        param = "max_tokens" if request.max_tokens else "max_completion_tokens"
        raise ApiError(
            400, f"{param}={max_tokens} is over this server's limit of {max_tokens_limit}", param
        )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    return Options(
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_k=request.top_k or None,  # 0 = off
        top_p=None if request.top_p in (None, 1) else request.top_p,
        max_tokens=max_tokens,
        # Without a seed every request samples afresh (so "regenerate" gives a new reply).
        seed=secrets.randbits(31) if request.seed is None else request.seed,
        stream=bool(request.stream),
        include_usage=include_usage,
        n=request.n or 1,
        stop=stop_sequences(request.stop),
    )


def _content_parts(message: Message, index: int) -> list[tuple[str, str]]:
    """A message's content as (part type, text) pairs, checked."""
    content = message.content
    if content is None:
        if message.role == "assistant":  # OpenAI allows null content next to tool_calls
            return []
        raise ApiError(400, f"messages[{index}].content is missing", f"messages[{index}].content")
    if isinstance(content, str):
        return [("text", content)]
    allowed = ASSISTANT_PART_TYPES if message.role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        param = f"messages[{index}].content[{j}]"
        if part.type not in allowed:
            raise ApiError(
                400,
                f"{param}: content part type {part.type!r} is not supported for a "
                f"{message.role} message (supported: {', '.join(allowed)})",
                param,
            )
        if part.text is None:
            raise ApiError(400, f"{param}: a {part.type} part needs a string 'text'", param)
        parts.append((part.type, part.text))
    return parts


def conversation(messages: list[Message]) -> tuple[str | None, list[dict]]:
    """Check the messages; return (system prompt, turns) in the tokenizer's format.

    System (and developer) messages are joined into one system prompt; consecutive messages
    of one role are merged; assistant messages before the first user message are dropped (the
    chat format starts with the user). The turns alternate user/assistant and end with user.
    """
    if not messages:
        raise ApiError(400, "messages must not be empty", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(
            400, f"{len(messages)} messages: at most {MAX_MESSAGES} are allowed", "messages"
        )
    total = 0
    system: list[str] = []
    turns: list[dict] = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {message.role!r} is not supported "
                "(use system, user or assistant)",
                f"messages[{i}].role",
            )
        parts = _content_parts(message, i)
        chars = sum(len(text) for _, text in parts)
        if chars > MAX_MESSAGE_CHARS:
            raise ApiError(
                400,
                f"messages[{i}] has {chars} characters: at most {MAX_MESSAGE_CHARS} per message",
                f"messages[{i}].content",
                "message_too_long",
            )
        total += chars
        if total > MAX_TOTAL_CHARS:
            raise ApiError(
                400,
                f"the messages have more than {MAX_TOTAL_CHARS} characters in all",
                "messages",
                "messages_too_long",
            )
        if message.role in ("system", "developer"):
            system.append("".join(text for _, text in parts))
        elif message.role == "user":
            text = "".join(text for _, text in parts)
            if turns and turns[-1]["role"] == "user":
                turns[-1]["content"] += "\n\n" + text
            else:
                turns.append({"role": "user", "content": text})
        elif turns:  # assistant after a user message
            content = [{"type": kind, "text": text} for kind, text in parts]
            if turns[-1]["role"] == "assistant":
                turns[-1]["content"] += content
            else:
                turns.append({"role": "assistant", "content": content})
    if messages[-1].role != "user":
        raise ApiError(
            400,
            f"the last message must be from the user, not {messages[-1].role!r}",
            f"messages[{len(messages) - 1}].role",
        )
    return ("\n\n".join(system) if system else None), turns


@dataclass
class Prompt:
    """The tokens to continue and what the reply may use."""

    tokens: list[int]
    max_tokens: int  # what generation may use: the request's, cut to the context
    dropped: int  # oldest turns left out to fit the context


def build_prompt(
    tokenizer, system: str | None, turns: list[dict], context: int, want: int | None, limit: int
) -> Prompt:
    """Render the conversation for completion, dropping the oldest turns until the prompt
    leaves room for the reply (``want``, or the limit; at most half the context)."""
    reserve = min(want or limit, context // 2)

    def render(start: int) -> list[int]:
        kept = turns[start:]
        if system is not None:
            kept = [{"role": "system", "content": system}, *kept]
        return tokenizer.render_for_completion(
            {"messages": [*kept, {"role": "assistant", "content": ""}]}
        )

    def fits(start: int) -> bool:
        return len(render(start)) + reserve <= context

    # Turns come in (user, assistant) pairs and end with the last user message, so the
    # candidate starts are 0, 2, 4, ... len(turns) - 1. Fewer turns never render longer:
    # binary search for the first start that fits (a handful of renders, not one per turn).
    low, high = 0, (len(turns) - 1) // 2  # pairs dropped; at `high` only the last user is left
    while low < high:
        middle = (low + high) // 2
        if fits(2 * middle):
            high = middle
        else:
            low = middle + 1
    start = 2 * low
    tokens = render(start)
    if len(tokens) >= context:
        raise ApiError(
            400,
            f"the prompt is {len(tokens)} tokens even with only the system prompt and the "
            f"last user message, and the model's context is {context} tokens: shorten them",
            "messages",
            "context_length_exceeded",
        )
    room = context - len(tokens)
    return Prompt(tokens, min(want or limit, room), start)


# --- tool events as text ---------------------------------------------------------------------

# How a python call and its output read inline in `content`: closing the previous kind of
# piece, then opening the next (python -> output gives "\n```\n= ").
_CLOSE = {"text": "", "python": "\n```\n", "output": "\n"}
_OPEN = {"text": "", "python": "```python\n", "output": "= "}


class Inline:
    """Turns the engine's (kind, text) events into OpenAI deltas, tool pieces inline.

    A tool delta's ``content`` is the readable inline form (for plain clients) and its
    ``nanochat_tool`` the raw piece (for the page, which shows ``nanochat_tool`` instead of
    ``content`` whenever it is present); the close of a tool block is a tool delta too.
    """

    def __init__(self) -> None:
        self.kind = "text"

    @staticmethod
    def _tool(kind: str, content: str, text: str) -> dict:
        return {"content": content, "nanochat_tool": {"type": TOOL_PART[kind], "text": text}}

    def deltas(self, kind: str, text: str) -> list[dict]:
        kind = kind if kind in _OPEN else "text"
        out = []
        prefix = ""
        if kind != self.kind:
            if kind == "text":
                out.append(self._tool(self.kind, _CLOSE[self.kind], ""))
            else:
                prefix = _CLOSE[self.kind] + ("\n" if self.kind == "text" else "") + _OPEN[kind]
            self.kind = kind
        if kind != "text":
            out.append(self._tool(kind, prefix + text, text))
        elif text:
            out.append({"content": text})
        return out

    def close(self) -> list[dict]:
        """The deltas that end a tool block still open when the reply ends."""
        if self.kind == "text":
            return []
        delta = self._tool(self.kind, _CLOSE[self.kind], "")
        self.kind = "text"
        return [delta]


def merge_parts(parts: list[dict], kind: str, text: str) -> None:
    """Append an event to message parts, merging it into the last part of the same type."""
    part_type = TOOL_PART.get(kind, "text")
    if parts and parts[-1]["type"] == part_type:
        parts[-1]["text"] += text
    elif text:
        parts.append({"type": part_type, "text": text})


class StopText:
    """Cuts a reply's text at the first of its stop sequences (OpenAI's ``stop``).

    Text that could be the start of a stop sequence is held back until the next piece shows
    whether it is one, so no part of a stop sequence is ever sent, streamed or not.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that may be sent now, whether a stop sequence ended the reply)."""
        if not self.stops:
            return text, False
        text = self.held + text
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = next(  # the longest tail of the text that begins some stop sequence
            (
                k
                for k in range(min(self.longest - 1, len(text)), 0, -1)
                if any(stop.startswith(text[-k:]) for stop in self.stops)
            ),
            0,
        )
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text held back, now that no stop sequence can complete it."""
        held, self.held = self.held, ""
        return held


# --- generation in worker threads -----------------------------------------------------------


class MeteredEngine(Engine):
    """An Engine that also counts the reply's tokens, records how it ended, and stops at
    the first step after ``cancel`` is set.

    ``stream_events`` draws its steps from ``generate``; metering them here keeps the
    engine's own decoding (whole UTF-8 characters, tool events) untouched, and checks
    ``cancel`` every token, even those that complete no piece of text. One instance per
    request, so the counters are never shared.
    """

    def __init__(self, model, tokenizer, cancel: threading.Event) -> None:
        super().__init__(model, tokenizer)
        self.cancel = cancel
        self.completion_tokens = 0  # sampled + forced tool tokens, the stop token excluded
        self.stopped = False  # True: the model ended its turn; False: max_tokens/context

    def generate(self, tokens, num_samples=1, **kwargs):
        self.stopped = False  # per call: one call per choice, the token count adds up
        return self._metered(super().generate(tokens, num_samples, **kwargs))

    def _metered(self, steps):
        try:
            for column, masks in steps:
                if self.cancel.is_set():
                    return
                if column[0] in self.stop_ids:
                    self.stopped = True
                else:
                    self.completion_tokens += 1
                yield column, masks
        finally:
            steps.close()


@dataclass
class Worker:
    """One model replica; serves one request at a time."""

    index: int
    model: Any
    tokenizer: Any
    device: str


@dataclass
class Finish:
    """One choice is over (an item of a job's events)."""

    index: int
    reason: str  # "stop" (end of turn or a stop sequence) or "length"


@dataclass
class Outcome:
    """How a generation ended (the last item of a job's events)."""

    completion_tokens: int = 0  # all choices together
    error: str | None = None


@dataclass(eq=False)  # compared and hashed by identity (Service.jobs is a set)
class Job:
    """One request's generation: it runs in a thread and feeds ``events`` on the loop."""

    prompt: Prompt
    options: Options
    loop: asyncio.AbstractEventLoop
    # (choice index, kind, text) pieces and a Finish per choice, then one Outcome
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    engine: MeteredEngine | None = None  # set by the worker thread when it starts

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (read from any thread, for the log)."""
        return 0 if self.engine is None else self.engine.completion_tokens

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going down
            self.cancel.set()


def run_job(worker: Worker, job: Job) -> Outcome:
    """Generate in the calling (worker) thread, handing each piece to the event loop: the
    choices one after another (until the client leaves), then the Outcome."""
    engine = job.engine = MeteredEngine(worker.model, worker.tokenizer, job.cancel)
    outcome = Outcome()
    try:
        for index in range(job.options.n):
            if job.cancel.is_set():
                break
            job.emit(Finish(index, run_choice(engine, job, index)))
    except Exception as exc:  # reported to the client as a server error
        outcome.error = one_line(exc)
        log(f"generation failed on worker {worker.index} ({worker.device}): {outcome.error}")
    outcome.completion_tokens = engine.completion_tokens
    job.emit(outcome)
    return outcome


def run_choice(engine: MeteredEngine, job: Job, index: int) -> str:
    """Generate choice ``index``, emitting its pieces; its finish reason."""
    opts = job.options
    stop = StopText(opts.stop)
    events = engine.stream_events(
        job.prompt.tokens,
        max_tokens=job.prompt.max_tokens,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        seed=opts.choice_seed(index),
    )
    try:
        for kind, text in events:
            if kind != "text":  # stop sequences are matched in the text, not in tool blocks
                if held := stop.flush():
                    job.emit((index, "text", held))
                job.emit((index, kind, text))
                continue
            text, stopped = stop.feed(text)
            if text:
                job.emit((index, kind, text))
            if stopped:
                return "stop"  # closing `events` below ends the generation
        if held := stop.flush():
            job.emit((index, "text", held))
    finally:
        events.close()
    return "stop" if engine.stopped else "length"


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""


class WorkerPool:
    """Free workers plus a bounded first-come-first-served line of requests waiting for one.

    Used only from the event loop's thread (workers come back through call_soon_threadsafe),
    so it needs no lock.
    """

    def __init__(self, workers: list[Worker], max_waiting: int) -> None:
        self.workers = workers
        self.free = list(reversed(workers))
        self.waiting: deque[asyncio.Future] = deque()
        self.max_waiting = max_waiting
        self.seconds = 2.0  # running mean of a request's generation time, for Retry-After

    @property
    def busy(self) -> int:
        return len(self.workers) - len(self.free)

    async def acquire(self) -> Worker:
        if self.free:
            return self.free.pop()
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future in self.waiting:
                self.waiting.remove(future)
            elif future.done() and not future.cancelled():
                self.release(future.result())  # handed over just as we gave up
            raise

    def release(self, worker: Worker) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(worker)
                return
        self.free.append(worker)

    def retry_after(self) -> int:
        """Seconds until a place in the line is likely free (at least 1)."""
        rounds = (len(self.waiting) + 1) / max(1, len(self.workers))
        return max(1, min(60, math.ceil(self.seconds * rounds)))

    def record(self, seconds: float) -> None:
        self.seconds = 0.8 * self.seconds + 0.2 * seconds


# --- the application ------------------------------------------------------------------------


@dataclass
class Service:
    """Everything a request needs: the pool, the model's name and limits, the API key."""

    pool: WorkerPool
    model_id: str
    context: int
    max_tokens_limit: int
    api_key: str | None
    allowed_hosts: tuple[str, ...] | None = ()  # Host names served besides loopback; None: any
    executor: Any = None  # one thread per worker
    created: int = field(default_factory=lambda: int(time.time()))
    jobs: set = field(default_factory=set)  # generations under way (cancelled at shutdown)

    @property
    def tokenizer(self):
        return self.pool.workers[0].tokenizer

    def start(self, worker: Worker, job: Job) -> None:
        """Run ``job`` on ``worker``'s thread; the worker comes back when it is over."""
        started = time.perf_counter()
        self.jobs.add(job)

        def finished() -> None:
            self.jobs.discard(job)
            self.pool.record(time.perf_counter() - started)
            self.pool.release(worker)

        def work() -> None:
            try:
                run_job(worker, job)
            finally:
                job.loop.call_soon_threadsafe(finished)

        job.loop.run_in_executor(self.executor, work)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_done(request: Request, awaitable, poll: float = 0.5):
    """Await ``awaitable`` unless the client disconnects first (checked every ``poll`` s):
    then cancel it and raise ClientGone, so nobody waits or computes for a closed socket."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            request.state.disconnected = True
            raise ClientGone


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class JobStream(StreamingResponse):
    """Server-sent events that stop their generation whenever the response ends, a client
    that leaves included (even before the body generator has started)."""

    def __init__(self, job: Job, content) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


class RequestLog:
    """ASGI middleware: one line per request, written when the response is over (a stream
    included): method, path, status, prompt+completion tokens, milliseconds."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})

        async def record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            ms = (time.perf_counter() - start) * 1000
            tokens = ""
            if (job := state.get("job")) is not None:
                tokens = f" tokens={len(job.prompt.tokens)}+{job.completion_tokens}"
                if job.prompt.dropped:
                    tokens += f" ({job.prompt.dropped} oldest turns dropped)"
            note = " (client gone)" if state.get("disconnected") else ""
            if state.get(TIMED_OUT):  # the guard answered 408 and closed the connection
                status, note = 408, f" (request {state[TIMED_OUT]} too slow)"
            log(f"{scope['method']} {scope['path']} {status}{tokens} {ms:.0f} ms{note}")


def create_app(service: Service):
    """The ASGI application serving ``service``: FastAPI inside the site guard (Host, other
    sites, content type) inside the request log."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    pool = service.pool

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # 404 (a wrong path or base_url), 405: the same error shape as every other answer
        error = ApiError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")
        return _error_response(error)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log(f"{request.method} {request.url.path}: {type(exc).__name__}: {one_line(exc)}")
        error = ApiError(500, "internal server error", kind="server_error")
        return _error_response(error)  # Starlette still re-raises it: uvicorn logs the trace

    async def read_body(request: Request) -> bytes:
        """The body, read piece by piece: 413 as soon as it passes MAX_BODY_BYTES."""
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise BodyTooLarge(MAX_BODY_BYTES)
            return await read_limited(request.stream(), MAX_BODY_BYTES)
        except BodyTooLarge as exc:
            raise ApiError(413, str(exc), code="body_too_large") from None
        except ClientDisconnect:
            request.state.disconnected = True
            raise ClientGone from None

    def require_key(request: Request) -> None:
        if not service.api_key:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {service.api_key}".encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                f"(the server's ${API_KEY_ENV}); the chat page takes it as /?key=<key>",
                code="invalid_api_key",
            )

    api = [Depends(require_key)]

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": service.model_id,
            "workers": len(pool.workers),
            "busy": pool.busy,
            "queue": len(pool.waiting),
            "queue_limit": pool.max_waiting,
            "context": service.context,
        }

    @app.get("/v1/models", dependencies=api)
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": service.created,
                    "owned_by": "nanochat",
                }
            ],
        }

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request):
        body = parse_request(await read_body(request))
        options = check_options(body, service.max_tokens_limit)
        system, turns = conversation(body.messages)
        prompt = await asyncio.to_thread(
            build_prompt,
            service.tokenizer,
            system,
            turns,
            service.context,
            options.max_tokens,
            service.max_tokens_limit,
        )
        try:
            worker = await until_done(request, pool.acquire())
        except QueueFull:
            seconds = pool.retry_after()
            raise ApiError(
                429,
                f"the server is busy ({len(pool.workers)} worker(s) busy, {len(pool.waiting)} "
                f"request(s) waiting): retry in {seconds} s",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(seconds)},
            ) from None
        job = Job(prompt, options, asyncio.get_running_loop())
        request.state.job = job  # for the log line
        service.start(worker, job)
        reply = Reply(body.model or service.model_id, job)  # OpenAI echoes the request's
        if options.stream:
            return JobStream(job, reply.stream(request))
        try:
            return JSONResponse(await until_done(request, reply.complete(request)))
        finally:
            job.cancel.set()  # no-op when finished; stops it when the client left

    return RequestLog(SiteGuard(app, service.allowed_hosts))


class Reply:
    """The answer to one request, from its job's events: a chat.completion, or the chunks.
    ``model`` is the name it answers with (the request's, as OpenAI echoes it)."""

    def __init__(self, model: str, job: Job) -> None:
        self.model = model
        self.job = job
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, outcome: Outcome) -> dict:
        prompt_tokens = len(self.job.prompt.tokens)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt_tokens + outcome.completion_tokens,
        }

    def chunk(self, delta: dict, finish: str | None = None, index: int = 0) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        }

    async def stream(self, request: Request):
        """SSE lines: each choice's role, content deltas as they come (tagged with their
        choice's index), each choice's finish, usage, [DONE]."""
        inline = [Inline() for _ in range(self.job.options.n)]
        finished = False
        try:
            for index in range(len(inline)):
                yield _sse(self.chunk({"role": "assistant", "content": ""}, index=index))
            while not isinstance(item := await self.job.events.get(), Outcome):
                if isinstance(item, Finish):
                    for delta in inline[item.index].close():
                        yield _sse(self.chunk(delta, index=item.index))
                    yield _sse(self.chunk({}, item.reason, item.index))
                    continue
                index, kind, text = item
                for delta in inline[index].deltas(kind, text):
                    yield _sse(self.chunk(delta, index=index))
            finished = True
        finally:
            if not finished:  # the client went away mid-stream: stop generating
                self.job.cancel.set()
                request.state.disconnected = True
        if item.error is not None:
            error = ApiError(500, f"generation failed: {item.error}", kind="server_error")
            yield _sse(error.body())
            return
        if self.job.options.include_usage:
            yield _sse({**self.chunk({}), "choices": [], "usage": self.usage(item)})
        yield _sse("[DONE]")

    async def complete(self, request: Request) -> dict:
        """The whole chat.completion, once generation is over."""
        n = self.job.options.n
        inline = [Inline() for _ in range(n)]
        content: list[list[str]] = [[] for _ in range(n)]
        parts: list[list[dict]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        while not isinstance(item := await self.job.events.get(), Outcome):
            if isinstance(item, Finish):
                content[item.index] += [d["content"] for d in inline[item.index].close()]
                reasons[item.index] = item.reason
                continue
            index, kind, text = item
            content[index] += [delta["content"] for delta in inline[index].deltas(kind, text)]
            merge_parts(parts[index], kind, text)
        if item.error is not None:
            raise ApiError(500, f"generation failed: {item.error}", kind="server_error")
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(content[i]),
                    "nanochat_parts": parts[i],
                },
                "finish_reason": reasons[i],
            }
            for i in range(n)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(item),
        }


# --- main -----------------------------------------------------------------------------------


def load_workers(base: Path, args) -> tuple[list[Worker], dict]:
    """The model replicas: one per GPU (or --workers, round-robin over the GPUs), or
    --workers on CPU sharing one copy of the weights. UsageError when there is no model."""
    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        devices = [f"cuda:{i % gpus}" for i in range(args.workers or gpus)]
    else:
        devices = ["cpu"] * (args.workers or 1)
    loaded: dict[str, tuple] = {}
    workers = []
    for i, device in enumerate(devices):
        if device not in loaded:
            loaded[device] = load_chat_model(base, args.source, device, args.tag, args.step)
        model, tokenizer, meta = loaded[device]
        workers.append(Worker(i, model, tokenizer, device))
    return workers, meta


def check_address(host: str, port: int) -> None:
    """UsageError now, before the model loads, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(infos[0][4])
    except OSError as exc:
        raise UsageError(
            f"can not listen on {host}:{port} ({one_line(exc)}): is another server running "
            "there? Pick another --port"
        ) from None


def allowed_hosts(args) -> tuple[str, ...] | None:
    """The Host names to serve besides the loopback ones: --allowed-hosts; by default none
    when listening on a loopback address (DNS rebinding), any (None) otherwise."""
    if args.allowed_hosts is not None:
        return None if args.allowed_hosts == ("*",) else args.allowed_hosts
    return () if is_loopback(args.host) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()
    try:
        check_address(args.host, args.port)
        workers, meta = load_workers(base, args)
    except UsageError as exc:
        die(str(exc))
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    model = workers[0].model
    context = model.config.sequence_len
    model_id = f"nanochat-{meta['source']}-{meta['tag']}"
    service = Service(
        pool=WorkerPool(workers, args.queue),
        model_id=model_id,
        context=context,
        max_tokens_limit=args.max_tokens_limit,
        api_key=os.environ.get(API_KEY_ENV) or None,
        allowed_hosts=allowed_hosts(args),
        executor=ThreadPoolExecutor(len(workers), thread_name_prefix="nanochat-worker"),
    )
    n_params = sum(p.numel() for p in model.parameters())
    devices = sorted({w.device for w in workers})
    log(
        f"{model_id} step {meta.get('step')}: {n_params / 1e6:.1f}M parameters, context "
        f"{context} tokens; {len(workers)} worker(s) on {', '.join(devices)}, queue {args.queue}"
    )
    key_note = f" (with ?key=<${API_KEY_ENV}>)" if service.api_key else ""
    log(f"chat page at http://{args.host}:{args.port}/{key_note}; Ctrl-C stops the server")
    uvicorn.run(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        http=slow_client_protocol(),  # deadlines for a request's headers and body
    )
    for job in list(service.jobs):  # streams cut by the shutdown: stop their threads
        job.cancel.set()
    service.executor.shutdown(wait=True, cancel_futures=True)
    return 0


if __name__ == "__main__":
    run_main(main)
