import json
import random

import pytest

from finback.engine.json_mode import JSONPrefix

VALID = ['{}', '[]', '{"a": 1}', '{"a": [1, 2.5, -3e+2, true, false, null], "b": {"c": "d\\n\\u00e9"}}',
         '  [ "x" , {"y":[]} ]  ', '"just a string"', '0', '-0.5E10', '{"k": "emoji 😀 中文"}', 'null']
INVALID = ['{a: 1}', '{"a" 1}', '[1,]', '{"a":1,}', '01', '1.', '--1', '"\x01"', '"\\x"', 'tru e',
           '{"a":1}}', '[}', '{]', '"\\u12G4"', '{"a":1} x']


@pytest.mark.parametrize("text", VALID)
def test_valid_texts_and_all_prefixes(text):
    data = text.encode()
    for cut in range(len(data) + 1):  # every prefix of a valid text is a valid prefix
        assert JSONPrefix().feed(data[:cut]), data[:cut]
    s = JSONPrefix()
    assert s.feed(data) and s.complete
    json.loads(text)  # the reference agrees it is JSON


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts(text):
    data = text.encode()
    s = JSONPrefix()
    ok = s.feed(data)
    assert not (ok and s.complete)
    with pytest.raises(ValueError):
        json.loads(text)


def test_random_strings_agree_with_json_module():
    rng = random.Random(0)
    alphabet = '{}[]":,0123456789-.eE+ tfrueals n\\u"ab'
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        s = JSONPrefix()
        ok = s.feed(text.encode()) and s.complete
        try:
            json.loads(text)
            valid = True
        except ValueError:
            valid = False
        if valid:
            checked += 1
        assert ok == valid, text
    assert checked > 20


from finback.engine.json_mode import SchemaError, SchemaPrefix, check_schema  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb"]}}, "ok": {"type": "boolean"},
    "kind": {"enum": ["cat", "dog", 3, None]}}, "required": ["name", "age"]}
FOLLOWS = ['{"name":"x","age":3}', '{ "age" : 10 , "name" : "Tom" , "tags": ["a", "bb"], "ok": true, "kind": "dog"}',
           '{"name":"x","age":-3,"kind":null}', '{"name":"x","age":3,"kind":3}', '{"name":"x","tags":[],"age":0}']
BREAKS = ['{"name":"x"}', '{"name":1,"age":3}', '{"name":"x","age":3.5}', '{"name":"x","age":3,"extra":1}',
          '{"name":"x","name":"y","age":3}', '{"name":"x","age":3,"tags":["c"]}', '{"name":"x","age":3,"kind":"cow"}',
          '[1]', '{"name":"x","age":3,"ok":"yes"}', '{"name":"x","age":3,"kind":4}', '{"nam":"x","age":1}']


@pytest.mark.parametrize("text", FOLLOWS)
def test_schema_accepts_every_prefix_of_a_conforming_text(text):
    data = text.encode()
    for cut in range(len(data) + 1):
        assert SchemaPrefix(SCHEMA).feed(data[:cut]), data[:cut]
    s = SchemaPrefix(SCHEMA)
    assert s.feed(data) and s.complete


@pytest.mark.parametrize("text", BREAKS)
def test_schema_rejects_texts_that_break_it(text):
    s = SchemaPrefix(SCHEMA)
    assert not (s.feed(text.encode()) and s.complete)


@pytest.mark.parametrize("bad", [{"anyOf": []}, {"type": "object"}, {"type": "array"}, {"type": "thing"},
                                 {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}])
def test_unsupported_schemas_are_refused(bad):
    with pytest.raises(SchemaError):
        check_schema(bad)


def test_generation_follows_the_schema(smollm2_path):
    from finback import LLM, SamplingParams

    llm = LLM(smollm2_path, kv_cache_space_gb=0.1)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "color": {"enum": ["black", "white", "orange"]}},
              "required": ["name", "age", "color"]}
    out = llm.chat([{"role": "user", "content": "Describe a cat as JSON."}],
                   SamplingParams(temperature=0, max_tokens=60, json_schema=schema))[0].outputs[0]
    assert out.finish_reason == "stop"
    obj = json.loads(out.text)
    assert set(obj) == {"name", "age", "color"} and isinstance(obj["age"], int) and obj["color"] in schema[
        "properties"]["color"]["enum"]
