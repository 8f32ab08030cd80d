"""chat-web against the fault battery (issue 12, defect 11): real servers
(``python -m scripts.chat_web``) on 127.0.0.1 with the scripted checkpoint of
helpers.chat_server, raw sockets where a client misbehaves below HTTP, the official openai
client where it behaves.

One test per fault: deeply nested JSON, numbers out of range, a 50 MB body (and the server's
memory while it comes), requests from other sites' pages and through foreign host names,
slow clients, ``stop``/``n``/unsupported fields, and the echoed ``model``.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers.chat_server import (
    EXPECTED,
    EXPECTED_TOKENS,
    JSON,
    REPLY_TEXT,
    USER,
    Server,
    build_chat_checkpoint,
    serving,
)

MODEL_ID = "nanochat-base-d2"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Started together (startup dominates): the default one (127.0.0.1), one listening on
    every interface as in a container behind Modal's proxy, and one with --allowed-hosts."""
    base = tmp_path_factory.mktemp("faults_web") / "base"
    build_chat_checkpoint(base)
    model = ("--source", "base", "--tag", "d2")
    started = {
        "main": Server(base, *model, "--workers", "1", name="faults-main"),
        # Any Host, as on every interface behind Modal's proxy; listening on 127.0.0.1 only.
        "open": Server(base, *model, "--allowed-hosts", "*", name="faults-open"),
        "named": Server(base, *model, "--allowed-hosts", "chat.example", name="named"),
    }
    yield from serving(started)


