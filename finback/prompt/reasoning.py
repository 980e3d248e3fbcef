"""Split DeepSeek-R1-style reasoning (`<think>…</think>`) from the answer, as text streams in.

The R1 chat templates open `<think>` inside the generation prompt, so generation usually starts
*inside* the block: `prompt_opens_reasoning(prompt)` tells. Tags may arrive split across tokens;
a possible partial tag is held back until it is decided. A block that never closes leaves all the
text as reasoning (the model ran out of tokens while thinking). Only the first block at the start
of the answer counts: a `<think>` appearing later in an answer is answer text.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def prompt_opens_reasoning(prompt: str, open_tag: str = OPEN, close_tag: str = CLOSE) -> bool:
    """True when the prompt ends inside an unclosed reasoning block (the template opened it)."""
    i = prompt.rfind(open_tag)
    return i != -1 and prompt.find(close_tag, i) == -1 and not prompt[i + len(open_tag):].strip()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    def __init__(self, start_in_reasoning: bool = False, open_tag: str = OPEN, close_tag: str = CLOSE):
        self.open_tag, self.close_tag = open_tag, close_tag
        # "start": may still see an opening tag; "reasoning": inside; "content": answer
        self.state = "reasoning" if start_in_reasoning else "start"
        self._buf = ""
        self._strip_next = False  # drop whitespace right after </think>
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Add streamed text; returns (new reasoning, new content) that is decided so far."""
        self._buf += text
        r, c = self._run(final=False)
        self.reasoning += r
        self.content += c
        return r, c

    def flush(self) -> tuple[str, str]:
        """End of the stream: everything held back is decided."""
        r, c = self._run(final=True)
        self.reasoning += r
        self.content += c
        return r, c

    def _run(self, final: bool) -> tuple[str, str]:
        out_r, out_c = [], []
        while self._buf:
            if self.state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.open_tag):
                    self._buf = stripped[len(self.open_tag):]
                    self.state = "reasoning"
                    continue
                if not final and (not stripped or self.open_tag.startswith(stripped)):
                    break  # could still become the opening tag
                self.state = "content"
                continue
            if self.state == "reasoning":
                i = self._buf.find(self.close_tag)
                if i != -1:
                    out_r.append(self._buf[:i])
                    self._buf = self._buf[i + len(self.close_tag):]
                    self.state = "content"
                    self._strip_next = True
                    continue
                keep = 0 if final else _partial_suffix(self._buf, self.close_tag)
                out_r.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            # content
            if self._strip_next:
                stripped = self._buf.lstrip()
                if not stripped and not final:
                    self._buf = ""
                    break
                self._buf = stripped
                self._strip_next = False
            out_c.append(self._buf)
            self._buf = ""
        return "".join(out_r), "".join(out_c)


def strip_reasoning(text: str, open_tag: str = OPEN, close_tag: str = CLOSE) -> str:
    """An assistant message's answer without its reasoning (for history sent back to the model)."""
    i = text.find(close_tag)
    if i != -1 and open_tag not in text[i:]:
        return text[i + len(close_tag):].lstrip()
    return text
