"""Limits that keep one client from taking the server down.

- **Request bodies** are read here, before any handler, up to `max_body_bytes` (default 16 MiB,
  `FINBACK_MAX_REQUEST_BODY`): a larger `Content-Length` is refused at once and a chunked body is
  cut off as soon as it passes the limit, both with 413. Blob uploads (`/api/blobs/*`) are not
  limited: their handler streams them to disk.
- **JSON bodies** (every POST/PUT/PATCH/DELETE route but the blob upload) must parse as strict JSON
  (RFC 8259: no NaN/Infinity, no number that overflows to inf, no lone UTF-16 surrogate escape, no
  integer of more than 4300 digits, nesting of at most `MAX_JSON_DEPTH`); otherwise 400 before a
  handler runs. This is what keeps deeply nested or absurd bodies from reaching `json.loads` in the
  handlers and surfacing as 500s (RecursionError, ValueError) or as inf/nan in sampling options.
- **Generation requests** (`POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
  `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`) in flight at once are bounded by
  `max_concurrent_requests` (default 256, `--max-concurrent-requests` /
  `FINBACK_MAX_CONCURRENT_REQUESTS`); one over the bound gets 503
  with `Retry-After: 1` at once (no queue: the engine already queues up to its batch limits, and a
  client that backs off is better than a socket held open). A request counts until its response
  ends (the whole stream).
- **Client disconnects**: a client that goes away mid-stream aborts its request in the engine (the
  handlers' generators are closed, and `AsyncEngine.generate` aborts a request whose stream closes);
  tests/server/test_abuse.py checks the engine is idle again shortly after.
- **Slow clients** are uvicorn's business: idle keep-alive connections are closed after
  `timeout_keep_alive` (5 s), request heads are limited to h11's 16 KiB
  (`h11_max_incomplete_event_size`), and the default bind is 127.0.0.1. uvicorn has no timeout on a
  request head or body that trickles in, nor a connection cap unless `limit_concurrency` is set, so a
  server exposed to untrusted networks belongs behind a reverse proxy (nginx, Caddy) that has them.

- **Unhandled errors** in a handler, before its response started, become a 500 in the route's API's
  error shape (`ErrorMiddleware`) and are logged with their traceback; the connection stays open
  (uvicorn closes a connection whose app raised). Once a stream started, an error can only end it.

Errors are shaped for the API the path belongs to: OpenAI's error object under /v1, Ollama's
`{"error": "..."}` elsewhere. Plain ASGI middleware, so streams pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from array import array
from itertools import accumulate

log = logging.getLogger("finback.server")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_REQUESTS = 256
MAX_JSON_DEPTH = 64
THREAD_CHECK_BYTES = 256 * 1024
PARSED_KEY = "finback.json"  # the checked body, parsed, in the ASGI scope: handlers may reuse it

# the requests that take engine time (embeddings run in the engine thread too)
GENERATION_ROUTES = frozenset({("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"),
                               ("POST", "/api/embeddings"), ("POST", "/v1/chat/completions"),
                               ("POST", "/v1/completions"), ("POST", "/v1/embeddings")})
UNLIMITED_PREFIXES = ("/api/blobs/",)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return n


class BadJSON(ValueError):
    pass


def _reject_constant(name: str):
    raise BadJSON(f"{name} is not valid JSON")


def _finite_float(s: str) -> float:
    f = float(s)
    if math.isinf(f):
        raise BadJSON(f"number {s[:40]} is out of range")
    return f


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(body: bytes) -> int:
    """The bracket nesting depth of a JSON text (strings ignored), at C speed: strings cut out by a
    regex, brackets kept as +1/-1 bytes, the running sum's maximum."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET).translate(_BRACKET_SIGN)
    return max(accumulate(array("b", brackets)), default=0)


def check_json(body: bytes, max_depth: int = MAX_JSON_DEPTH):
    """The parsed body, or BadJSON unless `body` is strict JSON a handler can take. CPU: about one
    json.loads plus a regex pass (a 16 MiB body of tiny lists: ~2 s; run big bodies in a thread)."""
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise BadJSON(f"JSON nested deeper than {max_depth} levels")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"the body is not UTF-8: {exc}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except BadJSON:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, deep nesting
        raise BadJSON(f"invalid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadJSON("JSON strings must not hold lone UTF-16 surrogates") from None
    return obj


def error_body(path: str, status: int, message: str, code: str | None = None) -> bytes:
    if path == "/v1" or path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return json.dumps({"error": message}).encode()


async def send_error(send, path: str, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(path, status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Limiter:
    """The limits and their live counts (one per app; /metrics reads the counts)."""

    def __init__(self, max_body_bytes: int | None = None, max_concurrent_requests: int | None = None):
        self.max_body_bytes = max_body_bytes or env_int("FINBACK_MAX_REQUEST_BODY", DEFAULT_MAX_BODY_BYTES)
        self.max_concurrent_requests = max_concurrent_requests or env_int(
            "FINBACK_MAX_CONCURRENT_REQUESTS", DEFAULT_MAX_CONCURRENT_REQUESTS)
        if self.max_body_bytes <= 0 or self.max_concurrent_requests <= 0:
            raise ValueError("limits must be positive")
        self.in_flight = 0  # generation requests now running
        self.rejected = 0   # generation requests refused with 503


class LimitsMiddleware:
    def __init__(self, app, limiter: Limiter):
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method not in BODY_METHODS or path.startswith(UNLIMITED_PREFIXES):
            return await self.app(scope, receive, send)

        generation = (method, path) in GENERATION_ROUTES
        lim = self.limiter
        if generation and lim.in_flight >= lim.max_concurrent_requests:
            lim.rejected += 1
            return await send_error(send, path, 503, "the server is busy: too many requests in flight, retry later",
                                    code="server_busy", headers=[(b"retry-after", b"1")])
        # count the request from here, so a burst cannot pass the check while reading bodies
        if generation:
            lim.in_flight += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except _TooLarge:
                return await send_error(send, path, 413, f"the request body is larger than {lim.max_body_bytes} bytes",
                                        code="request_too_large")
            if body is None:  # the client went away while sending
                return
            if body.strip():
                try:
                    if len(body) > THREAD_CHECK_BYTES:  # keep the event loop free for other clients
                        scope[PARSED_KEY] = await asyncio.to_thread(check_json, body)
                    else:
                        scope[PARSED_KEY] = check_json(body)
                except BadJSON as exc:
                    return await send_error(send, path, 400, str(exc))

            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later calls: disconnect detection

            await self.app(scope, replay, send)
        finally:
            if generation:
                lim.in_flight -= 1

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.limiter.max_body_bytes
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        raise _TooLarge
                except ValueError:
                    pass  # the server rejects a bad content-length before we see it
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


class ErrorMiddleware:
    """Innermost: an exception that escapes a handler before the response started is logged and
    answered with a 500 in the route's API's shape, instead of reaching uvicorn (plain-text 500, and
    the connection closed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await send_error(send, scope["path"], 500, f"internal error: {type(exc).__name__}: {exc}",
                             code="internal_error")
