"""chat-web's answers (stage chat/serve): a job's events as OpenAI Chat Completions output,
a whole ``chat.completion`` or ``chat.completion.chunk`` server-sent events.

The engine reports the python expression the model writes and the calculator's output as
events of their own. ``Inline`` puts them into ``content`` readably (a fenced python block,
then ``= output``) and tags those deltas with ``nanochat_tool`` (our extension); a whole
message also carries ``nanochat_parts`` (``merge_parts``), which the chat page renders apart
and sends back as assistant content parts.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request

from nanochat.inference.engine import TOOL_PART, merge_parts
from nanochat.serve.api import ApiError
from nanochat.serve.pool import Finish, Job, Outcome

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


def _sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


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
