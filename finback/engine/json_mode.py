"""JSON mode: generation constrained to one JSON value (Ollama's `format: "json"`, OpenAI's
`response_format: {"type": "json_object"}`).

`JSONPrefix` is an incremental byte-level JSON recogniser: it accepts exactly the byte strings
that are prefixes of a valid JSON text (RFC 8259) and tells when a complete value has been read.
At each step the runner tries the most likely candidate tokens in order and masks those whose
bytes would leave the JSON grammar; once the value is complete only end-of-sequence tokens remain.
Candidates are the top `CANDIDATES` tokens by logit (a token outside them is never needed in
practice: some whitespace or structural token is always among them).
"""

from __future__ import annotations

CANDIDATES = 256
_WS = b" \t\n\r"
_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"
_LITERALS = (b"true", b"false", b"null")


class JSONPrefix:
    """States: a stack of containers ('{' or '['), plus what is expected next."""

    __slots__ = ("stack", "expect", "lit", "num", "esc", "done", "key")

    def __init__(self):
        self.stack: list[str] = []
        self.expect = "value"   # value | key_or_end | key | colon | comma_or_end | string | number | literal | end
        self.lit = b""          # remaining bytes of a literal being read
        self.num = ""           # number state: sign | int0 | int | frac0 | frac | exp0 | expsign | exp
        self.esc = 0            # in a string: 0 none, 1 after backslash, 2..5 hex digits left + 1
        self.done = False
        self.key = False        # the string being read is an object key

    def copy(self) -> "JSONPrefix":
        c = JSONPrefix.__new__(JSONPrefix)
        c.stack = list(self.stack)
        c.expect, c.lit, c.num, c.esc, c.done, c.key = self.expect, self.lit, self.num, self.esc, self.done, self.key
        return c

    def _value_done(self) -> None:
        if self.stack:
            self.expect = "comma_or_end"
        else:
            self.expect, self.done = "end", True

    def feed(self, data: bytes) -> bool:
        """Consume bytes; False (state then undefined: feed a copy) if they leave the grammar."""
        for b in data:
            if not self._byte(b):
                return False
        return True

    def _byte(self, b: int) -> bool:  # noqa: C901 - one state machine
        e = self.expect
        if e == "string":
            if self.esc == 1:
                if b in b'"\\/bfnrt':
                    self.esc = 0
                    return True
                if b == ord("u"):
                    self.esc = 5
                    return True
                return False
            if self.esc > 1:
                if b in _HEX:
                    self.esc = self.esc - 1 if self.esc > 2 else 0
                    return True
                return False
            if b == ord("\\"):
                self.esc = 1
                return True
            if b == ord('"'):
                if self.key:
                    self.key = False
                    self.expect = "colon"
                else:
                    self._value_done()
                return True
            return b >= 0x20  # control characters must be escaped
        if e == "number":
            n = self.num
            if b in _DIGITS:
                if n == "sign":
                    self.num = "int0" if b == ord("0") else "int"
                elif n == "int0":
                    return False
                elif n in ("frac0", "frac"):
                    self.num = "frac"
                elif n in ("exp0", "expsign", "exp"):
                    self.num = "exp"
                return True
            if b == ord(".") and n in ("int0", "int"):
                self.num = "frac0"
                return True
            if b in b"eE" and n in ("int0", "int", "frac"):
                self.num = "exp0"
                return True
            if b in b"+-" and n == "exp0":
                self.num = "expsign"
                return True
            if n in ("int0", "int", "frac", "exp"):  # the number ended: this byte follows it
                self._value_done()
                return self._byte(b)
            return False
        if e == "literal":
            if self.lit and b == self.lit[0]:
                self.lit = self.lit[1:]
                if not self.lit:
                    self._value_done()
                return True
            return False
        if b in _WS:
            return True
        if e == "end":
            return False
        if e in ("value", "key_or_end", "value_or_end"):
            if e == "key_or_end" and b == ord("}"):
                return self._close("{")
            if e == "value_or_end" and b == ord("]"):
                return self._close("[")
            if e == "key_or_end":
                if b == ord('"'):
                    self.expect, self.key = "string", True
                    return True
                return False
            return self._start_value(b)
        if e == "key":
            if b == ord('"'):
                self.expect, self.key = "string", True
                return True
            return False
        if e == "colon":
            if b == ord(":"):
                self.expect = "value"
                return True
            return False
        if e == "comma_or_end":
            top = self.stack[-1]
            if b == ord(","):
                self.expect = "key" if top == "{" else "value"
                return True
            if (b == ord("}") and top == "{") or (b == ord("]") and top == "["):
                return self._close(top)
            return False
        return False

    def _start_value(self, b: int) -> bool:
        if b == ord("{"):
            self.stack.append("{")
            self.expect = "key_or_end"
        elif b == ord("["):
            self.stack.append("[")
            self.expect = "value_or_end"
        elif b == ord('"'):
            self.expect, self.key = "string", False
        elif b == ord("-") or b in _DIGITS:
            self.expect = "number"
            self.num = "sign" if b == ord("-") else ("int0" if b == ord("0") else "int")
        else:
            for lit in _LITERALS:
                if b == lit[0]:
                    self.expect, self.lit = "literal", lit[1:]
                    return True
            return False
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack.pop()
        self._value_done()
        return True

    @property
    def complete(self) -> bool:
        """A whole value has been read (a number at top level counts once it can end)."""
        return self.done or (not self.stack and self.expect == "number" and self.num in ("int0", "int", "frac", "exp"))


def allowed_tokens(state: JSONPrefix, candidates: list[int], token_bytes: list[bytes],
                   eos_ids: frozenset[int]) -> list[int]:
    """The candidates (in the order given) that keep the text a JSON prefix. End-of-sequence is
    allowed only when the value is complete, and then nothing but whitespace-free EOS is."""
    if state.complete:
        return [t for t in candidates if t in eos_ids] or sorted(eos_ids)
    out = []
    for t in candidates:
        if t in eos_ids:
            continue
        data = token_bytes[t] if t < len(token_bytes) else b""
        if data and state.copy().feed(data):
            out.append(t)
    return out
