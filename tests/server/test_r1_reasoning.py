"""reasoning_content from a model with the real DeepSeek-R1 tokenizer and chat template.

A random model never writes <think>, so the test first fits a tiny Qwen2 (R1 vocabulary) for a few
dozen steps to answer one question R1-style — "<think>…</think>" then the answer — writes it as a
GGUF with the real R1 tokenizer metadata and template, and serves it."""

import json
import urllib.request

import pytest
from fbtest import fit_r1_tiny, live_server

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

QUESTION = "What is 2+2?"
REASONING = "Two plus two is four."
ANSWER = "The answer is 4."


@pytest.fixture(scope="module")
def r1_server(tmp_path_factory, r1_part_path):
    tmp = tmp_path_factory.mktemp("r1")
    path = fit_r1_tiny(r1_part_path, str(tmp / "r1-tiny.gguf"), QUESTION, REASONING, ANSWER)
    with live_server(tmp / "models", {"FINBACK_API_KEY": None},
                     ("--kv-cache-space-gb", "0.1", "--dtype", "float32")) as srv:
        body = json.dumps({"model": "r1-tiny", "from": path, "stream": False}).encode()
        urllib.request.urlopen(urllib.request.Request(srv.url + "/api/create", data=body)).read()
        yield srv.url


def test_openai_reasoning_content(r1_server):
    client = openai.OpenAI(base_url=r1_server + "/v1", api_key="unused")
    kw = dict(model="r1-tiny", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.model_extra["reasoning_content"].strip() == REASONING
    assert r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (msg.model_extra["reasoning_content"], ANSWER)
    raw = client.chat.completions.create(**kw, extra_body={"raw_reasoning": True}).choices[0].message.content
    assert raw.startswith("<think>") and raw.endswith(ANSWER)


def test_ollama_thinking(r1_server):
    client = ollama.Client(host=r1_server)
    r = client.chat(model="r1-tiny", messages=[{"role": "user", "content": QUESTION}], think=True,
                    options={"temperature": 0, "num_predict": 40})
    assert r.message.thinking.strip() == REASONING and r.message.content == ANSWER
