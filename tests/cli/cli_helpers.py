"""Helpers for the CLI tests: free ports, waiting for a server, finding a server by its port, and
running the `finback` command (as a subprocess or in-process) against a server and store."""

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

CLI = [sys.executable, "-m", "finback.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, seconds: float = 60.0, proc=None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as r:
                if r.read() == b"Ollama is running":
                    return True
        except OSError:
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.1)
    return False


def pids_listening(port: int) -> list[int]:
    """Processes with a listening TCP socket on `port` (from /proc: no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            pass
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


class Env:
    """A server's address and store, and `run(args)` for the CLI pointed at it."""

    def __init__(self, url: str, port: int, store):
        self.url, self.port, self.store = url, port, store
        self.env = dict(os.environ, FINBACK_MODELS=str(store), FINBACK_HOST=f"127.0.0.1:{port}",
                        FINBACK_KEEP_ALIVE="5m")
        self.env.pop("OLLAMA_HOST", None)
        self.env.pop("FINBACK_API_KEY", None)

    def run(self, args, stdin="", timeout=240):
        """The CLI as a subprocess (what a user runs)."""
        return subprocess.run(CLI + list(args), input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def call(self, args, stdin=""):
        """The CLI's `main(args)` in this process, with this server's environment: the same code
        as the command without a Python start-up per call (most tests use this; the subprocess
        path is covered by `run`)."""
        from finback.cli.main import main

        keys = ("FINBACK_MODELS", "FINBACK_HOST", "OLLAMA_HOST", "FINBACK_API_KEY")
        saved = {k: os.environ.get(k) for k in keys}
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        try:
            for k in keys:
                if self.env.get(k) is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = self.env[k]
            sys.stdin = io.StringIO(stdin)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(list(args))
                except SystemExit as exc:
                    rc = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdin = old_stdin
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
