"""chat-web's generation (stage chat/serve): each request's replies are generated in a worker
thread, one model replica (``Worker``) per request, never on the event loop.

- ``MeteredEngine``: the inference engine, counting the reply's tokens, recording how it
  ended, and stopping at the first token after the request is cancelled.
- ``Job``: one request's generation; ``run_job`` runs its choices one after another in the
  worker's thread and hands every piece of text to the event loop as soon as it exists
  (``loop.call_soon_threadsafe`` into an ``asyncio.Queue``), then one ``Outcome``.
- ``StopText``: the reply's text cut at the first stop sequence, none of it ever sent.
- ``WorkerPool``: free workers and a bounded first-come-first-served line of requests
  waiting for one (``QueueFull`` past it, with a Retry-After estimate).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nanochat.common import log, one_line
from nanochat.inference.engine import Engine
from nanochat.serve.api import Options, Prompt

DEFAULT_QUEUE = 16  # requests that may wait for a free worker (--queue)


# --- stop sequences ---------------------------------------------------------------------------


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