def call(server: Server, body, headers=JSON, method="POST", path="/v1/chat/completions"):
    """(status, parsed JSON or text) of one request with exactly these headers (a Host
    header among them replaces the real one)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, data, dict(headers))
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def assert_error(reply, status: int, expected_status: int, param=None, code=None) -> dict:
    """The answer is an OpenAI-shaped JSON error with this status (and param/code)."""
    assert status == expected_status, reply
    assert isinstance(reply, dict) and set(reply["error"]) == ERROR_KEYS, reply
    error = reply["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fine(server: Server) -> None:
    """The server still answers a plain request correctly."""
    status, reply = call(server, {"messages": USER, "temperature": 0})
    assert status == 200 and reply["choices"][0]["message"]["content"] == EXPECTED, reply


# --- 1. deeply nested JSON ------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_json_error(server):
    for depth in (100, 10_000, 100_000):
        nested = b"[" * depth + b"]" * depth
        for body in (
            b'{"messages": ' + nested + b"}",
            b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + nested + b"}",
            nested,
            b'{"a": ' * depth + b"1" + b"}" * depth,
        ):
            status, reply = call(server, body)
            assert_error(reply, status, 400, code="json_too_deep")
    # Brackets inside strings are text, not nesting; a sane depth in an ignored field is fine.
    text = "[" * 5000 + "{" * 2000 + '\\"]'
    shallow = {"messages": USER, "temperature": 0, "x": [[[[[[{"y": [text]}]]]]]]}
    status, reply = call(server, shallow)
    assert status == 200, reply
    fine(server)


def test_json_depth_counts_structure_only_and_stays_linear():
    from nanochat.serve.http_guard import json_depth

    assert json_depth(b'{"a": [1, {"b": "]]]]"}], "c": "[[[\\"[["}') == 3
    assert json_depth(b"42") == 0 and json_depth(b"[[]][[[]]]") == 3
    # An unclosed string of escaped quotes once made a backtracking regex quadratic:
    # this must be instant (a quadratic scan of 2 MB would take hours).
    started = time.monotonic()
    json_depth(b'"' + b'\\"' * 1_000_000)
    json_depth(b'"' * 1_000_000 + b"[" * 1000)
    assert time.monotonic() - started < 5


# --- 2. numbers out of range ----------------------------------------------------------------


def test_numbers_out_of_range_are_a_400_naming_the_field(server):
    for field, value in [
        ("seed", 2**70),
        ("seed", -(2**70)),
        ("seed", 2**63),
        ("n", 10**30),
        ("max_tokens", 2**70),
        ("max_completion_tokens", 2**64),
        ("top_k", 2**70),
        ("temperature", 10**400),
        ("top_p", -(2**70)),
    ]:
        status, reply = call(server, {"messages": USER, field: value})
        assert_error(reply, status, 400, param=field)
    # NaN, Infinity and a 5000-digit number are refused as JSON, not passed on.
    for raw in (b"NaN", b"Infinity", b"-Infinity", b"1" * 5000, b"1e999"):
        body = b'{"messages": ' + json.dumps(USER).encode() + b', "temperature": ' + raw + b"}"
        status, reply = call(server, body)
        assert_error(reply, status, 400)
    # The edges of the documented ranges are served, and a temperature so small that
    # float32 logits would overflow samples greedily instead of failing.
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"temperature": 1e-300}):
        body = {"messages": USER, "max_tokens": 3, "temperature": 0, **extra}
        status, reply = call(server, body)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "Hi ", reply
    fine(server)


# --- 3. a 50 MB body ------------------------------------------------------------------------


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict]:
    """Status and JSON body of the HTTP response on ``sock`` (content-length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(lines[0].split()[1]), json.loads(rest[:length])


class RssWatch:
    """The server process's largest resident set growth (KiB) while in a ``with`` block,
    sampled every 5 ms from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    def __enter__(self) -> RssWatch:
        self.base = rss_kib(self.pid)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_kib(self.pid) - self.base)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_kib(self.pid) - self.base)


def test_a_50_mb_body_gets_413_at_once_and_never_sits_in_memory(server):
    total, piece = 50 << 20, 64 << 10
    fine(server)  # warm: the first request's allocations are not the body's
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
    )
    with RssWatch(server.proc.pid) as watch:
        # Chunked: the size is unknown up front. The 413 comes while the client still sends.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            chunk = f"{piece:x}\r\n".encode() + b"[" * piece + b"\r\n"
            sent, answered_at = 0, None
            while sent < total:
                sock.sendall(chunk)
                sent += piece
                if answered_at is None and select.select([sock], [], [], 0)[0]:
                    answered_at = sent
            sock.sendall(b"0\r\n\r\n")  # a naive client sends it all: the server drains it
            status, reply = read_response(sock)
        assert_error(reply, status, 413, code="body_too_large")
        assert answered_at is not None and answered_at < total // 2, (answered_at, total)
        # With Content-Length: refused before a byte of the body is sent.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((head + f"Content-Length: {total}\r\n\r\n").encode())
            status, reply = read_response(sock, timeout=10)
        assert_error(reply, status, 413, code="body_too_large")
    assert watch.peak < 12 * 1024, f"the server grew {watch.peak} KiB while 50 MB came in"
    fine(server)


# --- 4. other sites' pages, foreign host names, bodies that are not JSON ---------------------


def test_only_json_from_the_servers_own_origin_and_names(servers):
    main, port = servers["main"], servers["main"].port
    body = {"messages": USER, "temperature": 0, "max_tokens": 3}
    data = json.dumps(body).encode()
    # A form-like POST a page could send cross-site without a preflight: 415.
    for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "application/jsonx"}):
        status, reply = call(main, data, headers)
        assert_error(reply, status, 415, code="unsupported_media_type")
    # Another site's page: 403, one message, whatever else the request carries.
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": f"http://localhost:{port + 1}"},  # another port is another origin
        {"Origin": "null"},  # a sandboxed frame or a file
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    ):
        status, reply = call(main, data, {**JSON, **headers})
        error = assert_error(reply, status, 403, code="cross_site_request")
        assert "cross-site request refused" in error["message"]
    status, reply = call(main, None, {"Origin": "http://evil.example"}, "GET", "/v1/models")
    assert_error(reply, status, 403, code="cross_site_request")
    # DNS rebinding: evil.example resolves to 127.0.0.1, so its page is same-origin with
    # itself; the Host it sends is not a loopback name. Every path is refused.
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    status, reply = call(main, data, {**JSON, **rebound})
    assert_error(reply, status, 403, code="host_not_allowed")
    for path in ("/", "/health", "/v1/models"):
        status, reply = call(main, None, rebound, "GET", path)
        assert_error(reply, status, 403, code="host_not_allowed")
    # The server's own page (what chromium sends in test_chat_page), loopback names with any
    # port, programs without Origin, and a link from elsewhere to the page all pass.
    for headers in (
        {"Origin": main.url, "Sec-Fetch-Site": "same-origin"},
        {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        {"Host": "[::1]:1234"},
        {"Host": "127.0.0.1"},
        {},
    ):
        status, reply = call(main, data, {**JSON, **headers})
        assert status == 200 and reply["choices"][0]["message"]["content"] == "Hi ", reply
    status, page = call(main, None, {"Sec-Fetch-Site": "cross-site"}, "GET", "/")
    assert status == 200 and "<html" in page.lower()
    # Any Host, as behind Modal's proxy, but only its own origin.
    public = {"Host": "me--nanochat-chat-web.modal.run"}
    for headers in (
        {**public, "Origin": "https://me--nanochat-chat-web.modal.run"},
        {"X-Forwarded-Host": public["Host"], "Origin": "https://" + public["Host"]},
    ):
        status, reply = call(servers["open"], data, {**JSON, **headers})
        assert status == 200, reply
    status, reply = call(servers["open"], data, {**JSON, **public, "Origin": "https://x.run"})
    assert_error(reply, status, 403, code="cross_site_request")
    # --allowed-hosts adds names to the loopback ones.
    named = servers["named"]
    for host in ("chat.example", f"CHAT.example.:{named.port}", "localhost"):
        status, reply = call(named, data, {**JSON, "Host": host})
        assert status == 200, reply
    status, reply = call(named, data, {**JSON, "Host": "evil.example"})
    assert_error(reply, status, 403, code="host_not_allowed")
    from scripts.chat_web import build_parser

    assert "--allowed-hosts" in build_parser().format_help()


# --- 5. slow clients ------------------------------------------------------------------------


def test_slow_clients_are_cut_off(server):
    """20 slowloris connections (10 dribbling headers, 10 a body, a byte every 0.5 s) and 2
    that send nothing: all are closed within seconds of the documented deadlines (10 s
    for headers, 15 s for a body after its headers), those with a partial request after a
    408."""
    from nanochat.serve.http_guard import BODY_TIMEOUT_S, HEADER_TIMEOUT_S

    port = server.port
    slow_head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n" + "X-Padding: " + "a" * 500 + "\r\n\r\n"
    ).encode()
    body = json.dumps({"messages": USER}).encode()
    full_head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    clients = []  # [socket, bytes still to dribble, kind]
    started = time.monotonic()
    for i in range(22):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        if i < 10:
            clients.append([sock, slow_head, "headers"])
        elif i < 20:
            sock.sendall(full_head + body[:1])
            clients.append([sock, body[1:], "body"])
        else:
            clients.append([sock, b"", "silent"])
    closed: dict[int, tuple[str, float, bytes]] = {}
    received = {i: b"" for i in range(len(clients))}
    limit = HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 15
    try:
        while len(closed) < len(clients) and time.monotonic() - started < limit:
            for i, entry in enumerate(clients):
                if i in closed:
                    continue
                sock, rest, kind = entry
                try:
                    while select.select([sock], [], [], 0)[0]:
                        data = sock.recv(65536)
                        if not data:
                            closed[i] = (kind, time.monotonic() - started, received[i])
                            break
                        received[i] += data
                    if i not in closed and rest:
                        sock.send(rest[:1])
                        entry[1] = rest[1:]
                except OSError:  # reset by the server
                    closed[i] = (kind, time.monotonic() - started, received[i])
            # Meanwhile the server answers others.
            if len(closed) < len(clients) and int(time.monotonic() - started) % 5 == 0:
                status, _ = call(server, None, {}, "GET", "/health")
                assert status == 200
            time.sleep(0.5)
    finally:
        for sock, _, _ in clients:
            sock.close()
    assert len(closed) == len(clients), f"still open after {limit:g} s: " + ", ".join(
        clients[i][2] for i in range(len(clients)) if i not in closed
    )
    for kind, seconds, data in closed.values():
        deadline = BODY_TIMEOUT_S if kind == "body" else HEADER_TIMEOUT_S
        assert deadline - 1 < seconds < deadline + 8, (kind, seconds)
        if kind == "silent":
            assert data == b""
        else:
            assert data.startswith(b"HTTP/1.1 408 "), (kind, data[:200])
            error = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
            assert error["code"] == "request_timeout" and kind in error["message"]
    assert " 408 " in server.log() and "(request body too slow)" in server.log()
    fine(server)


# --- 6. stop, n and fields this server does not support -------------------------------------


def stream_choices(client, **kwargs) -> dict[int, tuple[str, str | None, list[str]]]:
    """{index: (text, finish_reason, pieces)} of a streamed completion."""
    out: dict[int, list] = {}
    for chunk in client.chat.completions.create(messages=USER, stream=True, **kwargs):
        for choice in chunk.choices:
            text, finish, pieces = out.setdefault(choice.index, ["", None, []])
            piece = choice.delta.content or ""
            out[choice.index] = [text + piece, choice.finish_reason or finish, pieces + [piece]]
    return {i: tuple(v) for i, v in out.items()}


def test_stop_and_n_are_honoured_and_unsupported_fields_refused(client, server):
    common = {"model": "nanochat", "temperature": 0}
    # stop: the reply ends before the stop text, finish "stop"; a stream never shows any of
    # it, even when it spans pieces ("你" and "é" come as separate pieces).
    for stop, text in [
        ("你", "Hi "),
        (["zzz", "é🙂", "\n\n", "!"], "Hi 你"),
        ("i 你é", "H"),
        ("Hi 你X", EXPECTED),  # a prefix that never completes is sent after all
        ("2+3", EXPECTED),  # matched in the text, not inside the calculator call
    ]:
        reply = client.chat.completions.create(messages=USER, stop=stop, **common)
        (choice,) = reply.choices
        assert (choice.message.content, choice.finish_reason) == (text, "stop"), stop
        ((streamed, finish, pieces),) = stream_choices(client, stop=stop, **common).values()
        assert (streamed, finish) == (text, "stop"), stop
        if text != EXPECTED:
            stops = [stop] if isinstance(stop, str) else stop
            assert not any(s in "".join(pieces) for s in stops)
    # n: that many choices, each with its own index, streamed too; tokens add up.
    reply = client.chat.completions.create(messages=USER, n=3, **common)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == EXPECTED and c.finish_reason == "stop" for c in reply.choices)
    assert reply.usage.completion_tokens == 3 * EXPECTED_TOKENS
    streamed = stream_choices(client, n=2, stop="🙂", **common)
    assert {i: v[:2] for i, v in streamed.items()} == {
        0: (REPLY_TEXT[:-1], "stop"),
        1: (REPLY_TEXT[:-1], "stop"),
    }
    reply = client.chat.completions.create(messages=USER, n=2, max_tokens=3, **common)
    assert [(c.message.content, c.finish_reason) for c in reply.choices] == [("Hi ", "length")] * 2
    # Limits: at most 4 stop sequences, n from 1 to 8.
    for extra, param in [({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"n": 9}, "n")]:
        status, reply = call(server, {"messages": USER, **extra})
        assert_error(reply, status, 400, param=param)
    # What the server can not do is refused, naming the field...
    for field, value in [
        ("logprobs", True),
        ("top_logprobs", 2),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", {"name": "f"}),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"15": 5}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
    ]:
        status, reply = call(server, {"messages": USER, field: value})
        assert_error(reply, status, 400, param=field, code="unsupported_parameter")
    # ...while the same fields at their "off" values, and fields it has no use for, are fine
    # for the real client.
    reply = client.chat.completions.create(
        messages=USER,
        logprobs=False,
        top_logprobs=0,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
        user="someone",
        parallel_tool_calls=True,
        store=False,
        metadata={"a": "b"},
        service_tier="auto",
        n=1,
        stop=[],
        **common,
    )
    assert reply.choices[0].message.content == EXPECTED


# --- 7. the echoed model --------------------------------------------------------------------


def test_the_answer_names_the_model_the_request_asked_for(client, server):
    reply = client.chat.completions.create(
        model="my-favourite-model", messages=USER, temperature=0, max_tokens=3
    )
    assert reply.model == "my-favourite-model"
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=USER,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert {chunk.model for chunk in stream} == {"gpt-4o"}
    status, reply = call(server, {"messages": USER, "max_tokens": 3})  # none asked for
    assert status == 200 and reply["model"] == MODEL_ID
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    status, reply = call(server, {"messages": USER, "model": "m" * 300})
    assert_error(reply, status, 400, param="model")


def test_every_error_has_the_api_shape_and_a_utf16_body_is_refused(server):
    """A wrong path (a base_url without /v1) or method gets OpenAI's error shape too; a
    UTF-16 body, which json.loads would take, cannot slip brackets past the depth limit."""
    status, reply = call(server, None, {}, "GET", "/chat/completions")
    assert_error(reply, status, 404, code="http_404")
    status, reply = call(server, None, {}, "PUT", "/v1/models")
    assert_error(reply, status, 405, code="http_405")
    hidden = '{"x":"\u0122","messages":[{"role":"user","content":"hi"}],"y":' + "[" * 900
    body = (hidden + "]" * 900 + "}").encode("utf-16-le")
    status, reply = call(server, body)
    assert_error(reply, status, 400)
    assert "not valid JSON" in reply["error"]["message"]  # NULs where UTF-16 has zeros
