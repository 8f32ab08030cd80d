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

Limits (upstream's numbers): 1-500 messages, 8,000 characters per message, 32,000
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

The server itself is a library, ``nanochat/serve/``: ``api.py`` (the request schema, its
limits and the prompt), ``pool.py`` (generation in worker threads, the waiting line),
``reply.py`` (the OpenAI-shaped answers), ``app.py`` (the FastAPI application) and
``http_guard.py``; this script parses the flags, loads the model and runs it.
"""

from __future__ import annotations

import argparse
import os

from nanochat.common import (
    CliParser,
    add_checkpoint_arguments,
    base_dir,
    log,
    non_negative_int,
    positive_int,
    run_main,
)
from nanochat.serve.api import DEFAULT_MAX_TOKENS_LIMIT, MAX_BODY_BYTES
from nanochat.serve.app import API_KEY_ENV, Service, check_address, load_workers, run_server
from nanochat.serve.http_guard import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, is_loopback
from nanochat.serve.pool import DEFAULT_QUEUE, WorkerPool

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
    add_checkpoint_arguments(parser.add_argument_group("checkpoint"))
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


# --- main -----------------------------------------------------------------------------------


def allowed_hosts(args) -> tuple[str, ...] | None:
    """The Host names to serve besides the loopback ones: --allowed-hosts; by default none
    when listening on a loopback address (DNS rebinding), any (None) otherwise."""
    if args.allowed_hosts is not None:
        return None if args.allowed_hosts == ("*",) else args.allowed_hosts
    return () if is_loopback(args.host) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()
    check_address(args.host, args.port)
    workers, meta = load_workers(base, args.source, args.tag, args.step, args.workers)
    from concurrent.futures import ThreadPoolExecutor

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
    run_server(service, args.host, args.port)
    return 0


if __name__ == "__main__":
    run_main(main)
