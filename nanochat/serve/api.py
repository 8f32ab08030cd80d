"""The chat-web API's requests (stage chat/serve, ``scripts/chat_web.py``): the OpenAI Chat
Completions schema this server accepts, its limits, and the prompt a request becomes.

- ``parse_request``: the body (bytes) as a ``ChatRequest``, refusing what is not UTF-8 JSON,
  nests too deep, holds NaN/Infinity, asks for a feature this server can not honour
  (``UNSUPPORTED``) or breaks the schema.
- ``check_options``: the sampling settings (``Options``): temperature, top-k/top-p,
  max_tokens against the server's limit, n, stop sequences, seed.
- ``conversation``: the messages checked against the limits and turned into a system prompt
  and alternating user/assistant turns (assistant content parts ``python`` and
  ``python_output`` accepted as an extension).
- ``build_prompt``: the tokens to continue, the oldest turns dropped to leave room for the
  reply (``nanochat/inference/prompt_fit.py``).

Every refusal is an ``ApiError``: an HTTP status and OpenAI's error shape.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanochat.common import one_line
from nanochat.inference.prompt_fit import PromptTooLong, fit_conversation
from nanochat.serve.http_guard import json_depth, openai_error

# Request limits: upstream's server used these numbers.
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
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer "system"
ASSISTANT_PART_TYPES = ("text", "python", "python_output")  # python*: our extension


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
    try:
        fitted = fit_conversation(tokenizer, turns, context, want or limit, system)
    except PromptTooLong as exc:
        raise ApiError(
            400,
            f"the prompt is {exc.tokens} tokens even with only the system prompt and the "
            f"last user message, and the model's context is {context} tokens: shorten them",
            "messages",
            "context_length_exceeded",
        ) from None
    room = context - len(fitted.tokens)
    return Prompt(fitted.tokens, min(want or limit, room), fitted.dropped)
