"""A live `finback serve` per CLI test module, on its own port with its own store."""

import subprocess

import pytest

from cli_helpers import CLI, Env, free_port, wait_up


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_path):
    """A live `finback serve` on a free loopback port with an empty store of its own."""
    root = tmp_path_factory.mktemp("cli")
    store = root / "models"
    store.mkdir()
    port = free_port()
    e = Env(f"http://127.0.0.1:{port}", port, store)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(CLI + ["serve", "--kv-cache-space-gb", "0.3"], env=e.env, stdout=log,
                            stderr=subprocess.STDOUT)
    if not wait_up(e.url, 120, proc):
        proc.kill()
        log.close()
        raise RuntimeError("server did not start: " + (root / "server.log").read_text())
    yield e
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
