"""chat-web's HTTP application (stage chat/serve): the FastAPI app behind
``scripts/chat_web.py``, with the model replicas it serves and the server that runs it.

- ``Service``: everything a request needs (the worker pool, the model's name and limits, the
  API key, the Host names allowed); ``Service.start`` runs a job in its worker's thread.
- ``create_app``: ``GET /`` (the chat page), ``GET /health``, ``GET /v1/models`` and
  ``POST /v1/chat/completions``, inside the site guard (``http_guard.SiteGuard``) inside
  ``RequestLog`` (one line per request, never the conversation's text).
- ``JobStream``: the streamed answer, which stops its generation whenever the response ends.
- ``load_workers``, ``check_address`` and ``run_server``: starting the server.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import nanochat
from nanochat.common import UsageError, log, one_line
from nanochat.inference.engine import open_chat_checkpoint
from nanochat.serve.api import (
    MAX_BODY_BYTES,
    ApiError,
    build_prompt,
    check_options,
    conversation,
    parse_request,
)
from nanochat.serve.http_guard import (
    TIMED_OUT,
    BodyTooLarge,
    SiteGuard,
    read_limited,
    slow_client_protocol,
)
from nanochat.serve.pool import Job, QueueFull, Worker, WorkerPool, run_job
from nanochat.serve.reply import Reply

API_KEY_ENV = "NANOCHAT_API_KEY"
PAGE = Path(nanochat.__file__).parent / "serve" / "index.html"  # shipped inside the package


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


# --- starting the server ---------------------------------------------------------------------


def load_workers(
    base: Path, source: str, tag: str | None, step: int | None, count: int | None
) -> tuple[list[Worker], dict]:
    """The model replicas: one per GPU (or ``count``, round-robin over the GPUs), or ``count``
    (default 1) on CPU sharing one copy of the weights. UsageError when there is no model."""
    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        devices = [f"cuda:{i % gpus}" for i in range(count or gpus)]
    else:
        devices = ["cpu"] * (count or 1)
    from nanochat.training import checkpoint

    # Found, checked and its tokenizer read once; the weights loaded once per device.
    found, tokenizer, meta = open_chat_checkpoint(base, source, tag, step, "--source")
    models: dict[str, object] = {}
    workers = []
    for i, device in enumerate(devices):
        if device not in models:
            models[device] = checkpoint.load_model(found, device, tokenizer.vocab_size)
        workers.append(Worker(i, models[device], tokenizer, device))
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


def run_server(service: Service, host: str, port: int) -> None:
    """Serve ``service`` on ``host:port`` until Ctrl-C, then stop the generations still under
    way and wait for their threads."""
    import uvicorn

    uvicorn.run(
        create_app(service),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        http=slow_client_protocol(),  # deadlines for a request's headers and body
    )
    for job in list(service.jobs):  # streams cut by the shutdown: stop their threads
        job.cancel.set()
    service.executor.shutdown(wait=True, cancel_futures=True)
