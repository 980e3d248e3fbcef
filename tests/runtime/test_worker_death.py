"""A worker killed mid-generation: its request fails with an error naming the worker, the engine
is marked dead (/health says why), the other workers are stopped, and the server stays up. (Also:
JSON mode, which needs the engine's recogniser beside the sampler, is refused with a clear 400.)"""

import json
import os
import signal
import time

from fbtest import live_server


def _workers_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid == pid and b"finback.runtime.worker" in cmd:
                out.append(int(d))
    return out


def test_a_killed_worker_fails_its_request_and_health_says_so(tmp_path, tiny_chat_gguf):
    import httpx

    args = ("--kv-cache-space-gb", "0.02", "--tensor-parallel-size", "2", "--dtype", "float32")
    with live_server(tmp_path / "models", {"FINBACK_API_KEY": None}, args=args) as s:
        with httpx.Client(base_url=s.url, timeout=120) as client:
            req = {"model": tiny_chat_gguf, "prompt": "Tell me a long story", "raw": True,
                   "options": {"num_predict": 100000, "temperature": 0}}
            r = client.post("/api/generate", json=dict(req, stream=False, options={"num_predict": 4}))
            assert r.status_code == 200, r.text
            workers = _workers_of(s.proc.pid)
            assert len(workers) == 2
            lines = []
            with client.stream("POST", "/api/generate", json=req) as stream:
                for line in stream.iter_lines():
                    lines.append(json.loads(line))
                    if len(lines) == 3:
                        os.kill(workers[1], signal.SIGKILL)
            assert "error" in lines[-1] and "worker 1" in lines[-1]["error"], lines[-1]
            assert not lines[-1].get("done")
            for _ in range(100):
                h = client.get("/health")
                if h.status_code == 503:
                    break
                time.sleep(0.1)
            assert h.status_code == 503
            assert "worker 1 (tensor rank 1 of 2, pipeline stage 0 of 1)" in h.json()["error"]
            assert client.get("/").text == "Ollama is running"
            for _ in range(100):  # the other worker is stopped too
                if not _workers_of(s.proc.pid):
                    break
                time.sleep(0.1)
            assert _workers_of(s.proc.pid) == []
        assert s.proc.poll() is None
