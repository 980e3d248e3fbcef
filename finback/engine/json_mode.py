"""JSON mode: generation constrained to one JSON value (Ollama's `format: "json"`, OpenAI's
`response_format: {"type": "json_object"}`).

`JSONPrefix` is an incremental byte-level JSON recogniser: it accepts exactly the byte strings
that are prefixes of a valid JSON text (RFC 8259) and tells when a complete value has been read.
At each step the runner tries the most likely candidate tokens in order and masks those whose
bytes would leave the JSON grammar; once the value is complete only end-of-sequence tokens remain.
Candidates are the top `CANDIDATES` tokens by logit; when none of them fits (a schema may demand
one exact key), the whole vocabulary is searched.
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


# --------------------------------------------------------------------------- JSON schemas
class SchemaError(ValueError):
    pass


_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_FIRST = {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean",
          ord("n"): "null"}


def check_schema(schema, path: str = "$") -> dict:
    """The subset of JSON Schema we constrain to: `type` (one of the seven), `properties` +
    `required` (objects take only their declared properties, each once; required ones before
    the object closes), `items`, `enum` (of strings, numbers, booleans, null). Anything else that
    would change which texts are valid (anyOf, patterns, ...) is refused with SchemaError."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be an object")
    for key in ("anyOf", "oneOf", "allOf", "not", "$ref", "pattern", "patternProperties", "if", "const"):
        if key in schema:
            raise SchemaError(f"{path}: '{key}' is not supported in JSON schemas yet")
    t = schema.get("type")
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list) or not enum or any(isinstance(v, (dict, list)) for v in enum):
            raise SchemaError(f"{path}: enum must be a non-empty list of strings, numbers, booleans or null")
    elif t not in _TYPES:
        raise SchemaError(f"{path}: type must be one of {sorted(_TYPES)}, got {t!r}")
    if t == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict) or not props:
            raise SchemaError(f"{path}: an object schema needs properties")
        for k, v in props.items():
            check_schema(v, f"{path}.{k}")
        req = schema.get("required", [])
        if not isinstance(req, list) or any(r not in props for r in req):
            raise SchemaError(f"{path}: required must list declared properties")
    if t == "array":
        if "items" not in schema:
            raise SchemaError(f"{path}: an array schema needs items")
        check_schema(schema["items"], f"{path}[]")
    return schema


class SchemaPrefix(JSONPrefix):
    """JSONPrefix that also keeps the text inside a schema (see check_schema)."""

    __slots__ = ("frames", "buf", "pending")

    def __init__(self, schema: dict):
        super().__init__()
        # one frame per open container: [schema, seen keys, current key]; plus the root's schema
        self.frames: list[list] = []
        self.pending = schema   # the schema of the next value to start
        self.buf = b""           # bytes of the current key or enum-constrained scalar

    def copy(self) -> "SchemaPrefix":
        c = SchemaPrefix.__new__(SchemaPrefix)
        c.stack = list(self.stack)
        c.expect, c.lit, c.num, c.esc, c.done, c.key = self.expect, self.lit, self.num, self.esc, self.done, self.key
        c.frames = [[f[0], set(f[1]), f[2]] for f in self.frames]
        c.pending, c.buf = self.pending, self.buf
        return c

    def _byte(self, b: int) -> bool:  # noqa: C901
        before = self.expect
        in_key = before == "string" and self.key
        scalar = self.pending if before in ("string", "number", "literal") and not in_key else None
        starting = before in ("value", "value_or_end") and b not in _WS and not (before == "value_or_end" and b == ord("]"))
        if starting:
            s = self.pending
            kind = "number" if (b == ord("-") or b in _DIGITS) else _FIRST.get(b)
            want = s.get("type")
            if "enum" in s:
                if kind in ("object", "array"):
                    return False
            elif kind != want and not (kind == "number" and want == "integer"):
                return False
        if not super()._byte(b):
            return False
        after = self.expect
        # a scalar with an enum, or an integer: check the bytes so far
        if scalar is not None or (starting and after in ("string", "number", "literal")):
            s = scalar if scalar is not None else self.pending
            if starting or before in ("string", "number", "literal"):
                if "enum" in s:
                    self.buf = (self.buf if not starting else b"") + bytes([b])
                    encs = [_enc(v) for v in s["enum"]]
                    ended = after not in ("string", "number", "literal")
                    text = self.buf if not (ended and before == "number") else self.buf[:-1]
                    if ended:
                        if text not in encs:
                            return False
                        self.buf = b""
                    elif not any(e.startswith(text) for e in encs):
                        return False
                if s.get("type") == "integer" and after == "number" and self.num in ("frac0", "frac", "exp0", "expsign", "exp"):
                    return False
        if starting and after in ("key_or_end", "value_or_end"):  # a container opened
            self.frames.append([self.pending, set(), None])
        # keys
        if before == "key_or_end" and after == "string" or before == "key" and after == "string":
            self.buf = b""
            return self._key_prefix_ok()
        if in_key:
            if after == "colon":  # the key closed
                frame = self.frames[-1]
                key = self.buf.decode("utf-8", "replace")
                props = frame[0]["properties"]
                if key not in props or key in frame[1]:
                    return False
                frame[1].add(key)
                frame[2] = key
                self.buf = b""
            else:
                self.buf += bytes([b])
                return self._key_prefix_ok()
        if after == "value" and before == "colon":
            frame = self.frames[-1]
            self.pending = frame[0]["properties"][frame[2]]
        if after == "value" and before == "comma_or_end" and self.stack and self.stack[-1] == "[":
            self.pending = self.frames[-1][0]["items"]
        if after == "value_or_end":  # an array opened: its first element
            self.pending = self.frames[-1][0]["items"]
        # closing a container
        if b in (ord("}"), ord("]")) and before in ("key_or_end", "value_or_end", "comma_or_end"):
            frame = self.frames.pop()
            if b == ord("}") and set(frame[0].get("required", [])) - frame[1]:
                return False
        if b == ord(",") and before == "comma_or_end" and self.stack[-1] == "{":
            frame = self.frames[-1]
            if not set(frame[0]["properties"]) - frame[1]:
                return False  # no property left to add
        return True

    def _key_prefix_ok(self) -> bool:
        frame = self.frames[-1]
        left = [k for k in frame[0]["properties"] if k not in frame[1]]
        return any(_enc(k)[1:].startswith(self.buf) for k in left)


def _enc(v) -> bytes:
    import json

    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()
