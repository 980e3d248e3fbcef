"""`finback run` as a REPL in a real terminal (tmux): a chat turn, `/set verbose` and the statistics
after the next answer, `\"\"\"` multi-line input, Ctrl-C stopping an answer but not the session, `/bye`."""

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install -y tmux)")


class Pane:
    def __init__(self, command: str):
        self.sock = f"finback-test-{uuid.uuid4().hex[:8]}"
        self.tmux(["new-session", "-d", "-s", "t", "-x", "200", "-y", "200", command])

    def tmux(self, args):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=30)

    def send(self, *keys):
        self.tmux(["send-keys", "-t", "t", *keys])

    def text(self) -> str:
        return self.tmux(["capture-pane", "-p", "-J", "-S", "-2000", "-t", "t"]).stdout

    def wait(self, predicate, seconds=90.0, what=""):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            text = self.text()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{self.text()}")

    def close(self):
        self.tmux(["kill-server"])


def prompts(text: str) -> int:
    return len(re.findall(r"^>>> ", text, re.M))


def test_repl_in_a_terminal(live):
    env = " ".join(f"{k}={shlex.quote(live.env[k])}" for k in ("FINBACK_MODELS", "FINBACK_HOST"))
    cmd = (f"env {env} {shlex.quote(sys.executable)} -m finback.cli.main run smollm2:135m "
           f"--temperature 0 --max-tokens 8; echo EXITED=$?; sleep 120")
    pane = Pane(cmd)
    try:
        pane.wait(lambda t: prompts(t) >= 1, 120, "the first prompt")
        pane.send("Hello!", "Enter")
        t = pane.wait(lambda t: prompts(t) >= 2, 60, "the first answer")
        answer = t.split(">>> Hello!", 1)[1].split(">>> ", 1)[0]
        assert answer.strip() and "eval count" not in t  # no statistics before /set verbose

        pane.send("/set verbose", "Enter")
        pane.wait(lambda t: "Set 'verbose' mode." in t, 20, "/set verbose")
        pane.send('"""', "Enter")
        pane.send("Say hi", "Enter")
        pane.send('to me."""', "Enter")
        t = pane.wait(lambda t: "eval rate:" in t and prompts(t) >= 4, 60, "the statistics")
        for line in ("total duration:", "load duration:", "prompt eval count:", "prompt eval duration:",
                     "prompt eval rate:", "eval count:", "eval duration:", "eval rate:"):
            assert line in t
        assert "... to me." in t  # the multi-line continuation prompt

        # Ctrl-C stops a long answer, not the session
        pane.send("/set parameter num_predict 2000", "Enter")
        pane.wait(lambda t: "Set parameter 'num_predict' to '2000'" in t, 20, "/set parameter")
        before = prompts(pane.text())
        pane.send("Write a very long story about dragons.", "Enter")
        pane.wait(lambda t: len(t.split("dragons.", 1)[-1].strip()) > 10, 60, "the long answer to start")
        pane.send("C-c")
        t = pane.wait(lambda t: prompts(t) > before, 20, "the prompt after Ctrl-C")
        assert len(re.findall(r"^eval rate:", t, re.M)) == 1, t  # the stopped answer has no statistics
        pane.send("/clear", "Enter")
        pane.wait(lambda t: "Cleared session context" in t, 20, "/clear")
        pane.send("/bye", "Enter")
        pane.wait(lambda t: "EXITED=0" in t, 20, "the REPL to exit")
    finally:
        pane.close()
