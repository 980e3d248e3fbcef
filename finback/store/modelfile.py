"""Ollama's Modelfile: parse it as Ollama's parser does, and write it back as `ollama show
--modelfile` does.

A Modelfile is a list of instructions, one per line, each a case-insensitive name and a value:

    FROM ./DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf
    TEMPLATE \"\"\"{{ range .Messages }}...{{ end }}\"\"\"
    SYSTEM You are a careful assistant.
    PARAMETER stop "<｜end▁of▁sentence｜>"
    PARAMETER temperature 0.6
    MESSAGE user Hello
    LICENSE \"\"\"MIT License ...\"\"\"

The reader follows Ollama's `parser.ParseFile` rune by rune:

- `#` starts a comment only where an instruction could start; blank lines are skipped; a leading
  byte-order mark is dropped;
- an instruction name is letters only and is followed by a space or tab; `PARAMETER` takes a name
  of letters, digits and `_` (case-sensitive), `MESSAGE` a role (`system`, `user` or `assistant`,
  lower case);
- a value runs to the end of the line and is trimmed, unless it starts with `"` or `\"\"\"`: then it
  runs, across lines, to the first line end where the trimmed text read so far ends with the same
  quote, and the quotes are removed (nothing inside is unescaped);
- characters Go does not count as printable (controls other than tab/CR/LF, format characters
  such as U+200B) are dropped from values, as Ollama drops them.

The values are then checked as Ollama's `CreateRequest` and `api.FormatParams` check them:
parameters are typed (`PARAMETER_TYPES`: integers, floats, booleans; `stop` repeats and collects a
list), an unknown parameter is an error naming it, the parameters Ollama deprecated are ignored with
a warning. finback adds its own refusals, each with the line: `ADAPTER` (LoRA adapters are not
supported), `DRAFT`/`RENDERER`/`PARSER`/`REQUIRES`, more than one `FROM`, an empty `FROM`.

`Modelfile.to_text()` writes `FROM`, `ADAPTER`, `TEMPLATE`, `SYSTEM`, the parameters, `LICENSE`
and `MESSAGE` in that order (Ollama's order), quoting a value only where it must (a line break,
space at either end, a leading quote), with `\"\"\"` when the value holds a `"`, so that
`parse_modelfile(m.to_text()) == m`; a value no Modelfile can hold is an error, not a silent change.

Pure Python, standard library only (and finback's Go value printer for float parameters).
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any

from finback.prompt.gotemplate import go_sprint

__all__ = [
    "DEPRECATED_PARAMETERS",
    "PARAMETER_TYPES",
    "Modelfile",
    "ModelfileError",
    "parse_modelfile",
]

# api.Options and api.Runner, by JSON name: the parameters a Modelfile may set.
PARAMETER_TYPES: dict[str, type] = {
    # runner options (fixed when the model is loaded)
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
    # sampling and prediction
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop": list,
}

# Accepted by Ollama with "warning: parameter X is deprecated", and dropped.
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
                         "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta")

MESSAGE_ROLES = ("system", "user", "assistant")

_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
             "parameter", "message", "requires")
_UNSUPPORTED = ("draft", "renderer", "parser", "requires")

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT32_MAX = 3.4028234663852886e38
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class ModelfileError(ValueError):
    """A Modelfile that cannot be read (or a Modelfile value that cannot be written)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"(line {line}): {message}" if line else message)
        self.line = line
        self.reason = message


@dataclass
class Modelfile:
    """A parsed Modelfile.

    `parameters` maps a parameter name to its typed value (`stop` to a list of strings);
    `messages` are `{"role": ..., "content": ...}` dicts; `license` one entry per LICENSE."""

    from_: str
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    def to_text(self, *, show_name: str | None = None) -> str:
        """The Modelfile as `ollama show --modelfile` writes it (with its comment header when
        `show_name`, the model's name, is given). Raises ModelfileError for a value that cannot
        be written so that it reads back the same."""
        lines: list[str] = []
        if show_name is not None:
            lines += ['# Modelfile generated by "ollama show"',
                      "# To build a new Modelfile based on this, replace FROM with:",
                      f"# FROM {show_name}", ""]
        if not isinstance(self.from_, str) or not self.from_.strip():
            raise ModelfileError("FROM needs a model name or path")
        lines.append("FROM " + _quote(self.from_, "FROM"))
        for adapter in self.adapters:
            lines.append("ADAPTER " + _quote(_need_str(adapter, "ADAPTER"), "ADAPTER"))
        if self.template is not None:
            lines.append("TEMPLATE " + _quote(_need_str(self.template, "TEMPLATE"), "TEMPLATE"))
        if self.system is not None:
            lines.append("SYSTEM " + _quote(_need_str(self.system, "SYSTEM"), "SYSTEM"))
        for name, value in self.parameters.items():
            kind = PARAMETER_TYPES.get(name)
            if kind is None:
                raise ModelfileError(f"unknown parameter '{name}'")
            if kind is list:
                if not isinstance(value, (list, tuple)):
                    raise ModelfileError(f"parameter {name} must be a list of strings")
                for s in value:
                    lines.append(f"PARAMETER {name} " + _quote(_need_str(s, name), name))
            else:
                lines.append(f"PARAMETER {name} " + _format_param(name, kind, value))
        for text in self.license:
            lines.append("LICENSE " + _quote(_need_str(text, "LICENSE"), "LICENSE"))
        for message in self.messages:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in MESSAGE_ROLES:
                raise ModelfileError('message role must be one of "system", "user", or '
                                     f'"assistant", not {role!r}')
            content = _need_str(message.get("content", ""), "MESSAGE")
            lines.append(f"MESSAGE {role} " + _quote(content, "MESSAGE"))
        return "\n".join(lines) + "\n"


