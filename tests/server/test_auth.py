"""API keys: which routes need one, the 401 bodies of each API, CORS preflights without a key,
keys from the environment, and a live server (official clients with the key, nothing of the key
in its log)."""

import time

import pytest
from pathlib import Path
from fastapi.testclient import TestClient

from finback.server.app import create_app
from finback.server.auth import check_key, parse_keys
from finback.store.store import Store

KEYS = ["sk-first-0123456789", "sk-second-abcdef"]
MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(Store(str(tmp_path_factory.mktemp("auth-store"))), api_keys=KEYS)
    with TestClient(app) as c:
        yield c


def test_parse_keys():
    assert parse_keys(" a, b ,,c ") == ["a", "b", "c"]
    assert parse_keys(["x", " y "]) == ["x", "y"]
    assert parse_keys(None) == [] and parse_keys("") == []
    assert check_key([b"b"], [b"a", b"b"]) and not check_key([b"ab"], [b"a", b"b"]) and not check_key([], [b"a"])


@pytest.mark.parametrize("method,path", [("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"),
                                         ("GET", "/health"), ("HEAD", "/health")])
def test_liveness_routes_need_no_key(client, method, path):
    assert client.request(method, path).status_code == 200


def test_v1_needs_a_key_and_answers_openai_shaped(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEYS[0]},
                    {"Authorization": "Bearer " + KEYS[0][:-1]}, {"x-api-key": KEYS[0] + "x"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}
        assert KEYS[0] not in r.text
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_api_needs_a_key_and_answers_ollama_shaped(client):
    for method, path in [("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                         ("POST", "/api/pull"), ("DELETE", "/api/delete"), ("HEAD", "/api/blobs/sha256:" + "0" * 64),
                         ("GET", "/metrics"), ("GET", "/nowhere")]:
        r = client.request(method, path, json={"model": MODEL} if method in ("POST", "DELETE") else None)
        assert r.status_code == 401, (method, path)
        if method != "HEAD":
            assert r.json() == {"error": "unauthorized"}
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_each_key_and_both_headers_work(client):
    for key in KEYS:
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/api/tags", headers={"authorization": f"bearer {key}"}).status_code == 200
        assert client.get("/api/tags", headers={"x-api-key": key}).status_code == 200
    assert client.get("/metrics", headers={"x-api-key": KEYS[1]}).status_code == 200


def test_cors_preflight_needs_no_key(client):
    r = client.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    # an origin outside the allow-list gets no CORS grant
    r = client.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # a refusal still carries CORS headers, so a browser app can read the 401
    r = client.get("/api/tags", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_keys_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINBACK_API_KEY", "envkey1,envkey2")
    store = Store(str(tmp_path))
    with TestClient(create_app(store)) as c:
        assert c.get("/api/tags").status_code == 401
        assert c.get("/api/tags", headers={"Authorization": "Bearer envkey2"}).status_code == 200
    with TestClient(create_app(store, api_keys=[])) as c:  # explicit: no keys, whatever the environment says
        assert c.get("/api/tags").status_code == 200
    monkeypatch.delenv("FINBACK_API_KEY")
    monkeypatch.setenv("OLLAMA_API_KEY", "client-side-key")  # Ollama's client variable must not lock the server
    with TestClient(create_app(store)) as c:
        assert c.get("/api/tags").status_code == 200


# -- a live server with a key ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, smollm2_path):
    from fbtest import live_server

    with live_server(tmp_path_factory.mktemp("models"), {"FINBACK_API_KEY": ",".join(KEYS)}) as srv:
        yield srv.url, Path(srv.log_path)


def test_live_server_with_official_clients_and_no_key_in_the_log(keyed_server):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    url, log_path = keyed_server
    oc = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEYS[1]}"})
    oc.pull(MODEL)
    r = oc.generate(model=MODEL, prompt="Say hi.", options={"num_predict": 4, "temperature": 0})
    assert r.done and r.eval_count <= 4
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=url).list()
    assert e.value.status_code == 401

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[0])
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"

    time.sleep(0.3)
    text = log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in text and "POST /api/generate" in text  # the access log is on
    for key in KEYS:
        assert key not in text
    assert "sk-wrong" not in text and "Bearer" not in text
