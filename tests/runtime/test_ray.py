"""The Ray executor: a local one-node Ray cluster (`ray start --head` on this machine's address,
where Ray's client looks for it; started once for the module) and
`finback serve --distributed-executor-backend ray --tensor-parallel-size 2` answering a request with
the tokens the single-process engine gives."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
from fbtest import free_port, live_server

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    exe = shutil.which("ray")
    if exe is None:
        pytest.skip("the ray command is not installed")
    port = free_port()
    ip = ray.util.get_node_ip_address()
    temp = tempfile.mkdtemp(prefix="fbray", dir="/tmp")  # Ray's socket paths must stay short
    proc = subprocess.Popen([exe, "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(600):
            try:
                socket.create_connection((ip, port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "ray start exited"
                time.sleep(0.2)
        yield f"{ip}:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_serve_tp2_on_ray(ray_cluster, tmp_path, tiny_chat_gguf):
    import httpx

    from finback import LLM
    from finback.server.options import sampling_params

    options = {"temperature": 0, "num_predict": 12}
    args = ("--kv-cache-space-gb", "0.02", "--dtype", "float32", "--tensor-parallel-size", "2",
            "--distributed-executor-backend", "ray")
    # `ray start` turns Ray's token authentication on; a client must be told to use it
    env = {"RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "token", "FINBACK_API_KEY": None}
    with live_server(tmp_path / "models", env, args=args) as s:
        with httpx.Client(base_url=s.url, timeout=300) as client:
            r = client.post("/api/generate", json={"model": tiny_chat_gguf, "prompt": "Once upon a time", "raw": True,
                                                   "stream": False, "options": options})
            assert r.status_code == 200, r.text + open(s.log_path).read()[-3000:]
            body = r.json()
            assert client.get("/health").json()["status"] == "ok"
    context, n = body["context"], body["eval_count"]
    assert n > 0
    llm = LLM(tiny_chat_gguf, dtype="float32", kv_cache_space_gb=0.02)
    expected = llm.generate({"prompt_token_ids": context[:-n]}, sampling_params(options))[0].outputs[0]
    assert context[-n:] == expected.token_ids
    assert body["response"] == expected.text