def parse_modelfile(text: str | bytes, *, allow_adapters: bool = False) -> Modelfile:
    """Parse a Modelfile. Errors are ModelfileError with the line number.

    ADAPTER lines are read and then refused ("adapters are not supported") unless
    `allow_adapters`, which keeps them in `Modelfile.adapters` (to show a model, say)."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text))
    if not isinstance(text, str):
        raise TypeError(f"a Modelfile is text, not {type(text).__name__}")
    mf = Modelfile(from_="")
    have_from = False
    adapter_line = None
    for name, value, line, role in _scan(text):
        if name == "model":
            if have_from:
                raise ModelfileError("more than one FROM: finback builds a model from one "
                                     "model name or file", line)
            if not value.strip():
                raise ModelfileError("FROM needs a model name or path", line)
            mf.from_ = value
            have_from = True
        elif name == "template":
            mf.template = value
        elif name == "system":
            mf.system = value
        elif name == "license":
            mf.license.append(value)
        elif name == "adapter":
            if not value.strip():
                raise ModelfileError("ADAPTER needs a path", line)
            mf.adapters.append(value)
            adapter_line = adapter_line or line
        elif name == "message":
            mf.messages.append({"role": role, "content": value})
        elif name in _UNSUPPORTED:
            raise ModelfileError(f"{name.upper()} is not supported by finback", line)
        else:  # a parameter
            if name in DEPRECATED_PARAMETERS:
                warnings.warn(f"line {line}: parameter {name} is deprecated and is ignored",
                              stacklevel=2)
                continue
            kind = PARAMETER_TYPES.get(name)
            if kind is None:
                raise ModelfileError(f"unknown parameter '{name}'", line)
            typed = _parse_param(name, kind, value, line)
            if kind is list:
                mf.parameters.setdefault(name, []).append(typed)
            else:
                mf.parameters[name] = typed
    if not have_from:
        raise ModelfileError("no FROM line")
    if mf.adapters and not allow_adapters:
        raise ModelfileError("adapters are not supported", adapter_line)
    return mf


# ----------------------------------------------------------------------------------------------
# Reading: Ollama's rune-by-rune state machine
# ----------------------------------------------------------------------------------------------

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _decode(data: bytes) -> str:
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ModelfileError(f"a Modelfile must be UTF-8 text ({e})") from None


def _is_print(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols, ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _is_space(ch: str) -> bool:
    return ch == " " or ch == "\t"


def _is_newline(ch: str) -> bool:
    return ch == "\r" or ch == "\n"


def _is_alpha(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _trim(s: str) -> str:
    return s.strip(" \t\r\n\v\f\u0085\u00a0")


def _scan(text: str):
    """Yield (name, value, line, role) per instruction; name is "model" for FROM, the parameter
    name for PARAMETER, else the lower-case instruction."""
    if text.startswith("\ufeff"):
        text = text[1:]
    state = _NIL
    buf: list[str] = []
    name = ""
    role = ""
    line = 1
    start_line = 1
    for ch in text:
        # the state this rune moves to (ch is None where the rune is not kept)
        keep: str | None = ch
        if state == _NIL:
            if ch == "#":
                nxt, keep = _COMMENT, None
            elif _is_space(ch) or _is_newline(ch):
                nxt, keep = _NIL, None
            else:
                nxt = _NAME
                start_line = line
        elif state == _NAME:
            if _is_alpha(ch):
                nxt = _NAME
            elif _is_space(ch):
                nxt, keep = _VALUE, None
            else:
                word = "".join(buf)
                if word.lower() in _COMMANDS and _is_newline(ch):
                    raise ModelfileError(f"missing value for {word.upper()}", line)
                raise ModelfileError(_invalid_command(word + ch), line)
        elif state == _VALUE:
            nxt = _NIL if (_is_newline(ch) or _is_space(ch)) else _VALUE
        elif state == _PARAMETER:
            if _is_alpha(ch) or "0" <= ch <= "9" or ch == "_":
                nxt = _PARAMETER
            elif _is_space(ch):
                nxt, keep = _VALUE, None
            else:
                raise ModelfileError(f"missing value for PARAMETER {''.join(buf)}".rstrip(), line)
        elif state == _MESSAGE:
            if _is_alpha(ch):
                nxt = _MESSAGE
            elif _is_space(ch):
                nxt, keep = _VALUE, None
            else:
                raise ModelfileError(f"missing content for MESSAGE {''.join(buf)}".rstrip(), line)
        else:  # comment
            nxt, keep = (_NIL, None) if _is_newline(ch) else (_COMMENT, None)

        if nxt != state:
            if state == _NAME:
                word = "".join(buf)
                lower = word.lower()
                if lower not in _COMMANDS:
                    raise ModelfileError(_invalid_command(word), line)
                if lower == "from":
                    name = "model"
                elif lower == "parameter":
                    nxt = _PARAMETER
                elif lower == "message":
                    nxt = _MESSAGE
                    name = "message"
                else:
                    name = lower
            elif state == _PARAMETER:
                name = "".join(buf)
            elif state == _MESSAGE:
                role = "".join(buf)
                if role not in MESSAGE_ROLES:
                    raise ModelfileError('message role must be one of "system", "user", or '
                                         f'"assistant", not {role!r}', line)
            elif state == _VALUE:
                value, ok = _unquote(_trim("".join(buf)))
                if not ok or _is_space(ch):
                    buf.append(ch)  # the value goes on (a space, or a line inside quotes)
                    if ch == "\n":
                        line += 1
                    continue
                yield name, value, start_line, role
                role = ""
            buf = []
            state = nxt
        if keep is not None and _is_print(keep):
            buf.append(keep)
        if ch == "\n":
            line += 1

    if state == _VALUE:
        value, ok = _unquote(_trim("".join(buf)))
        if not ok:
            raise ModelfileError("unterminated quoted value (it must end with the quotes it "
                                 "starts with)", start_line)
        yield name, value, start_line, role
    elif state in (_NAME, _PARAMETER, _MESSAGE):
        word = "".join(buf)
        if state == _NAME and word.lower() not in _COMMANDS:
            raise ModelfileError(_invalid_command(word), line)
        raise ModelfileError("unexpected end of file: the last instruction has no value", line)


def _invalid_command(word: str) -> str:
    return (f"unknown instruction {word!r}: an instruction must be one of FROM, TEMPLATE, "
            "SYSTEM, PARAMETER, MESSAGE, LICENSE, ADAPTER")


def _parse_param(name: str, kind: type, value: str, line: int) -> Any:
    if kind is int:
        if not _INT_RE.match(value):
            raise ModelfileError(f"invalid int value {value!r} for parameter {name}", line)
        n = int(value)
        if not -(1 << 63) <= n < (1 << 63):
            raise ModelfileError(f"int value {value!r} for parameter {name} is out of range",
                                 line)
        return n
    if kind is float:
        f = _parse_float(value)
        if f is None:
            raise ModelfileError(f"invalid float value {value!r} for parameter {name}", line)
        return f
    if kind is bool:
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ModelfileError(f"invalid bool value {value!r} for parameter {name}", line)
    return value  # a string (stop)


def _parse_float(value: str) -> float | None:
    s = value
    try:
        if s.lstrip("+-")[:2].lower() == "0x":
            f = float.fromhex(s.replace("_", ""))
        elif re.fullmatch(r"[+-]?(?:[0-9](?:_?[0-9])*)?(?:\.(?:[0-9](?:_?[0-9])*)?)?"
                          r"(?:[eE][+-]?[0-9](?:_?[0-9])*)?", s) and any(c.isdigit() for c in s):
            f = float(s)
        else:
            return None
    except (ValueError, OverflowError):
        return None
    if f != f or abs(f) > _FLOAT32_MAX:  # NaN, infinities and what a float32 cannot hold
        return None
    return f


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _need_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ModelfileError(f"{what} value must be a string, not {type(value).__name__}")
    return value


def _reads_back(written: str) -> bool:
    """Whether a written value (after the instruction) reads back whole: no line before its last
    may already close it."""
    buf = []
    for ch in written:
        if _is_newline(ch):
            _, ok = _unquote(_trim("".join(buf)))
            if ok:
                return False
        buf.append(ch)
    return True


def _quote(value: str, what: str) -> str:
    for ch in value:
        if not (_is_print(ch) or ch in " \t\r\n"):
            raise ModelfileError(f"{what} value holds {ch!r}, which a Modelfile cannot carry "
                                 "(Ollama drops such characters)")
    needs = (value == "" or "\n" in value or "\r" in value or value != _trim(value)
             or value.startswith('"'))
    if not needs:
        return value
    if '"' not in value:
        return '"' + value + '"'
    written = '"""' + value + '"""'
    if _reads_back(written):
        return written
    raise ModelfileError(f"{what} value cannot be written in a Modelfile: a line inside it ends "
                         'with """ and would end the value early')


def _format_param(name: str, kind: type, value: Any) -> str:
    if kind is bool:
        if not isinstance(value, bool):
            raise ModelfileError(f"parameter {name} must be a bool, not {type(value).__name__}")
        return "true" if value else "false"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelfileError(f"parameter {name} must be an int, not {type(value).__name__}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelfileError(f"parameter {name} must be a float, not {type(value).__name__}")
    value = float(value)
    if value != value or abs(value) > _FLOAT32_MAX:
        raise ModelfileError(f"parameter {name} must be a finite float32 value")
    return go_sprint(value)
