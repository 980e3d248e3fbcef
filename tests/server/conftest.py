import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    """A live `finback serve` on a free loopback port with an empty store of its own."""
    store = tmp_path_factory.mktemp("models")
    port = _free_port()
    env = dict(os.environ, FINBACK_MODELS=str(store), FINBACK_HOST=f"127.0.0.1:{port}",
               FINBACK_KEEP_ALIVE="5m")
    log = open(store / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "finback.cli.main", "serve", "--kv-cache-space-gb", "0.3"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as r:
                if r.read() == b"Ollama is running":
                    break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("server did not start: " + (store / "server.log").read_text())
    yield url, store
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
