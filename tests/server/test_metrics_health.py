"""/metrics (Prometheus text: request counts and latency by route, tokens, engine gauges) and /health
(200 while engines run, 503 naming the model whose engine stopped or failed), in process."""

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from finback.server.app import create_app
from finback.store.store import Store

MODEL = "smollm2:135m"
OPTS = {"num_predict": 4, "temperature": 0}


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_path):
    app = create_app(Store(str(tmp_path_factory.mktemp("metrics-store"))), engine_kwargs={"kv_cache_space_gb": 0.3})
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def scrape(client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?) (\S+)', line)
        assert m, f"not Prometheus text format: {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out


def test_text_format_is_well_formed(client):
    text = client.get("/metrics").text
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            assert name not in names
            names.add(name)
    assert {"finback_http_requests_total", "finback_http_request_duration_seconds", "finback_prompt_tokens_total",
            "finback_generation_tokens_total", "finback_engine_running", "finback_kv_cache_usage_ratio"} <= names
    assert text.endswith("\n")


def test_health_without_models(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_requests_tokens_and_engine_gauges(client):
    before = scrape(client)
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "Say hi.", "stream": False, "options": OPTS})
    assert r.status_code == 200
    body = r.json()
    with client.stream("POST", "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                   "options": OPTS}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    r2 = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4, "temperature": 0})
    usage = r2.json()["usage"]
    assert client.get("/api/tags").status_code == 200
    assert client.get("/api/blobs/sha256:" + "0" * 64).status_code == 405  # only HEAD/POST: still a known route
    assert client.get("/no/such/path").status_code == 404

    final = json.loads(lines[-1])
    after = scrape(client)
    inc = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert inc('finback_http_requests_total{method="POST",route="/api/generate",status="200"}') == 1
    assert inc('finback_http_requests_total{method="POST",route="/api/chat",status="200"}') == 1
    assert inc('finback_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}') == 1
    assert inc('finback_http_requests_total{method="GET",route="/api/tags",status="200"}') == 1
    assert inc('finback_http_requests_total{method="GET",route="/api/blobs/{digest}",status="405"}') == 1
    assert inc('finback_http_requests_total{method="GET",route="other",status="404"}') == 1
    assert inc('finback_http_request_duration_seconds_count{method="POST",route="/api/generate"}') == 1
    # the three generation requests: end-to-end and inter-token latency histograms
    assert inc(f'finback_e2e_request_latency_seconds_count{{model="{MODEL}"}}') == 3
    assert inc(f'finback_inter_token_latency_seconds_count{{model="{MODEL}"}}') >= 1
    assert inc('finback_http_request_duration_seconds_bucket{method="POST",route="/api/generate",le="+Inf"}') == 1
    assert after['finback_http_request_duration_seconds_sum{method="POST",route="/api/generate"}'] > 0
    assert inc('finback_time_to_first_chunk_seconds_count{route="/api/chat"}') == 1
    label = f'{{model="{MODEL}"}}'
    assert inc(f"finback_generation_tokens_total{label}") == (
        body["eval_count"] + final["eval_count"] + usage["completion_tokens"])
    assert inc(f"finback_prompt_tokens_total{label}") == (
        body["prompt_eval_count"] + final["prompt_eval_count"] + usage["prompt_tokens"])
    # engine gauges of the loaded model, idle now
    assert after["finback_models_loaded"] == 1
    assert after[f"finback_engine_up{label}"] == 1
    assert after[f"finback_engine_running{label}"] == 0 and after[f"finback_engine_waiting{label}"] == 0
    assert after[f"finback_engine_requests{label}"] == 0
    assert 0 <= after[f"finback_kv_cache_usage_ratio{label}"] <= 1
    assert after[f"finback_prefix_cache_queries_total{label}"] >= after[f"finback_prefix_cache_hits_total{label}"]
    assert 0 <= after[f"finback_prefix_cache_hit_ratio{label}"] <= 1
    assert after["finback_generation_requests_in_flight"] == 0


def test_streamed_openai_usage_counts(client):
    before = scrape(client)
    with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as s:
        events = [ln[len("data: "):] for ln in s.iter_lines() if ln.startswith("data: ")]
    usage = json.loads(events[-2])["usage"]
    after = scrape(client)
    label = f'{{model="{MODEL}"}}'
    assert after[f"finback_generation_tokens_total{label}"] - before[f"finback_generation_tokens_total{label}"] \
        == usage["completion_tokens"]


def test_health_names_a_model_whose_engine_stopped_or_failed(client):
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False, "options": OPTS})
    assert r.status_code == 200
    assert client.get("/health").json() == {"status": "ok", "models": [{"name": MODEL, "running": True}]}
    loaded = client.app.state.manager.loaded[MODEL]

    # fault injection into the real engine: its next step raises, the engine thread dies as on a
    # real failure (AsyncEngine records the error and fails the waiting requests)
    def broken_step():
        raise RuntimeError("injected fault: device lost")
    loaded.engine.engine.step = broken_step
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False, "options": OPTS})
    assert r.status_code >= 500
    for _ in range(50):
        if not loaded.engine.is_running:
            break
        time.sleep(0.05)
    r = client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "error" and MODEL in body["error"] and "injected fault: device lost" in body["error"]
    assert body["models"] == [{"name": MODEL, "running": False, "error": body["models"][0]["error"]}]
    assert client.head("/health").status_code == 503
    assert scrape(client)[f'finback_engine_up{{model="{MODEL}"}}'] == 0

    # the next request for the model loads it again, and the server is healthy again
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False, "options": OPTS})
    assert r.status_code == 200
    assert client.get("/health").status_code == 200

    # an engine that was stopped (not through an unload) is reported too
    client.app.state.manager.loaded[MODEL].engine.shutdown()
    r = client.get("/health")
    assert r.status_code == 503 and "the engine stopped" in r.json()["error"]
