"""The CLI's side of the HTTP API: where the server is, requests, NDJSON streams, and starting a
server in the background when none answers (as Ollama's app does), so that every terminal shares
one server and one engine.

Standard library only (urllib), so a client command costs no more than importing finback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from finback.server.hosts import DEFAULT_HOST, DEFAULT_PORT, env  # noqa: F401
from finback.server.hosts import parse_host as _parse_host
START_TIMEOUT_S = float(os.environ.get("FINBACK_START_TIMEOUT", "90"))


class CLIError(Exception):
    """An error the CLI reports as one line (`Error: ...`) and exit status 1."""


class APIStatusError(CLIError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def host_setting() -> str | None:
    return env("HOST")


def parse_host(value: str | None) -> tuple[str, str, int]:
    try:
        return _parse_host(value)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def base_url() -> str:
    scheme, host, port = parse_host(host_setting())
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def api_key() -> str | None:
    """The key sent as `Authorization: Bearer` when the server wants one (FINBACK_API_KEY; with
    several comma-separated keys, the first)."""
    keys = [k.strip() for k in (os.environ.get("FINBACK_API_KEY") or "").split(",") if k.strip()]
    return keys[0] if keys else None


def log_path() -> str:
    """Where a server started by the CLI writes its log: beside the model store when
    FINBACK_MODELS / OLLAMA_MODELS names one, else ~/.finback/logs/server.log."""
    models = os.environ.get("FINBACK_MODELS") or os.environ.get("OLLAMA_MODELS")
    if models:
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(models)).rstrip(os.sep))
        return os.path.join(parent, "logs", "server.log")
    return os.path.join(os.path.expanduser("~"), ".finback", "logs", "server.log")


def _error_message(body: bytes, status: int) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("error"):
            err = data["error"]
            return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, UnicodeDecodeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text or f"the server answered HTTP {status}"


class Client:
    def __init__(self, url: str | None = None, timeout: float = 600.0):
        self.url = (url or base_url()).rstrip("/")
        self.timeout = timeout

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, *, data: Any = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None):
        hdrs = dict(headers or {})
        key = api_key()
        if key:
            hdrs.setdefault("Authorization", f"Bearer {key}")
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            msg = _error_message(exc.read(), exc.code)
            exc.close()
            raise APIStatusError(exc.code, msg) from None
        except urllib.error.URLError as exc:
            raise CLIError(f"could not connect to the finback server at {self.url}: {exc.reason}") from None
        except OSError as exc:
            raise CLIError(f"could not connect to the finback server at {self.url}: {exc}") from None

    def json(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        with self._request(method, path, body, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else {}

    def stream(self, path: str, body: Any) -> "Stream":
        return Stream(self._request("POST", path, body))

    # -- liveness and auto-start ---------------------------------------------------------------
    def alive(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=timeout) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def ensure_server(self, serve_args: list[str] | None = None) -> None:
        """Start `finback serve` in the background if nothing answers, and wait for it."""
        if self.alive():
            return
        _, host, _ = parse_host(host_setting())
        if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::1", "::", DEFAULT_HOST):
            raise CLIError(f"could not connect to the finback server at {self.url} "
                           f"(is `finback serve` running there?)")
        log = log_path()
        os.makedirs(os.path.dirname(log), exist_ok=True)
        cmd = [sys.executable, "-m", "finback.cli.main", "serve", *(serve_args or [])]
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=os.path.expanduser("~"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.alive(timeout=0.5):
                return
            if proc.poll() is not None:
                if self.alive(timeout=0.5):  # another CLI's server won the port
                    return
                raise CLIError(f"the finback server did not start (exit status {proc.returncode}); "
                               f"see {log}")
            time.sleep(0.2)
        raise CLIError(f"the finback server did not answer at {self.url} within "
                       f"{START_TIMEOUT_S:.0f}s; see {log}")


class Stream:
    """NDJSON lines of a streamed response; `close()` drops the connection, which makes the
    server abort the request."""

    def __init__(self, resp):
        self.resp = resp

    def __iter__(self) -> Iterator[dict]:
        for line in self.resp:
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise CLIError(f"the server sent a line that is not JSON: {line[:200]!r}") from None
            if isinstance(item, dict) and item.get("error"):
                raise CLIError(str(item["error"]))
            yield item

    def close(self) -> None:
        try:
            fp = getattr(self.resp, "fp", None)
            raw = getattr(fp, "raw", None)
            sock = getattr(raw, "_sock", None)
            if sock is not None:
                import socket

                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.resp.close()
        except Exception:  # closing a broken stream must not raise
            pass

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
