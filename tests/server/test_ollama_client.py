"""The official `ollama` Python client, unmodified, drives a live `finback serve` through a
scripted session on the embedded model."""

import json
import urllib.request

import pytest

ollama = pytest.importorskip("ollama")

MODEL = "smollm2:135m"
OPTS = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server[0])


def test_version_and_empty_list(client):
    # the client has no version() call: ask the raw route like the Ollama CLI does
    assert isinstance(client.list().models, list)


def test_pull_show_list(client):
    statuses = [p.status for p in client.pull(MODEL, stream=True)]
    assert statuses[-1] == "success"
    names = [m.model for m in client.list().models]
    assert MODEL in names
    info = client.show(MODEL)
    assert info.details.format == "gguf" and info.details.family == "llama"
    assert "chat_template" in json.dumps(info.modelinfo) or info.template
    assert info.modelfile.startswith("# Modelfile") or "FROM" in info.modelfile


def test_chat_streamed_and_not(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model=MODEL, messages=msgs, options=OPTS, stream=False)
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert 0 < whole.eval_count <= 12 and whole.prompt_eval_count > 0
    assert whole.total_duration > 0 and whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = list(client.chat(model=MODEL, messages=msgs, options=OPTS, stream=True))
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason
    assert "".join(p.message.content for p in parts) == whole.message.content  # greedy: same text


def test_generate(client):
    r = client.generate(model=MODEL, prompt="Name a color.", options=OPTS, stream=False)
    assert r.done and r.response and isinstance(r.context, list) and 0 < r.eval_count <= 12
    parts = list(client.generate(model=MODEL, prompt="Name a color.", options=OPTS, stream=True))
    assert "".join(p.response for p in parts) == r.response


def test_ps_copy_delete(client):
    ps = client.ps().models
    assert any(m.model == MODEL for m in ps)
    client.copy(MODEL, "my-copy:latest")
    assert "my-copy:latest" in [m.model for m in client.list().models]
    client.delete("my-copy:latest")
    assert "my-copy:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("my-copy:latest")
    assert err.value.status_code == 404


def test_create_from_modelfile_fields(client):
    template = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                "<|im_start|>assistant\n")
    client.create(model="pirate:v1", from_=MODEL, template=template, system="You are a pirate.",
                  parameters={"stop": ["<|im_end|>", "Arr"], "temperature": 0, "num_predict": 8})
    info = client.show("pirate:v1")
    assert "You are a pirate." in info.modelfile and info.template == template
    assert info.parameters.count("stop") == 2
    r = client.chat(model="pirate:v1", messages=[{"role": "user", "content": "Hello"}], stream=False)
    assert r.done and r.eval_count <= 8


def test_errors(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    req = urllib.request.Request(server[0] + "/api/chat", data=b"{not json", method="POST")
    try:
        urllib.request.urlopen(req)
        raise AssertionError("expected HTTP 400")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "error" in json.loads(e.read())


def test_raw_requests(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                       "options": OPTS}).encode()
    with urllib.request.urlopen(urllib.request.Request(server[0] + "/api/chat", data=body)) as r:
        obj = json.loads(r.read())
    assert obj["message"]["content"] and obj["done"] is True
    for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
              "eval_duration"):
        assert isinstance(obj[k], int)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "options": OPTS}).encode()
    with urllib.request.urlopen(urllib.request.Request(server[0] + "/api/generate", data=body)) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.read().splitlines()]
    assert len(lines) > 2 and lines[-1]["done"] is True and not lines[0]["done"]
    with urllib.request.urlopen(server[0] + "/api/version") as r:
        assert "version" in json.loads(r.read())


def test_embed(client):
    import math

    r = client.embed(model=MODEL, input=["The cat sat on the mat.", "A cat is sitting on a mat.", "Stock prices fell."])
    a, b, c = r.embeddings
    assert len(a) == 576 and abs(math.sqrt(sum(x * x for x in a)) - 1) < 1e-3
    cos = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert cos(a, b) > cos(a, c)  # similar sentences are closer
    old = client.embeddings(model=MODEL, prompt="The cat sat on the mat.")
    n = math.sqrt(sum(x * x for x in old.embedding))
    assert max(abs(x / n - y) for x, y in zip(old.embedding, a)) < 1e-3


def test_format_json(client):
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
                    format="json", options={"temperature": 0, "num_predict": 60}, stream=False)
    assert r.done_reason == "stop"  # the value closed, then only end-of-sequence was allowed
    assert isinstance(json.loads(r.message.content), dict)
    # cut short by num_predict, the text is still a JSON prefix
    from finback.engine.json_mode import JSONPrefix
    short = client.generate(model=MODEL, prompt="A cat as JSON:", format="json", options={"temperature": 0.7,
                            "num_predict": 5, "seed": 3}, stream=False)
    assert JSONPrefix().feed(short.response.encode())
    schema = {"type": "object", "properties": {"color": {"type": "string"}, "hex": {"type": "string"}},
              "required": ["color", "hex"]}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "A color as JSON."}], format=schema,
                    options={"temperature": 0, "num_predict": 60}, stream=False)
    assert r.done_reason == "stop" and set(json.loads(r.message.content)) == {"color", "hex"}
    with pytest.raises(ollama.ResponseError) as err:  # a schema outside the supported subset
        client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], format={"anyOf": [{"type": "string"}]})
    assert err.value.status_code == 400
