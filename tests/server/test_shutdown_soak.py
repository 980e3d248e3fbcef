"""Graceful shutdown on SIGTERM, and a bounded loopback soak with random disconnects."""

import asyncio
import json
import os
import random
import signal
import time

import httpx

from fbtest import live_server

MODEL = "smollm2:135m"
SOAK_SECONDS = float(os.environ.get("FINBACK_SOAK_SECONDS", "120"))


def test_sigterm_ends_streams_with_a_final_chunk_and_exits_0(tmp_path, smollm2_path):
    srv = live_server(tmp_path, {"FINBACK_API_KEY": None})
    srv.__enter__()
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                "options": {"num_predict": 5000, "temperature": 0.8}}
        lines = []
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            with c.stream("POST", "/api/chat", json=body) as r:
                for line in r.iter_lines():
                    lines.append(json.loads(line))
                    if len(lines) == 3:
                        srv.proc.send_signal(signal.SIGTERM)
        assert lines[-1]["done"] is True and "eval_count" in lines[-1]
        assert len(lines) < 500  # ended early, not after 5000 tokens
        assert srv.proc.wait(timeout=60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.log.close()


def test_soak_64_streams_with_random_disconnects(tmp_path, smollm2_path):
    rng = random.Random(0)
    stats = {"completed": 0, "disconnected": 0, "failed": []}

    async def one(c, i):
        body = {"model": MODEL, "prompt": f"Count to {i % 7 + 3}.", "stream": True,
                "options": {"num_predict": rng.randint(4, 24), "temperature": 0.7, "seed": i}}
        drop_after = rng.randint(1, 6) if rng.random() < 0.25 else None
        n = 0
        try:
            async with c.stream("POST", "/api/generate", json=body) as r:
                if r.status_code != 200:
                    stats["failed"].append(r.status_code)
                    return
                async for line in r.aiter_lines():
                    obj = json.loads(line)
                    n += 1
                    if drop_after is not None and n >= drop_after:
                        stats["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
                    if obj.get("done"):
                        stats["completed"] += 1
                        return
            stats["failed"].append("stream ended without done")
        except httpx.HTTPError as exc:
            stats["failed"].append(repr(exc))

    async def worker(c, w, deadline):
        i = w
        while time.monotonic() < deadline:
            await one(c, i)
            i += 64

    async def main(url):
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            r = await c.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False,
                                                   "options": {"num_predict": 1}})
            assert r.status_code == 200
            deadline = time.monotonic() + SOAK_SECONDS
            await asyncio.gather(*(worker(c, w, deadline) for w in range(64)))
            for _ in range(100):  # aborted requests are released at the next steps
                text = (await c.get("/metrics")).text
                usage = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("finback_kv_cache_usage_ratio")]
                running = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("finback_engine_requests")]
                if usage and max(usage) == 0 and max(running) == 0:
                    return usage, running
                await asyncio.sleep(0.1)
            return usage, running

    with live_server(tmp_path, {"FINBACK_API_KEY": None},
                     ("--kv-cache-space-gb", "0.3", "--no-prefix-caching")) as srv:
        usage, running = asyncio.run(main(srv.url))
        assert srv.proc.poll() is None
    assert not stats["failed"], stats["failed"][:5]
    assert stats["completed"] > 64 and stats["disconnected"] > 0
    assert usage and max(usage) == 0.0 and max(running) == 0.0  # every KV block is free again
