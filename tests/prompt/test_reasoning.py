import random

import pytest

from finback.prompt.reasoning import ReasoningSplitter, prompt_opens_reasoning, strip_reasoning

CASES = [
    # (starts inside, stream text, expected reasoning, expected content)
    (True, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n", "The answer is 4."),
    (False, "<think>\nhmm</think>\n\nHi!", "\nhmm", "Hi!"),
    (False, "  <think>x</think>y", "x", "y"),
    (False, "No reasoning here.", "", "No reasoning here."),
    (True, "thinking forever without an end", "thinking forever without an end", ""),
    (False, "<thin", "", "<thin"),
    (False, "Answer with <think> later", "", "Answer with <think> later"),
    (True, "a</think>b<think>c</think>", "a", "b<think>c</think>"),
    (True, "</think>", "", ""),
    (True, "x </thinking> y</think>z", "x </thinking> y", "z"),
]


@pytest.mark.parametrize("start,text,reasoning,content", CASES)
def test_split_whole_and_in_random_pieces(start, text, reasoning, content):
    rng = random.Random(len(text))
    for trial in range(30):
        s = ReasoningSplitter(start_in_reasoning=start)
        pieces, i = [], 0
        while i < len(text):  # split anywhere, including inside tags
            n = 1 if trial == 0 else rng.randint(1, 5)
            pieces.append(text[i:i + n])
            i += n
        got_r, got_c = "", ""
        for p in pieces:
            r, c = s.feed(p)
            got_r, got_c = got_r + r, got_c + c
            # what was emitted is never taken back: a (partial) tag never leaks into either side
            assert reasoning.startswith(got_r) and content.startswith(got_c)
        r, c = s.flush()
        got_r, got_c = got_r + r, got_c + c
        assert (got_r, got_c) == (reasoning, content)
        assert (s.reasoning, s.content) == (reasoning, content)


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜>")
    assert not prompt_opens_reasoning("<think>a</think>b<｜Assistant｜>")


def test_strip_reasoning():
    assert strip_reasoning("<think>\nplan\n</think>\n\nAnswer") == "Answer"
    assert strip_reasoning("plan\n</think>Answer") == "Answer"
    assert strip_reasoning("Just an answer") == "Just an answer"
