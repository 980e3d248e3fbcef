"""API keys: `--api-key` / FINBACK_API_KEY (one key or several, comma-separated).

When keys are configured every route needs one, given as `Authorization: Bearer KEY` (what the
OpenAI SDKs send) or `x-api-key: KEY`, except:
  - the liveness routes `GET/HEAD /`, `GET/HEAD /api/version`, `GET/HEAD /health` (load balancers,
    Ollama clients probing for a server);
  - CORS preflights (`OPTIONS`), which browsers send without credentials.
`/metrics` needs a key too (Prometheus sends one with `authorization: {credentials: KEY}`).

A missing or wrong key gets 401: OpenAI's error body under /v1, Ollama's `{"error": "unauthorized"}`
elsewhere. Keys are compared in constant time against every configured key (no early exit, so the
timing says nothing about which key or how much of it matched) and are never logged: uvicorn's
access log prints the method, path and query only, and nothing here logs headers.

The middleware is plain ASGI (no BaseHTTPMiddleware), so streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Iterable

ENV_VAR = "FINBACK_API_KEY"

# method-independent public paths (GET and HEAD only)
PUBLIC_PATHS = frozenset({"/", "/api/version", "/health"})


def parse_keys(value: str | Iterable[str] | None) -> list[str]:
    """'k1, k2' or ['k1', 'k2'] -> ['k1', 'k2']; blanks dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for k in items:
        if not isinstance(k, str):
            raise ValueError("API keys must be strings")
        k = k.strip()
        if k:
            out.append(k)
    return out


def keys_from_env() -> list[str]:
    # only FINBACK_API_KEY: OLLAMA_API_KEY is what Ollama's *client* uses for ollama.com, and
    # picking it up would lock a local server by surprise
    return parse_keys(os.environ.get(ENV_VAR))


def _token(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and rest.strip():
                found.append(rest.strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found


def check_key(candidates: list[bytes], keys: list[bytes]) -> bool:
    """True if any candidate equals any key. Every pair is compared (constant time per pair)."""
    ok = False
    for c in candidates:
        for k in keys:
            ok |= hmac.compare_digest(c, k)
    return ok


def is_public(method: str, path: str) -> bool:
    return method == "OPTIONS" or (method in ("GET", "HEAD") and path in PUBLIC_PATHS)


def unauthorized_body(path: str) -> dict:
    if path == "/v1" or path.startswith("/v1/"):
        return {"error": {"message": "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return {"error": "unauthorized"}


class APIKeyMiddleware:
    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        if check_key(_token(scope.get("headers") or []), self.keys):
            return await self.app(scope, receive, send)
        body = json.dumps(unauthorized_body(scope["path"])).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="finback"')]})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})
