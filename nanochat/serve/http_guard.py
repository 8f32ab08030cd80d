"""Guards for a small HTTP server that other web pages must not drive: the pieces chat-web
(``nanochat/serve/app.py``) puts in front of its API, none of them tied to the model.

- ``openai_error``: the error body every answer uses, ``{"error": {message, type, param,
  code}}`` (OpenAI's shape), so a client parses one shape whatever refused it.
- ``json_depth``: how deeply a JSON text nests, found in linear time on the raw bytes, so a
  body nested 10^5 deep is refused before ``json.loads`` recurses into it.
- ``read_limited``: a request body read piece by piece that stops (``BodyTooLarge``) as soon
  as it passes the limit, so a 50 MB upload is never held in memory.
- ``SiteGuard``: ASGI middleware that refuses, before the application sees them, requests
  whose ``Host`` is not one of the allowed names (DNS rebinding: a page on evil.example whose
  name is made to resolve to 127.0.0.1 sends ``Host: evil.example``), requests a browser
  sends from another site (an ``Origin`` that is not the server's own, or ``Sec-Fetch-Site:
  cross-site``) to the API, and API POSTs that are not ``application/json``: a browser sends
  ``text/plain`` form-like POSTs cross-site without asking the server first (no CORS
  preflight), JSON it does not.
- ``slow_client_protocol``: uvicorn's h11 protocol with deadlines for receiving a request
  (slowloris: headers or body dribbled a byte at a time hold a connection forever). uvicorn
  0.54 only times out idle keep-alive connections: it arms that timer after a response and
  cancels it at the first byte of the next request, and arms nothing for a new connection.

Standard library only at import time; uvicorn and h11 are imported when the protocol class
is built.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import AsyncIterator, Iterable
from itertools import accumulate
from urllib.parse import urlsplit

HEADER_TIMEOUT_S = 10.0  # from a connection's start (or its last response) to the last header
BODY_TIMEOUT_S = 15.0  # from the last header to the body's last byte
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def openai_error(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """An error body in OpenAI's shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- the body -------------------------------------------------------------------------------

# A JSON string from its opening quote to its closing one, or to the end of the text when it
# is never closed: possessive, so it never backtracks and never restarts inside a string
# (an unclosed string of escaped quotes would otherwise cost quadratic time).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(text: bytes) -> int:
    """How many arrays/objects the deepest value of a JSON text sits in (0 for a scalar).

    Brackets inside strings do not count. Linear in the length and run in C (a regex, a
    translate and an accumulate), so it is cheap on a body of any size. Meaningful for valid
    JSON; for invalid text it is some number and the parser will refuse the text anyway.
    """
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


class BodyTooLarge(Exception):
    """The request body passed the limit (``limit`` bytes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body from its pieces (e.g. Starlette's ``request.stream()``); BodyTooLarge as soon
    as more than ``limit`` bytes have come, without reading the rest."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


# --- hosts and origins ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a listening address (``--host``) is this machine only: localhost or 127/8, ::1."""
    host = host_name(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """A host's name alone, as compared: lowercase, without the port, the brackets of an
    IPv6 address or a final dot (``[::1]:8000`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``)."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


def _allowed_name(name: str, allowed: frozenset[str]) -> bool:
    """Whether a Host name is served: one of ``allowed`` or a loopback name (localhost, any
    127/8 address, ::1), which no other site's page can send for a name of its own."""
    return name in allowed or is_loopback(name)


def _netloc(value: str, scheme: str) -> str:
    """host[:port] lowercased, the scheme's default port left out."""
    value = value.strip().lower().rstrip(".")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and value.endswith(default):
        value = value[: -len(default)]
    return value


class SiteGuard:
    """ASGI middleware: the Host, cross-site and content-type checks (see the module doc).

    ``allowed_hosts``: the names (no port) the ``Host`` header may carry besides the loopback
    ones (localhost, 127/8, [::1]: always served), or None for any name (a server reachable
    under names it cannot know, e.g. behind a proxy).
    ``api_prefix``: the paths that are the API. Requests there (and any request that is not
    GET, HEAD or OPTIONS) must not come from another site's page: an ``Origin`` header must
    name this server (the ``Host`` or ``X-Forwarded-Host`` the request came with: a browser
    cannot set that header on a cross-site request without a preflight this server never
    answers), and ``Sec-Fetch-Site`` must not be ``cross-site``. A request without those
    headers comes from a program, not a page, and passes. The page the server serves itself
    is same-origin, and a link from elsewhere to it (a GET navigation) still opens it.
    POSTs under ``api_prefix`` must be ``Content-Type: application/json`` (415 otherwise).
    """

    def __init__(
        self,
        app,
        allowed_hosts: Iterable[str] | None,
        api_prefix: str = "/v1/",
    ) -> None:
        self.app = app
        self.allowed_hosts = (
            None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts)
        )
        self.api_prefix = api_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                status, message, code = refusal
                await _send_json(send, status, openai_error(message, code=code))
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str, str] | None:
        """(status, message, code) for a request to refuse, None to let it through."""
        headers = _headers(scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host:
            name = host_name(host)
            if not _allowed_name(name, self.allowed_hosts):
                allowed = ", ".join([*LOOPBACK_NAMES, *sorted(self.allowed_hosts)])
                return (
                    403,
                    f"request refused: the Host header {host!r} is not a name of this server "
                    f"(allowed: {allowed}; any port), so that a web page cannot reach it "
                    "through a DNS name of its own (DNS rebinding); the server's "
                    "--allowed-hosts adds names",
                    "host_not_allowed",
                )
        api = scope["path"].startswith(self.api_prefix)
        if api or scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            fetch_site = headers.get("sec-fetch-site", "").lower()
            foreign = fetch_site == "cross-site"
            if origin is not None and fetch_site != "same-origin" and not foreign:
                foreign = not self._own_origin(origin, headers)
            if foreign:
                shown = origin if origin is not None else f"Sec-Fetch-Site: {fetch_site}"
                return (
                    403,
                    f"cross-site request refused ({shown}): this API answers its own page "
                    "and programs, not pages of other sites",
                    "cross_site_request",
                )
        if api and scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                shown = f"Content-Type {media!r}" if media else "no Content-Type"
                return (
                    415,
                    f"the request body must be JSON with 'Content-Type: application/json' "
                    f"(got {shown})",
                    "unsupported_media_type",
                )
        return None

    @staticmethod
    def _own_origin(origin: str, headers: dict[str, str]) -> bool:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a sandboxed frame, a file), or garbage
        mine = {
            _netloc(value.split(",")[0], parts.scheme)
            for value in (headers.get("host"), headers.get("x-forwarded-host"))
            if value
        }
        return _netloc(parts.netloc, parts.scheme) in mine


