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
