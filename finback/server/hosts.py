"""Where the server listens / the CLI connects: Ollama's OLLAMA_HOST forms, read under our name
first. Standard library only (the CLI imports it without the server's packages)."""

from __future__ import annotations

import os

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434


def env(name: str, default: str | None = None) -> str | None:
    """FINBACK_X, else Ollama's OLLAMA_X, so existing setups carry over."""
    return os.environ.get(f"FINBACK_{name}") or os.environ.get(f"OLLAMA_{name}") or default


def parse_host(value: str | None) -> tuple[str, str, int]:
    """(scheme, host, port) from host, host:port, :port, http://host:port, [::1]:port.
    ValueError for a bad port."""
    scheme = "http"
    if not value:
        return scheme, DEFAULT_HOST, DEFAULT_PORT
    v = value.strip()
    for s in ("http://", "https://"):
        if v.startswith(s):
            scheme, v = s[:-3], v[len(s):]
    v = v.split("/", 1)[0]
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, port = v.split(":")
    else:
        host, port = v, ""
    try:
        port_n = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"invalid port in host {value!r}") from None
    if not 0 < port_n < 65536:
        raise ValueError(f"invalid port in host {value!r}")
    return scheme, host or DEFAULT_HOST, port_n