def _headers(scope) -> dict[str, str]:
    """The request's headers by lowercase name (the last of repeated ones)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# --- slow clients ---------------------------------------------------------------------------

TIMED_OUT = "nanochat_request_timeout"  # scope["state"] key set when a body came too slowly


def _raw_response(status: int, reason: str, body: dict) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, bypassing h11's state machine
    (used only right before closing, when h11 may not be in a state to send one)."""
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


def slow_client_protocol(
    header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S
):
    """uvicorn's H11Protocol with deadlines: a request's headers must be complete within
    ``header_timeout`` seconds of the connection opening (or of the previous response
    ending), and its body within ``body_timeout`` seconds of the headers; otherwise the
    client gets 408 (when it has sent part of a request that has no answer yet) and the
    connection is closed. Nothing limits how long the answer takes: once a request is in,
    generation may stream for minutes. Malformed requests get a JSON 400 instead of
    uvicorn's plain-text one. Pass the class as ``uvicorn.run(..., http=cls)``.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientGuard(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._phase: str | None = None  # "headers", "body" or None (request received)
            self._deadline = None
            self._partial = False  # bytes of a request came during the headers phase
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self._phase == "headers" and data:
                self._partial = True
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._set_phase(None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, "Bad Request", openai_error(msg)))
            self.transport.close()

        def _watch(self) -> None:
            """Arm the deadline that fits where the client is in its request."""
            if self.transport.is_closing():
                return self._set_phase(None)
            state = self.conn.their_state
            if state is h11.IDLE:
                self._set_phase("headers")
            elif state is h11.SEND_BODY:
                self._set_phase("body")
            else:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to wait for
                self._set_phase(None)

        def _set_phase(self, phase: str | None) -> None:
            if phase == self._phase:
                return
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase = phase
            self._partial = False
            if phase is not None:
                seconds = header_timeout if phase == "headers" else body_timeout
                self._deadline = self.loop.call_later(seconds, self._expired, phase)

        def _expired(self, phase: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle if phase == "body" else None
            unanswered = cycle is not None and not cycle.response_started
            if unanswered or (phase == "headers" and self._partial):
                what = "headers" if phase == "headers" else "body"
                seconds = header_timeout if phase == "headers" else body_timeout
                message = f"the request {what} did not arrive within {seconds:g} s"
                body = openai_error(message, code="request_timeout")
                self.transport.write(_raw_response(408, "Request Timeout", body))
                if unanswered:
                    cycle.scope.setdefault("state", {})[TIMED_OUT] = what  # for the log
            self._phase = None
            self.transport.close()  # connection_lost tells a waiting app the client is gone

    return SlowClientGuard
