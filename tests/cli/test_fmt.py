"""Ollama's formats (sizes, times, durations, the --verbose block) and the REPL's thinking display,
without a server."""

import datetime as dt

from finback.cli import fmt
from finback.cli.run import Session, parse_option


def test_go_duration():
    assert fmt.go_duration(0) == "0s"
    assert fmt.go_duration(830) == "830ns"
    assert fmt.go_duration(1_500) == "1.5µs"
    assert fmt.go_duration(12_500_000) == "12.5ms"
    assert fmt.go_duration(1_234_567_891) == "1.234567891s"
    assert fmt.go_duration(62_500_000_000) == "1m2.5s"
    assert fmt.go_duration(3_600_000_000_000) == "1h0m0s"


def test_human_bytes_and_time():
    assert fmt.human_bytes(98_389_504) == "98 MB"
    assert fmt.human_bytes(4_683_087_332) == "4.7 GB"
    assert fmt.human_bytes(2_000_000_000) == "2 GB"
    assert fmt.human_bytes(512) == "512 B"
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert fmt.human_time(now - dt.timedelta(seconds=0.2), now=now) == "Less than a second ago"
    assert fmt.human_time(now - dt.timedelta(minutes=3), now=now) == "3 minutes ago"
    assert fmt.human_time(now - dt.timedelta(days=3), now=now) == "3 days ago"
    assert fmt.human_time(now + dt.timedelta(minutes=4, seconds=30), now=now) == "4 minutes from now"
    assert fmt.human_time("2318-01-01T00:00:00+00:00", now=now) == "Forever"
    assert fmt.human_time("2025-12-31T23:59:59.876543219Z", now=now) == "Less than a second ago"


def test_stats_block():
    text = fmt.stats_block({"total_duration": 2_000_000_000, "load_duration": 1_000_000, "prompt_eval_count": 10,
                            "prompt_eval_duration": 500_000_000, "eval_count": 8, "eval_duration": 400_000_000})
    assert text.splitlines() == [
        "total duration:       2s", "load duration:        1ms", "prompt eval count:    10 token(s)",
        "prompt eval duration: 500ms", "prompt eval rate:     20.00 tokens/s", "eval count:           8 token(s)",
        "eval duration:        400ms", "eval rate:            20.00 tokens/s"]


class FakeStream:
    def __init__(self, items):
        self.items, self.closed = items, False

    def __iter__(self):
        return iter(self.items)

    def close(self):
        self.closed = True


class FakeClient:
    def __init__(self, items):
        self.items, self.requests = items, []

    def stream(self, path, body):
        self.requests.append((path, body))
        return FakeStream(self.items)


def test_thinking_is_set_apart_and_the_conversation_goes_on(monkeypatch, capsys):
    items = [{"message": {"role": "assistant", "content": "", "thinking": "Let me see."}, "done": False},
             {"message": {"role": "assistant", "content": "Paris."}, "done": False},
             {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 2,
              "eval_duration": 1_000_000, "total_duration": 2_000_000, "load_duration": 0}]
    client = FakeClient(items)
    s = Session(client, "deepseek-r1:7b", options={"temperature": 0}, system="Be brief.", think=True,
                hide_thinking=False, verbose=True, keep_alive=None, info=None)
    assert s.answer("Capital of France?")
    out = capsys.readouterr()
    assert out.out.index("Thinking...") < out.out.index("Let me see.") < out.out.index("...done thinking.") \
        < out.out.index("Paris.")
    assert "eval rate:" in out.err
    body = client.requests[0][1]
    assert body["think"] is True and body["options"] == {"temperature": 0}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert s.messages[-1] == {"role": "assistant", "content": "Paris."}  # the reasoning is not sent back
    s.hide_thinking = True
    s.answer("Again?")
    assert "Let me see." not in capsys.readouterr().out
    assert len(client.requests[1][1]["messages"]) == 4


def test_repl_commands(capsys):
    s = Session(FakeClient([]), "m", options={}, system=None, think=None, hide_thinking=False, verbose=False,
                keep_alive=None, info={"parameters": "stop <|im_end|>", "template": "T", "system": "",
                                       "license": ""})
    assert not s.command("/set verbose") and s.verbose
    assert not s.command("/set quiet") and not s.verbose
    s.command("/set parameter temperature 0.5")
    s.command('/set parameter stop "<|x|>"')
    s.command("/set parameter stop END")
    assert s.options == {"temperature": 0.5, "stop": ["<|x|>", "END"]}
    s.command("/set system You are a pirate.")
    assert s.system == "You are a pirate."
    s.command("/set think")
    assert s.think is True
    s.command("/set nothink")
    assert s.think is False
    s.messages.append({"role": "user", "content": "x"})
    s.command("/clear")
    assert s.messages == []
    s.command("/show template")
    s.command("/show parameters")
    s.command("/nope")
    out = capsys.readouterr().out
    assert "T\n" in out and "<|im_end|>" in out and "Unknown command '/nope'" in out
    assert s.command("/bye")
    assert parse_option("num_predict", "8") == 8 and parse_option("use_mmap", "true") is True
