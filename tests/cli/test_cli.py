"""The `finback` command on the embedded model: one-shot chat, raw generation, the REPL, errors."""

import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "finback.cli.main"]
FAST = ["--temperature", "0", "--max-tokens", "12", "--kv-cache-space-gb", "0.2"]


def run(args, stdin=None):
    return subprocess.run(BASE + args, input=stdin, capture_output=True, text=True, timeout=300)


def test_run_one_shot_matches_offline_api(smollm2_path):
    from finback import LLM, SamplingParams

    p = run(["run", "smollm2:135m", "What is the capital of France?", *FAST, "--verbose"])
    assert p.returncode == 0, p.stderr
    llm = LLM(smollm2_path, kv_cache_space_gb=0.2)
    expected = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert p.stdout.strip() == expected.strip() and expected.strip()
    for line in ("total duration:", "load duration:", "prompt eval count:", "prompt eval rate:",
                 "eval count:", "eval duration:", "eval rate:"):
        assert line in p.stderr


def test_repl_reads_turns_until_bye(smollm2_path):
    p = run(["run", "smollm2:135m", *FAST], stdin="Hello!\n/set verbose\nSay hi.\n/bye\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(">>> ") >= 3
    assert p.stderr.count("prompt eval count:") == 1  # statistics only after /set verbose


def test_generate_raw(smollm2_path):
    p = run(["generate", "--model", smollm2_path, "--prompt", "Once upon a time", *FAST])
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip()) > 0


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-model:7b", "hi"], "not found"),
    (["run", "smollm2:135m", "hi", "--max-model-len", "0"], "max_model_len"),
])
def test_errors_are_one_line(args, needle, smollm2_path):
    p = run(args)
    assert p.returncode == 1
    assert needle in p.stderr and "Traceback" not in p.stderr
