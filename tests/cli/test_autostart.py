"""With no server at FINBACK_HOST, a client command starts `finback serve` in the background (its log
beside the store) and the next command uses that same server; a server that cannot start is one
clear error."""

import os
import signal
import socket
import time
import urllib.error
import urllib.request

from cli_helpers import Env, free_port, pids_listening


def _terminate(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                              "zombie" not in open(f"/proc/{p}/status").read()
                                              for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_command_starts_the_server(tmp_path):
    (tmp_path / "models").mkdir()
    port = free_port()
    e = Env(f"http://127.0.0.1:{port}", port, tmp_path / "models")
    e.env["FINBACK_API_KEY"] = "test-key"  # the started server inherits it; the CLI sends it
    pids = []
    try:
        p = e.run(["list"])
        pids = pids_listening(port)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
        assert len(pids) == 1
        with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
            assert b"serve" in f.read()
        log = tmp_path / "logs" / "server.log"
        assert log.is_file() and "Uvicorn running" in log.read_text()
        p = e.call(["ps"])  # the next command finds it: no second server
        assert p.returncode == 0 and p.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        assert pids_listening(port) == pids
        try:  # where the server checks keys, a request without one is refused: the CLI sent it
            urllib.request.urlopen(e.url + "/api/tags", timeout=10).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
    finally:
        _terminate(pids)
    assert not pids_listening(port)


def test_a_server_that_cannot_start_is_one_clear_error(tmp_path):
    (tmp_path / "models").mkdir()
    with socket.socket() as squatter:  # holds the port, never answers HTTP
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        e = Env(f"http://127.0.0.1:{port}", port, tmp_path / "models")
        p = e.call(["list"])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the finback server did not start"), p.stderr
    assert str(tmp_path / "logs" / "server.log") in lines[0]
