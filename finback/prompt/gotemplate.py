"""Go's text/template, as Ollama uses it for the TEMPLATE of a Modelfile.

Ollama renders prompts with Go's `text/template` package (template name "", option
`missingkey=zero`, plus its own functions `json`, `currentDate`, `yesterdayDate` and
`toTypeScriptType`). This module is a parser and an interpreter of that language written from
Go's specification and behaviour, so that a Modelfile TEMPLATE renders here byte for byte as it
renders in Ollama:

- the lexer keeps Go's rules: `{{- ` and ` -}}` trim every adjacent space, tab, CR and LF, but only
  with the space beside the dash (`{{-3}}` is the number -3); comments are `{{/* ... */}}` with
  nothing between the delimiter (or its trim marker) and the comment; newlines are allowed inside
  actions; strings take Go's escapes (`\\x` and octal escapes are bytes), raw strings drop CRs;
- the parser keeps Go's grammar and its errors: variables must be declared before use and live until
  the `{{end}}` of the enclosing control, `else if`/`else with` chain, `break`/`continue` only
  inside `range`, functions must exist at parse time, `define`/`template`/`block`;
- the interpreter keeps Go's semantics: truth (false, 0, nil, empty string/list/map are false;
  structs are true), `and`/`or` short-circuit and return the deciding value, `eq a b c` is
  `a==b || a==c` and refuses to compare mixed kinds, maps range in sorted key order, ranging an int
  counts (Go 1.24), a missing map key prints `<no value>`, values print as `fmt.Print` prints them
  (`[a b]`, `map[k:v]`, `1e+06`), `printf` follows `fmt.Sprintf` (verbs, flags, `%!d(string=x)`),
  `len` of a string counts UTF-8 bytes, `json` is `encoding/json.Marshal` (sorted keys, `<` as
  `\\u003c`, `3.0` as `3`).

Python data maps onto Go values: a dict is a `map[string]interface{}`, a list or tuple a
`[]interface{}`, str/int/float/bool are string/int/float64/bool and None is a nil interface.
`GoStruct` stands for a Go struct (fields by name, an unknown field is an error as in Go); Ollama's
own template values (messages, tool calls, tools) are built as such structs by `render_ollama*`.
Nothing in the data is ever called: only values of the types above are read, anything else is an
error, and no template can reach Python.

Every parse or execution error is a `GoTemplateError` (a `ValueError`) whose message follows Go's
("template: :LINE:COL: executing ... at <.X>: can't evaluate field X in type string") and which
carries `line` and `col` (1-based; Go itself prints a 0-based byte column for execution errors
and no column for parse errors).

The Ollama side (`render_ollama`, `render_ollama_chat`, `render_ollama_generate`) follows Ollama's
`template/template.go` and `server/prompt.go`: a template that mentions `.Messages` gets the whole
(collated) conversation in one execution; any other template is executed once per
system/user/assistant turn with `.System`, `.Prompt`, `.Response`, and the last turn is cut right
after its `{{ .Response }}`; a template that mentions neither `.Messages` nor `.Response` gets a
`{{ .Response }}` appended, as Ollama's `template.Parse` does.

Standard library only.
"""

from __future__ import annotations

import bisect
import datetime
import math
import unicodedata
import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = [
    "GoStruct",
    "GoTemplate",
    "GoTemplateError",
    "go_json",
    "go_sprint",
    "go_sprintf",
    "ollama_chat_messages",
    "render_ollama",
    "render_ollama_chat",
    "render_ollama_generate",
]


class GoTemplateError(ValueError):
    """A parse or execution error of a Go template; `line`/`col` are 1-based (None if unknown)."""

    def __init__(self, message: str, *, line: int | None = None, col: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.line = line
        self.col = col
        self.reason = reason if reason is not None else message


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


class _Invalid:
    """Go's zero reflect.Value: what a missing map key or a nil pipeline result is."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no value>"

    def __bool__(self) -> bool:
        return False


class _Missing:
    """No final argument from a previous pipeline stage."""

    __slots__ = ()


_INVALID = _Invalid()
_MISSING = _Missing()


class GoStruct:
    """A Go struct value: fields by (exported) name, in declaration order.

    `go_type` names the type in error messages (e.g. "*template.templateMessage"); `json_fields` is
    the `encoding/json` layout as (field, key, omitempty) triples (default: every field under its Go
    name); `json_string=True` gives the type a `String()` method returning its JSON, so that
    printing it prints JSON (as Ollama's tool types do); `pointer=True` makes `fmt` print it as
    `&{...}`."""

    __slots__ = ("go_type", "fields", "json_fields", "json_string", "pointer")

    def __init__(self, go_type: str, fields: Mapping[str, Any], *, json_fields=None,
                 json_string: bool = False, pointer: bool = False):
        self.go_type = go_type
        self.fields = dict(fields)
        self.json_fields = tuple(json_fields) if json_fields is not None else tuple(
            (name, name, False) for name in self.fields)
        self.json_string = json_string
        self.pointer = pointer

    def __repr__(self) -> str:
        return f"GoStruct({self.go_type!r}, {self.fields!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GoStruct) and other.go_type == self.go_type
                and other.fields == self.fields)

    __hash__ = None  # type: ignore[assignment]


class _GoNil:
    """A typed nil slice or map (len 0, prints `[]`/`map[]`, marshals to `null`)."""

    __slots__ = ("go_type", "kind")

    def __init__(self, go_type: str, kind: str):
        self.go_type = go_type
        self.kind = kind  # "slice" | "map"

    def __repr__(self) -> str:
        return f"nil({self.go_type})"


class _JSONMap(dict):
    """A Go map type whose String() is its JSON (Ollama's templateArgs / templateProperties)."""

    go_type = "map[string]interface {}"
    sort_keys = True
    is_nil = False


class _JSONList(list):
    """A Go slice type whose String() is its JSON (Ollama's templateTools)."""

    go_type = "[]interface {}"
    is_nil = False


class _PropertyType(list):
    """Ollama's api.PropertyType: a []string that prints and marshals as a string when alone."""

    go_type = "api.PropertyType"


def _kind(v: Any) -> str:
    if v is _INVALID:
        return "invalid"
    if v is None:
        return "nil"
    t = type(v)
    if t is bool:
        return "bool"
    if t is str:
        return "string"
    if t is int:
        return "int"
    if t is float:
        return "float"
    if isinstance(v, GoStruct):
        return "struct"
    if isinstance(v, _GoNil):
        return "gonil"
    if isinstance(v, dict):
        return "map"
    if isinstance(v, (list, tuple)):
        return "slice"
    if t is complex:
        return "complex"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, str):
        return "string"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    raise _Unsupported(v)


class _Unsupported(Exception):
    def __init__(self, value: Any):
        super().__init__(
            f"unsupported value of Python type {type(value).__name__} in template data")


def _go_type(v: Any) -> str:
    k = _kind(v)
    if k == "nil" or k == "invalid":
        return "interface {}"
    if k in ("struct", "gonil"):
        return v.go_type
    if isinstance(v, (_JSONMap, _JSONList, _PropertyType)):
        return v.go_type
    return {"bool": "bool", "string": "string", "int": "int", "float": "float64",
            "complex": "complex128", "map": "map[string]interface {}",
            "slice": "[]interface {}"}[k]


def _is_true(v: Any) -> tuple[bool, bool]:
    """Go's isTrue: (truth, ok)."""
    k = _kind(v)
    if k in ("invalid", "nil", "gonil"):
        return False, True
    if k == "bool":
        return bool(v), True
    if k in ("int", "float", "complex"):
        return v != 0, True
    if k in ("string", "map", "slice"):
        return len(v) > 0, True
    return True, True  # struct (or pointer to struct): always true


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------------------
# fmt: Go's fmt.Sprint / Sprintln / Sprintf over the values above
# ----------------------------------------------------------------------------------------------


def _go_is_print(ch: str) -> bool:
    """unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    if ch == " ":
        return True
    return unicodedata.category(ch)[0] in "LMNPS"


def _quote_rune_into(out: list[str], ch: str, quote: str, ascii_only: bool) -> None:
    if ch == quote or ch == "\\":
        out.append("\\" + ch)
        return
    o = ord(ch)
    if ascii_only:
        if o < 0x80 and _go_is_print(ch):
            out.append(ch)
            return
    elif _go_is_print(ch):
        out.append(ch)
        return
    simple = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
              "\v": "\\v"}
    if ch in simple:
        out.append(simple[ch])
    elif o < 0x20 or o == 0x7F:
        out.append("\\x%02x" % o)
    elif 0xD800 <= o <= 0xDFFF:
        out.append("\\ufffd")
    elif o < 0x10000:
        out.append("\\u%04x" % o)
    else:
        out.append("\\U%08x" % o)


def _go_quote(s: str, ascii_only: bool = False) -> str:
    """strconv.Quote (or QuoteToASCII)."""
    out = ['"']
    for ch in s:
        _quote_rune_into(out, ch, '"', ascii_only)
    out.append('"')
    return "".join(out)


def _go_quote_rune(r: int, ascii_only: bool = False) -> str:
    if r > 0x10FFFF or 0xD800 <= r <= 0xDFFF or r < 0:
        r = 0xFFFD
    out = ["'"]
    _quote_rune_into(out, chr(r), "'", ascii_only)
    out.append("'")
    return "".join(out)


def _can_backquote(s: str) -> bool:
    for ch in s:
        if ch == "`" or ch == "\ufeff":
            return False
        if (ord(ch) < 0x20 and ch != "\t") or ch == "\x7f":
            return False
    return True


def _float_digits(f: float) -> tuple[str, int]:
    """Shortest decimal digits of |f| (f finite, nonzero) and Go's decimal point position dp:
    |f| = 0.DIGITS x 10^dp."""
    r = repr(abs(f))
    mant, _, exp = r.partition("e")
    e = int(exp) if exp else 0
    intpart, _, frac = mant.partition(".")
    digits = (intpart + frac).lstrip("0")
    lead_zeros = len(intpart + frac) - len((intpart + frac).lstrip("0"))
    dp = len(intpart) + e - lead_zeros
    digits = digits.rstrip("0")
    if not digits:
        return "0", 1
    return digits, dp


def _fmt_e_digits(digits: str, dp: int, upper: bool = False) -> str:
    exp = dp - 1
    s = digits[0]
    if len(digits) > 1:
        s += "." + digits[1:]
    sign = "-" if exp < 0 else "+"
    e = abs(exp)
    return s + ("E" if upper else "e") + sign + ("%02d" % e)


def _fmt_f_digits(digits: str, dp: int) -> str:
    if dp <= 0:
        return "0." + "0" * (-dp) + digits
    if dp >= len(digits):
        return digits + "0" * (dp - len(digits))
    return digits[:dp] + "." + digits[dp:]


def _format_float(f: float, verb: str = "g", prec: int = -1) -> str:
    """strconv.FormatFloat(f, verb, prec, 64) for verbs e E f F g G (prec -1: shortest)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    neg = math.copysign(1.0, f) < 0
    sign = "-" if neg else ""
    if prec >= 0:
        if verb in "gG" and prec == 0:
            prec = 1
        s = format(abs(f), f".{prec}{verb}")
        return sign + s
    if f == 0:
        digits, dp = "0", 1
    else:
        digits, dp = _float_digits(f)
    if verb in "eE":
        return sign + _fmt_e_digits(digits, dp, verb == "E")
    if verb in "fF":
        return sign + _fmt_f_digits(digits, dp)
    # 'g' shortest: %e when exp < -4 || exp >= 6 (Go uses precision 6 for this decision)
    exp = dp - 1 if f != 0 else 0
    if exp < -4 or exp >= 6:
        return sign + _fmt_e_digits(digits, dp, verb == "G")
    if f == 0:
        return sign + "0"
    return sign + _fmt_f_digits(digits, dp)


class _Printer:
    """A Go `fmt` printer (the pp type): printArg / printValue and doPrintf."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self._clear()

    def _clear(self) -> None:
        self.plus = self.minus = self.sharp = self.space = self.zero = False
        self.plus_v = self.sharp_v = False
        self.wid: int | None = None
        self.prec: int | None = None

    # padding ----------------------------------------------------------------------------------
    def _pad(self, s: str, zero_ok: bool = True) -> None:
        if self.wid is None or self.wid <= len(s):
            self.buf.append(s)
            return
        n = self.wid - len(s)
        if self.minus:
            self.buf.append(s + " " * n)
        elif self.zero and zero_ok:
            self.buf.append("0" * n + s)
        else:
            self.buf.append(" " * n + s)

    # error forms ------------------------------------------------------------------------------
    def _bad_verb(self, verb: str, arg: Any) -> None:
        self.buf.append("%!" + verb + "(")
        if arg is None or arg is _INVALID:
            self.buf.append("<nil>")
        else:
            self.buf.append(_go_type(arg) + "=")
            self.print_arg(arg, "v")  # Go keeps the flags and width here
        self.buf.append(")")

    # scalars ----------------------------------------------------------------------------------
    def _fmt_bool(self, v: bool, verb: str) -> None:
        if verb in "tv":
            self._pad("true" if v else "false", zero_ok=False)
        else:
            self._bad_verb(verb, v)

    def _fmt_integer(self, v: int, verb: str, arg: Any) -> None:
        if verb == "v":
            verb = "d"
        if verb == "c":
            self._pad(chr(v) if 0 <= v <= 0x10FFFF and not 0xD800 <= v <= 0xDFFF else "\ufffd")
            return
        if verb == "q":
            self._pad(_go_quote_rune(v, self.plus))
            return
        if verb == "U":
            s = "U+%04X" % v if v >= 0 else "U+-%04X" % -v
            if self.sharp and 0 <= v <= 0x10FFFF and _go_is_print(chr(v)):
                s += " '" + chr(v) + "'"
            self._pad(s)
            return
        bases = {"d": 10, "b": 2, "o": 8, "O": 8, "x": 16, "X": 16}
        if verb not in bases:
            self._bad_verb(verb, arg)
            return
        base = bases[verb]
        neg = v < 0
        u = -v if neg else v
        if self.prec is not None:
            prec = self.prec
            if prec == 0 and u == 0:
                saved, self.zero = self.zero, False
                self._pad("")
                self.zero = saved
                return
        elif self.zero and self.wid is not None and not self.minus:
            prec = self.wid
            if neg or self.plus or self.space:
                prec -= 1
        else:
            prec = 1
        if base == 10:
            digits = str(u)
        elif base == 2:
            digits = format(u, "b")
        elif base == 8:
            digits = format(u, "o")
        else:
            digits = format(u, "x" if verb == "x" else "X")
        if len(digits) < prec:
            digits = "0" * (prec - len(digits)) + digits
        prefix = ""
        if self.sharp:
            if base == 2:
                prefix = "0b"
            elif base == 8 and not digits.startswith("0"):
                prefix = "0"
            elif base == 16:
                prefix = "0x" if verb == "x" else "0X"
        if verb == "O":
            prefix = "0o"
        sign = "-" if neg else ("+" if self.plus else (" " if self.space else ""))
        saved, self.zero = self.zero, False
        self._pad(sign + prefix + digits)
        self.zero = saved

    def _fmt_float(self, v: float, verb: str, arg: Any) -> None:
        if verb == "v":
            verb, prec = "g", -1
        elif verb in "bgGxX":
            prec = -1
        elif verb in "eEfF":
            prec = 6
        else:
            self._bad_verb(verb, arg)
            return
        if verb in "bxX":
            self._bad_verb(verb, arg)  # hex/binary float forms are not supported here
            return
        if self.prec is not None:
            prec = self.prec
        s = _format_float(v, verb, prec)
        if self.sharp and verb in "gG" and "." not in s and "e" not in s.lower() and \
                s[-1:].isdigit():
            s += "."
        if s[0] not in "+-":
            if self.plus:
                s = "+" + s
            elif self.space:
                s = " " + s
        elif s[0] == "+" and not self.plus:  # +Inf without the plus flag
            s = (" " if self.space else "") + s[1:]
        if math.isinf(v) or math.isnan(v):
            saved, self.zero = self.zero, False
            self._pad(s)
            self.zero = saved
            return
        if self.zero and self.wid is not None and not self.minus and len(s) < self.wid and \
                s[0] in "+- ":
            self.buf.append(s[0] + "0" * (self.wid - len(s)) + s[1:])
            return
        self._pad(s)

    def _fmt_complex(self, v: complex, verb: str, arg: Any) -> None:
        if verb not in "vbgGxXfFeE":
            self._bad_verb(verb, arg)
            return
        saved_wid, saved_plus = self.wid, self.plus
        self.wid = None
        self.buf.append("(")
        self._fmt_float(v.real, verb, arg)
        self.plus = True
        self._fmt_float(v.imag, verb, arg)
        self.buf.append("i)")
        self.wid, self.plus = saved_wid, saved_plus

    def _fmt_string(self, s: str, verb: str) -> None:
        if verb == "v":
            if self.sharp_v:
                self._pad(_go_quote(s))
            else:
                self._fmt_s(s)
        elif verb == "s":
            self._fmt_s(s)
        elif verb in "xX":
            data = s.encode("utf-8", "replace")
            if self.prec is not None:
                data = data[: self.prec]
            digits = "0123456789abcdef" if verb == "x" else "0123456789ABCDEF"
            parts = []
            for i, b in enumerate(data):
                piece = digits[b >> 4] + digits[b & 15]
                if self.sharp and (self.space or i == 0):
                    piece = ("0x" if verb == "x" else "0X") + piece
                if self.space and i > 0:
                    piece = " " + piece
                parts.append(piece)
            self._pad("".join(parts))
        elif verb == "q":
            if self.prec is not None:
                s = s[: self.prec]
            if self.sharp and _can_backquote(s):
                self._pad("`" + s + "`")
            else:
                self._pad(_go_quote(s, self.plus))
        else:
            self._bad_verb(verb, s)

    def _fmt_s(self, s: str) -> None:
        if self.prec is not None:
            s = s[: self.prec]
        self._pad(s)

    # composite values ------------------------------------------------------------------------
    def _stringer(self, v: Any) -> str | None:
        """The String() method of the value, if its Go type has one."""
        if isinstance(v, GoStruct) and v.json_string:
            return _json_or_empty(v)
        if isinstance(v, _JSONList):
            return "null" if v.is_nil else _json_or_empty(v)
        if isinstance(v, _JSONMap):
            return _json_or_empty(v) if len(v) else "{}"
        if isinstance(v, _PropertyType):
            if len(v) == 0:
                return ""
            if len(v) == 1:
                return str(v[0])
            return "[" + " ".join(str(x) for x in v) + "]"
        return None

    def print_arg(self, arg: Any, verb: str) -> None:
        if arg is None or arg is _INVALID:
            if verb in "vT":
                self._pad("<nil>", zero_ok=False)
            else:
                self._bad_verb(verb, arg)
            return
        if verb == "T":
            self._fmt_s(_go_type(arg))
            return
        self.print_value(arg, verb, 0)

    def print_value(self, v: Any, verb: str, depth: int) -> None:
        if v is None or v is _INVALID:
            if depth == 0:
                self.buf.append("<invalid reflect.Value>")
            else:
                self._pad("<nil>", zero_ok=False)
            return
        if verb in "vsxXq" and not self.sharp_v:
            s = self._stringer(v)
            if s is not None:
                self._fmt_string(s, verb)
                return
        k = _kind(v)
        if k == "bool":
            self._fmt_bool(v, verb)
        elif k == "int":
            self._fmt_integer(int(v), verb, v)
        elif k == "float":
            self._fmt_float(float(v), verb, v)
        elif k == "complex":
            self._fmt_complex(v, verb, v)
        elif k == "string":
            self._fmt_string(str(v), verb)
        elif k == "gonil":
            if self.sharp_v:
                self.buf.append(v.go_type + "(nil)")
            else:
                self.buf.append("[]" if v.kind == "slice" else "map[]")
        elif k == "map":
            if self.sharp_v:
                self.buf.append(_go_type(v) + "{")
            else:
                self.buf.append("map[")
            for i, key in enumerate(_sorted_keys(v)):
                if i > 0:
                    self.buf.append(", " if self.sharp_v else " ")
                self.print_value(key, verb, depth + 1)
                self.buf.append(":")
                self.print_value(v[key], verb, depth + 1)
            self.buf.append("}" if self.sharp_v else "]")
        elif k == "slice":
            if self.sharp_v:
                self.buf.append(_go_type(v) + "{")
            else:
                self.buf.append("[")
            for i, item in enumerate(v):
                if i > 0:
                    self.buf.append(", " if self.sharp_v else " ")
                self.print_value(item, verb, depth + 1)
            self.buf.append("}" if self.sharp_v else "]")
        else:  # struct
            if v.pointer and depth == 0:
                self.buf.append("&")
            if self.sharp_v:
                self.buf.append(v.go_type.lstrip("*"))
            self.buf.append("{")
            for i, (name, value) in enumerate(v.fields.items()):
                if i > 0:
                    self.buf.append(", " if self.sharp_v else " ")
                if self.plus_v or self.sharp_v:
                    self.buf.append(name + ":")
                self.print_value(value, verb, depth + 1)
            self.buf.append("}")

    # Sprintf ----------------------------------------------------------------------------------
    def do_printf(self, fmt: str, args: list[Any]) -> None:
        end = len(fmt)
        argnum = 0
        after_index = False
        reordered = False
        i = 0
        while i < end:
            good_argnum = True
            last = i
            while i < end and fmt[i] != "%":
                i += 1
            if i > last:
                self.buf.append(fmt[last:i])
            if i >= end:
                break
            i += 1
            self._clear()
            while i < end:
                c = fmt[i]
                if c == "#":
                    self.sharp = True
                elif c == "0":
                    self.zero = not self.minus
                elif c == "+":
                    self.plus = True
                elif c == "-":
                    self.minus = True
                    self.zero = False
                elif c == " ":
                    self.space = True
                else:
                    break
                i += 1
            argnum, i, after_index, ok = self._arg_number(argnum, fmt, i, len(args))
            reordered = reordered or after_index
            good_argnum = good_argnum and ok
            if i < end and fmt[i] == "*":
                i += 1
                wid, ok_w, argnum = self._int_from_arg(args, argnum)
                if not ok_w:
                    self.buf.append("%!(BADWIDTH)")
                    wid = None
                elif wid < 0:
                    self.minus = True
                    self.zero = False
                    wid = -wid
                self.wid = wid
                after_index = False
            else:
                start = i
                while i < end and fmt[i] in "0123456789":
                    i += 1
                if i > start:
                    self.wid = int(fmt[start:i])
                    if after_index:
                        good_argnum = False
            if i < end and fmt[i] == ".":
                i += 1
                if after_index:
                    good_argnum = False
                argnum, i, after_index, ok = self._arg_number(argnum, fmt, i, len(args))
                reordered = reordered or after_index
                good_argnum = good_argnum and ok
                if i < end and fmt[i] == "*":
                    i += 1
                    prec, ok_p, argnum = self._int_from_arg(args, argnum)
                    if prec is not None and prec < 0:
                        prec, ok_p = None, False
                    if not ok_p:
                        self.buf.append("%!(BADPREC)")
                    self.prec = prec if ok_p else None
                    after_index = False
                else:
                    start = i
                    while i < end and fmt[i] in "0123456789":
                        i += 1
                    self.prec = int(fmt[start:i]) if i > start else 0
            if not after_index:
                argnum, i, after_index, ok = self._arg_number(argnum, fmt, i, len(args))
                reordered = reordered or after_index
                good_argnum = good_argnum and ok
            if i >= end:
                self.buf.append("%!(NOVERB)")
                break
            verb = fmt[i]
            i += 1
            if verb == "%":
                self.buf.append("%")
            elif not good_argnum:
                self.buf.append("%!" + verb + "(BADINDEX)")
            elif argnum >= len(args):
                self.buf.append("%!" + verb + "(MISSING)")
            else:
                if verb == "v":
                    self.sharp_v, self.sharp = self.sharp, False
                    self.plus_v, self.plus = self.plus, False
                self.print_arg(args[argnum], verb)
                argnum += 1
        if not reordered and argnum < len(args):
            self._clear()
            self.buf.append("%!(EXTRA ")
            for j, arg in enumerate(args[argnum:]):
                if j > 0:
                    self.buf.append(", ")
                if arg is None or arg is _INVALID:
                    self.buf.append("<nil>")
                else:
                    self.buf.append(_go_type(arg) + "=")
                    self.print_arg(arg, "v")
            self.buf.append(")")

    @staticmethod
    def _arg_number(argnum: int, fmt: str, i: int, numargs: int):
        if i >= len(fmt) or fmt[i] != "[":
            return argnum, i, False, True
        j = i + 1
        while j < len(fmt) and fmt[j] != "]":
            j += 1
        if j >= len(fmt):
            return argnum, i + 1, False, False
        text = fmt[i + 1: j]
        if not text.isdigit() or not text.isascii():
            return argnum, j + 1, False, False
        index = int(text) - 1
        if 0 <= index < numargs:
            return index, j + 1, True, True
        return argnum, j + 1, True, False

    @staticmethod
    def _int_from_arg(args: list[Any], argnum: int):
        if argnum < len(args):
            a = args[argnum]
            if _kind(a) == "int":
                return int(a), True, argnum + 1
            return None, False, argnum + 1
        return None, False, argnum


def _is_go_string(a: Any) -> bool:
    return a is not None and a is not _INVALID and _kind(a) == "string"


def go_sprint(*args: Any) -> str:
    """fmt.Sprint: spaces between operands when neither is a string."""
    p = _Printer()
    prev_string = False
    for i, arg in enumerate(args):
        is_string = _is_go_string(arg)
        if i > 0 and not is_string and not prev_string:
            p.buf.append(" ")
        p._clear()
        p.print_arg(arg, "v")
        prev_string = is_string
    return "".join(p.buf)


def go_sprintln(*args: Any) -> str:
    """fmt.Sprintln: always a space between operands, and a newline."""
    p = _Printer()
    for i, arg in enumerate(args):
        if i > 0:
            p.buf.append(" ")
        p._clear()
        p.print_arg(arg, "v")
    p.buf.append("\n")
    return "".join(p.buf)


def go_sprintf(fmt: str, *args: Any) -> str:
    """fmt.Sprintf."""
    p = _Printer()
    p.do_printf(fmt, list(args))
    return "".join(p.buf)


def _sorted_keys(d: dict) -> list:
    """Map keys in fmtsort / template order: numbers numerically, strings by bytes."""
    keys = list(d.keys())

    def order(k):
        kk = _kind(k) if not isinstance(k, (dict, list)) else "other"
        if kk == "bool":
            return (0, int(k), "")
        if kk in ("int", "float"):
            return (1, k, "")
        if kk == "string":
            return (2, 0, k.encode("utf-8", "surrogatepass"))
        return (3, 0, repr(k).encode())

    return sorted(keys, key=order)


# ----------------------------------------------------------------------------------------------
# encoding/json: json.Marshal
# ----------------------------------------------------------------------------------------------


class _JSONError(Exception):
    pass


_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
               "\f": "\\f", "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        rep = _JSON_SHORT.get(ch)
        if rep is not None:
            out.append(rep)
        elif ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_float(f: float) -> str:
    if math.isnan(f) or math.isinf(f):
        raise _JSONError(f"json: unsupported value: {_format_float(f)}")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    a = abs(f)
    if a < 1e-6 or a >= 1e21:
        s = _format_float(f, "e", -1)
        mant, _, exp = s.partition("e")
        if exp.startswith("-0"):
            exp = "-" + exp[2:]
        return mant + "e" + exp
    return _format_float(f, "f", -1)


def _json_empty(v: Any) -> bool:
    k = _kind(v)
    if k in ("invalid", "nil", "gonil"):
        return True
    if k == "bool":
        return not v
    if k in ("int", "float", "complex"):
        return v == 0
    if k in ("string", "map", "slice"):
        return len(v) == 0
    return False


def _json_encode(v: Any, out: list[str], depth: int = 0) -> None:
    if depth > 1000:
        raise _JSONError("json: unsupported value: encountered a cycle")
    k = _kind(v)
    if k in ("invalid", "nil", "gonil"):
        out.append("null")
    elif k == "bool":
        out.append("true" if v else "false")
    elif k == "int":
        out.append(str(int(v)))
    elif k == "float":
        out.append(_json_float(float(v)))
    elif k == "complex":
        raise _JSONError("json: unsupported type: complex128")
    elif k == "string":
        out.append(_json_string(str(v)))
    elif isinstance(v, _PropertyType):
        if len(v) == 1:
            _json_encode(v[0], out, depth + 1)
        else:
            _json_encode(list(v), out, depth + 1)
    elif k == "slice":
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _json_encode(item, out, depth + 1)
        out.append("]")
    elif k == "map" and getattr(v, "is_nil", False):
        out.append("null")
    elif k == "map":
        keys = list(v.keys())
        if getattr(v, "sort_keys", True):
            keys = sorted(keys, key=lambda key: str(key).encode("utf-8", "surrogatepass"))
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(_json_string(str(key) if not isinstance(key, bool) else
                                    ("true" if key else "false")))
            out.append(":")
            _json_encode(v[key], out, depth + 1)
        out.append("}")
    else:  # struct
        out.append("{")
        first = True
        for field, key, omitempty in v.json_fields:
            value = v.fields.get(field)
            if omitempty and _json_empty(value):
                continue
            if not first:
                out.append(",")
            first = False
            out.append(_json_string(key))
            out.append(":")
            _json_encode(value, out, depth + 1)
        out.append("}")


def go_json(value: Any) -> str:
    """encoding/json.Marshal(value) as a string; raises ValueError where Go returns an error."""
    out: list[str] = []
    try:
        _json_encode(value, out)
    except _JSONError as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("json: value nested too deeply") from None
    return "".join(out)


def _json_or_empty(value: Any) -> str:
    """`b, _ := json.Marshal(v); return string(b)`: an error gives the empty string."""
    out: list[str] = []
    try:
        _json_encode(value, out)
    except (_JSONError, RecursionError):
        return ""
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Lexer (text/template/parse/lex.go)
# ----------------------------------------------------------------------------------------------

(T_ERROR, T_BOOL, T_CHAR, T_CHAR_CONSTANT, T_COMPLEX, T_ASSIGN, T_DECLARE, T_EOF, T_FIELD,
 T_IDENTIFIER, T_LEFT_DELIM, T_LEFT_PAREN, T_NUMBER, T_PIPE, T_RAW_STRING, T_RIGHT_DELIM,
 T_RIGHT_PAREN, T_SPACE, T_STRING, T_TEXT, T_VARIABLE) = range(21)
T_KEYWORD = 100
(T_BLOCK, T_BREAK, T_CONTINUE, T_DOT, T_DEFINE, T_ELSE, T_END, T_IF, T_NIL, T_RANGE, T_TEMPLATE,
 T_WITH) = range(101, 113)

_KEYWORDS = {".": T_DOT, "block": T_BLOCK, "break": T_BREAK, "continue": T_CONTINUE,
             "define": T_DEFINE, "else": T_ELSE, "end": T_END, "if": T_IF, "range": T_RANGE,
             "nil": T_NIL, "template": T_TEMPLATE, "with": T_WITH}

_SPACE_CHARS = " \t\r\n"
_LEFT, _RIGHT = "{{", "}}"


def _is_space(ch: str) -> bool:
    return ch in (" ", "\t", "\r", "\n")


def _is_alnum(ch: str) -> bool:
    """Go's isAlphaNumeric: '_', unicode.IsLetter, unicode.IsDigit."""
    if ch == "_":
        return True
    if not ch:
        return False
    if ch.isascii():
        return ch.isalnum()
    cat = unicodedata.category(ch)
    return cat[0] == "L" or cat == "Nd"


def _has_left_trim(src: str, pos: int) -> bool:
    return pos + 1 < len(src) and src[pos] == "-" and _is_space(src[pos + 1])


def _has_right_trim(src: str, pos: int) -> bool:
    return pos + 1 < len(src) and _is_space(src[pos]) and src[pos + 1] == "-"


def _at_right_delim(src: str, pos: int) -> tuple[bool, bool]:
    if _has_right_trim(src, pos) and src.startswith(_RIGHT, pos + 2):
        return True, True
    if src.startswith(_RIGHT, pos):
        return True, False
    return False, False


def _left_trim_len(src: str, pos: int) -> int:
    n = pos
    while n < len(src) and src[n] in _SPACE_CHARS:
        n += 1
    return n - pos


def _fmt_U(ch: str) -> str:
    """%#U of a rune: U+0041 'A'."""
    if not ch:
        return "U+FFFFFFFF"
    o = ord(ch)
    s = "U+%04X" % o
    if _go_is_print(ch):
        s += " '" + ch + "'"
    return s


def _lex(src: str):
    """Yield (type, pos, value) tokens; an error is a T_ERROR token, after which nothing comes."""
    n = len(src)
    pos = start = 0
    while True:
        # -- text, up to the next left delimiter
        x = src.find(_LEFT, pos)
        if x < 0:
            if n > start:
                yield (T_TEXT, start, src[start:])
            yield (T_EOF, n, "")
            return
        trim = 0
        if _has_left_trim(src, x + 2):
            seg = src[start:x]
            trim = len(seg) - len(seg.rstrip(_SPACE_CHARS))
        if x - trim > start:
            yield (T_TEXT, start, src[start:x - trim])
        start = x
        pos = x + 2
        after = 2 if _has_left_trim(src, pos) else 0
        if src.startswith("/*", pos + after):
            # -- comment
            pos += after
            start = pos
            i = src.find("*/", pos + 2)
            if i < 0:
                yield (T_ERROR, start, "unclosed comment")
                return
            pos = i + 2
            delim, trim_right = _at_right_delim(src, pos)
            if not delim:
                yield (T_ERROR, start, "comment ends before closing delimiter")
                return
            if trim_right:
                pos += 2
            pos += 2
            if trim_right:
                pos += _left_trim_len(src, pos)
            start = pos
            continue
        yield (T_LEFT_DELIM, start, _LEFT)
        pos += after
        start = pos
        paren = 0
        # -- inside the action
        while True:
            delim, trim_right = _at_right_delim(src, pos)
            if delim:
                if paren == 0:
                    if trim_right:
                        pos += 2
                    start = pos
                    pos += 2
                    yield (T_RIGHT_DELIM, start, _RIGHT)
                    if trim_right:
                        pos += _left_trim_len(src, pos)
                    start = pos
                    break
                yield (T_ERROR, start, "unclosed left paren")
                return
            if pos >= n:
                yield (T_ERROR, start, "unclosed action")
                return
            r = src[pos]
            pos += 1
            if _is_space(r):
                pos -= 1
                spaces = 0
                while pos < n and _is_space(src[pos]):
                    pos += 1
                    spaces += 1
                # a trim-marked right delimiter starts with a space: leave it for the delimiter
                if _has_right_trim(src, pos - 1) and src.startswith(_RIGHT, pos + 1):
                    pos -= 1
                    if spaces == 1:
                        continue
                yield (T_SPACE, start, src[start:pos])
                start = pos
            elif r == "=":
                yield (T_ASSIGN, start, "=")
                start = pos
            elif r == ":":
                if pos >= n or src[pos] != "=":
                    yield (T_ERROR, start, "expected :=")
                    return
                pos += 1
                yield (T_DECLARE, start, ":=")
                start = pos
            elif r == "|":
                yield (T_PIPE, start, "|")
                start = pos
            elif r == '"':
                pos = _scan_quoted(src, pos, '"')
                if pos < 0:
                    yield (T_ERROR, start, "unterminated quoted string")
                    return
                yield (T_STRING, start, src[start:pos])
                start = pos
            elif r == "`":
                close = src.find("`", pos)
                if close < 0:
                    yield (T_ERROR, start, "unterminated raw quoted string")
                    return
                pos = close + 1
                yield (T_RAW_STRING, start, src[start:pos])
                start = pos
            elif r == "$" or (r == "." and not (pos < n and "0" <= src[pos] <= "9")):
                typ = T_VARIABLE if r == "$" else T_FIELD
                if _at_terminator(src, pos):
                    yield ((T_VARIABLE, start, "$") if r == "$" else (T_DOT, start, "."))
                    start = pos
                    continue
                while pos < n and _is_alnum(src[pos]):
                    pos += 1
                if not _at_terminator(src, pos):
                    yield (T_ERROR, start, "bad character %s" % _fmt_U(src[pos]))
                    return
                yield (typ, start, src[start:pos])
                start = pos
            elif r == "'":
                pos = _scan_quoted(src, pos, "'")
                if pos < 0:
                    yield (T_ERROR, start, "unterminated character constant")
                    return
                yield (T_CHAR_CONSTANT, start, src[start:pos])
                start = pos
            elif r in "+-." or "0" <= r <= "9":
                pos -= 1
                ok, pos = _scan_number(src, pos)
                if not ok:
                    yield (T_ERROR, start, "bad number syntax: %s" % _go_quote(src[start:pos]))
                    return
                if pos < n and src[pos] in "+-":
                    ok, pos = _scan_number(src, pos)
                    if not ok or src[pos - 1] != "i":
                        yield (T_ERROR, start, "bad number syntax: %s" % _go_quote(src[start:pos]))
                        return
                    yield (T_COMPLEX, start, src[start:pos])
                else:
                    yield (T_NUMBER, start, src[start:pos])
                start = pos
            elif _is_alnum(r):
                while pos < n and _is_alnum(src[pos]):
                    pos += 1
                word = src[start:pos]
                if not _at_terminator(src, pos):
                    yield (T_ERROR, start, "bad character %s" % _fmt_U(src[pos]))
                    return
                if word in _KEYWORDS:
                    yield (_KEYWORDS[word], start, word)
                elif word in ("true", "false"):
                    yield (T_BOOL, start, word)
                else:
                    yield (T_IDENTIFIER, start, word)
                start = pos
            elif r == "(":
                paren += 1
                yield (T_LEFT_PAREN, start, "(")
                start = pos
            elif r == ")":
                paren -= 1
                yield (T_RIGHT_PAREN, start, ")")
                start = pos
                if paren < 0:
                    yield (T_ERROR, start, "unexpected right paren %s" % _fmt_U(r))
                    return
            elif ord(r) < 0x80 and _go_is_print(r):
                yield (T_CHAR, start, r)
                start = pos
            else:
                yield (T_ERROR, start, "unrecognized character in action: %s" % _fmt_U(r))
                return


def _at_terminator(src: str, pos: int) -> bool:
    if pos >= len(src):
        return True
    r = src[pos]
    if _is_space(r) or r in ".,|:)(":
        return True
    return src.startswith(_RIGHT, pos)


def _scan_number(src: str, pos: int) -> tuple[bool, int]:
    n = len(src)

    def accept(valid: str) -> bool:
        nonlocal pos
        if pos < n and src[pos] in valid:
            pos += 1
            return True
        return False

    def accept_run(valid: str) -> None:
        nonlocal pos
        while pos < n and src[pos] in valid:
            pos += 1

    accept("+-")
    digits = "0123456789_"
    if accept("0"):
        if accept("xX"):
            digits = "0123456789abcdefABCDEF_"
        elif accept("oO"):
            digits = "01234567_"
        elif accept("bB"):
            digits = "01_"
    accept_run(digits)
    if accept("."):
        accept_run(digits)
    if len(digits) == 11 and accept("eE"):
        accept("+-")
        accept_run("0123456789_")
    if len(digits) == 23 and accept("pP"):
        accept("+-")
        accept_run("0123456789_")
    accept("i")
    if pos < n and _is_alnum(src[pos]):
        return False, pos + 1
    return True, pos


# ----------------------------------------------------------------------------------------------
# Go literals: strconv.Unquote, UnquoteChar, ParseInt, ParseFloat
# ----------------------------------------------------------------------------------------------

_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def _unquote_char(s: str, i: int, quote: str, out: bytearray) -> int:
    """Decode one (possibly escaped) character of s at i into out; return the next index."""
    c = s[i]
    if c == quote and quote in "'\"":
        raise ValueError("invalid syntax")
    if c != "\\":
        out += c.encode("utf-8", "surrogatepass")
        return i + 1
    if i + 1 >= len(s):
        raise ValueError("invalid syntax")
    c = s[i + 1]
    i += 2
    if c in _SIMPLE_ESCAPES:
        out.append(_SIMPLE_ESCAPES[c])
        return i
    if c in "xuU":
        width = {"x": 2, "u": 4, "U": 8}[c]
        digits = s[i:i + width]
        if len(digits) < width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise ValueError("invalid syntax")
        v = int(digits, 16)
        if c == "x":
            out.append(v)
        else:
            if v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                raise ValueError("invalid syntax")
            out += chr(v).encode("utf-8")
        return i + width
    if c in "01234567":
        digits = s[i - 1:i + 2]
        if len(digits) < 3 or any(d not in "01234567" for d in digits):
            raise ValueError("invalid syntax")
        v = int(digits, 8)
        if v > 255:
            raise ValueError("invalid syntax")
        out.append(v)
        return i + 2
    if c in "'\"":
        if c != quote:
            raise ValueError("invalid syntax")
        out.append(ord(c))
        return i
    raise ValueError("invalid syntax")


def _go_unquote(s: str) -> str:
    if len(s) < 2 or s[0] != s[-1] or s[0] not in "\"`":
        raise ValueError("invalid syntax")
    body = s[1:-1]
    if s[0] == "`":
        if "`" in body:
            raise ValueError("invalid syntax")
        return body.replace("\r", "")
    if "\n" in body:
        raise ValueError("invalid syntax")
    out = bytearray()
    i = 0
    while i < len(body):
        i = _unquote_char(body, i, '"', out)
    return out.decode("utf-8", "replace")


def _char_constant(text: str) -> int:
    """strconv.UnquoteChar on a 'x' constant (text includes both quotes)."""
    body = text[1:]
    if not body or body[0] == "'":
        raise ValueError("invalid syntax")
    if body[0] == "\\":
        out = bytearray()
        j = _unquote_char(body, 0, "'", out)
        if body[1] in "x01234567" or len(out) == 1:
            value = out[0]
        else:
            value = ord(out.decode("utf-8"))
    else:
        j = 1
        value = ord(body[0])
    if body[j:] != "'":
        raise ValueError("malformed character constant: %s" % text)
    return value


def _underscore_ok(s: str) -> bool:
    saw = "^"
    i = 0
    if s[:1] in ("+", "-"):
        s = s[1:]
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i = 2
        saw = "0"
        hexa = s[1].lower() == "x"
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9" or (hexa and "a" <= c.lower() <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
        i += 1
    return saw != "_"


def _parse_go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64) without the range check; None on a syntax error."""
    s = text
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if not s:
        return None
    base = 10
    body = s
    if s[0] == "0" and len(s) > 1:
        c = s[1].lower()
        if c == "x" and len(s) >= 3:
            base, body = 16, s[2:]
        elif c == "o" and len(s) >= 3:
            base, body = 8, s[2:]
        elif c == "b" and len(s) >= 3:
            base, body = 2, s[2:]
        else:
            base, body = 8, s[1:]
    if "_" in body and not _underscore_ok(text):
        return None
    body = body.replace("_", "")
    if not body or not all(ch in "0123456789abcdefABCDEF"[: base if base <= 10 else 22]
                           for ch in body):
        return None
    try:
        v = int(body, base)
    except ValueError:
        return None
    return -v if neg else v


def _parse_go_float(text: str) -> float | None:
    s = text
    if "_" in s:
        if not _underscore_ok(s):
            return None
        s = s.replace("_", "")
    body = s.lstrip("+-")
    try:
        if body[:2].lower() == "0x":
            if "p" not in body.lower():
                return None
            v = float.fromhex(body)
            return -v if s.startswith("-") else v
        if not body or not all(ch in "0123456789.eE+-" for ch in body):
            return None
        return float(s)
    except (ValueError, OverflowError):
        return None


# ----------------------------------------------------------------------------------------------
# Parse tree (text/template/parse/node.go)
# ----------------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("pos",)


class _ListNode(_Node):
    __slots__ = ("nodes",)

    def __init__(self, pos: int, nodes=None):
        self.pos = pos
        self.nodes = list(nodes) if nodes else []

    def __str__(self) -> str:
        return "".join(str(n) for n in self.nodes)


class _TextNode(_Node):
    __slots__ = ("text",)

    def __init__(self, pos: int, text: str):
        self.pos = pos
        self.text = text

    def __str__(self) -> str:
        return self.text


class _PipeNode(_Node):
    __slots__ = ("decl", "is_assign", "cmds")

    def __init__(self, pos: int, decl=None, cmds=None, is_assign: bool = False):
        self.pos = pos
        self.decl = list(decl) if decl else []
        self.cmds = list(cmds) if cmds else []
        self.is_assign = is_assign

    def __str__(self) -> str:
        s = ""
        if self.decl:
            s = ", ".join(str(v) for v in self.decl) + (" = " if self.is_assign else " := ")
        return s + " | ".join(str(c) for c in self.cmds)


class _ActionNode(_Node):
    __slots__ = ("pipe",)

    def __init__(self, pos: int, pipe: _PipeNode):
        self.pos = pos
        self.pipe = pipe

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


class _CommandNode(_Node):
    __slots__ = ("args",)

    def __init__(self, pos: int, args=None):
        self.pos = pos
        self.args = list(args) if args else []

    def __str__(self) -> str:
        return " ".join("(" + str(a) + ")" if isinstance(a, _PipeNode) else str(a)
                        for a in self.args)


class _FieldNode(_Node):
    __slots__ = ("ident",)

    def __init__(self, pos: int, ident):
        self.pos = pos
        self.ident = list(ident)

    def __str__(self) -> str:
        return "".join("." + i for i in self.ident)


class _VariableNode(_Node):
    __slots__ = ("ident",)

    def __init__(self, pos: int, ident):
        self.pos = pos
        self.ident = list(ident)

    def __str__(self) -> str:
        return ".".join(self.ident)


class _ChainNode(_Node):
    __slots__ = ("node", "fields")

    def __init__(self, pos: int, node: _Node, fields=None):
        self.pos = pos
        self.node = node
        self.fields = list(fields) if fields else []

    def __str__(self) -> str:
        s = "(" + str(self.node) + ")" if isinstance(self.node, _PipeNode) else str(self.node)
        return s + "".join("." + f for f in self.fields)


class _IdentifierNode(_Node):
    __slots__ = ("name",)

    def __init__(self, pos: int, name: str):
        self.pos = pos
        self.name = name

    def __str__(self) -> str:
        return self.name


class _DotNode(_Node):
    __slots__ = ()

    def __init__(self, pos: int):
        self.pos = pos

    def __str__(self) -> str:
        return "."


class _NilNode(_Node):
    __slots__ = ()

    def __init__(self, pos: int):
        self.pos = pos

    def __str__(self) -> str:
        return "nil"


class _BoolNode(_Node):
    __slots__ = ("value",)

    def __init__(self, pos: int, value: bool):
        self.pos = pos
        self.value = value

    def __str__(self) -> str:
        return "true" if self.value else "false"


class _NumberNode(_Node):
    __slots__ = ("text", "is_int", "is_uint", "is_float", "is_complex", "int_val", "float_val",
                 "complex_val")

    def __init__(self, pos: int, text: str):
        self.pos = pos
        self.text = text
        self.is_int = self.is_uint = self.is_float = self.is_complex = False
        self.int_val = 0
        self.float_val = 0.0
        self.complex_val = 0j

    def __str__(self) -> str:
        return self.text


class _StringNode(_Node):
    __slots__ = ("quoted", "text")

    def __init__(self, pos: int, quoted: str, text: str):
        self.pos = pos
        self.quoted = quoted
        self.text = text

    def __str__(self) -> str:
        return self.quoted


class _BranchNode(_Node):
    __slots__ = ("pipe", "list", "else_list")
    keyword = ""

    def __init__(self, pos: int, pipe: _PipeNode, lst: _ListNode, else_list: _ListNode | None):
        self.pos = pos
        self.pipe = pipe
        self.list = lst
        self.else_list = else_list

    def __str__(self) -> str:
        s = "{{" + self.keyword + " " + str(self.pipe) + "}}" + str(self.list)
        if self.else_list is not None:
            s += "{{else}}" + str(self.else_list)
        return s + "{{end}}"


class _IfNode(_BranchNode):
    __slots__ = ()
    keyword = "if"


class _RangeNode(_BranchNode):
    __slots__ = ()
    keyword = "range"


class _WithNode(_BranchNode):
    __slots__ = ()
    keyword = "with"


class _TemplateNode(_Node):
    __slots__ = ("name", "pipe")

    def __init__(self, pos: int, name: str, pipe: _PipeNode | None):
        self.pos = pos
        self.name = name
        self.pipe = pipe

    def __str__(self) -> str:
        if self.pipe is None:
            return "{{template %s}}" % _go_quote(self.name)
        return "{{template %s %s}}" % (_go_quote(self.name), self.pipe)


class _KeywordNode(_Node):
    """A bare keyword action: {{break}}, {{continue}}, {{end}}, {{else}}."""

    __slots__ = ()
    keyword = ""

    def __init__(self, pos: int):
        self.pos = pos

    def __str__(self) -> str:
        return "{{%s}}" % self.keyword


class _BreakNode(_KeywordNode):
    __slots__ = ()
    keyword = "break"


class _ContinueNode(_KeywordNode):
    __slots__ = ()
    keyword = "continue"


class _EndNode(_KeywordNode):
    __slots__ = ()
    keyword = "end"


class _ElseNode(_KeywordNode):
    __slots__ = ()
    keyword = "else"


def _scan_quoted(src: str, pos: int, quote: str) -> int:
    """Past the closing `quote` of a quoted string or character constant whose body starts at
    pos (backslash escapes; no newline); -1 if it is unterminated."""
    n = len(src)
    while pos < n:
        c = src[pos]
        pos += 1
        if c == "\\":
            if pos >= n or src[pos] == "\n":
                return -1
            pos += 1
        elif c == "\n":
            return -1
        elif c == quote:
            return pos
    return -1


def _is_empty_tree(n: _Node | None) -> bool:
    if n is None:
        return True
    if isinstance(n, _ListNode):
        return all(_is_empty_tree(c) for c in n.nodes)
    if isinstance(n, _TextNode):
        return not n.text.strip()
    return False


# ----------------------------------------------------------------------------------------------
# Parser (text/template/parse/parse.go)
# ----------------------------------------------------------------------------------------------

_OPERAND_START = (T_BOOL, T_CHAR_CONSTANT, T_COMPLEX, T_DOT, T_FIELD, T_IDENTIFIER, T_NUMBER,
                  T_NIL, T_RAW_STRING, T_STRING, T_VARIABLE, T_LEFT_PAREN)
_MAX_PAREN_DEPTH = 100


class _Locator:
    """Line and column (1-based, in characters) of an offset in the source."""

    def __init__(self, src: str):
        self.newlines = [i for i, c in enumerate(src) if c == "\n"]

    def __call__(self, pos: int) -> tuple[int, int]:
        k = bisect.bisect_left(self.newlines, pos)
        start = self.newlines[k - 1] + 1 if k > 0 else 0
        return k + 1, pos - start + 1


def _token_str(tok) -> str:
    typ, _, val = tok
    if typ == T_EOF:
        return "EOF"
    if typ == T_ERROR:
        return val
    if typ > T_KEYWORD:
        return "<" + val + ">"
    if len(val) > 10:
        return _go_quote(val[:10]) + "..."
    return _go_quote(val)


class _Parser:
    def __init__(self, src: str, name: str, funcs):
        self.src = src
        self.name = name
        self.funcs = funcs
        self.loc = _Locator(src)
        self._lexer = _lex(src)
        self._done = False
        self.toks: list[tuple] = []
        self.i = 0
        self.last = (T_TEXT, 0, "")
        self.vars = ["$"]
        self.range_depth = 0
        self.paren_depth = 0
        self.action_pos: int | None = None
        self.trees: dict[str, _ListNode] = {}

    # tokens -----------------------------------------------------------------------------------
    def _fill(self, k: int) -> None:
        while len(self.toks) <= k:
            if self._done:
                self.toks.append(self.toks[-1])
                continue
            tok = next(self._lexer)
            self.toks.append(tok)
            if tok[0] in (T_EOF, T_ERROR):
                self._done = True

    def next(self):
        self._fill(self.i)
        tok = self.toks[self.i]
        self.i += 1
        self.last = tok
        if tok[0] == T_ERROR:
            msg = tok[2]
            if self.action_pos is not None:
                line_a = self.loc(self.action_pos)[0]
                if line_a != self.loc(tok[1])[0]:
                    extra = " in action started at %s:%d" % (self.name, line_a)
                    if msg.endswith(" action"):
                        extra = extra[len(" in action"):]
                    msg += extra
            self.errorf(msg, tok[1])
        return tok

    def backup(self, n: int = 1) -> None:
        self.i -= n

    def peek(self):
        self._fill(self.i)
        return self.toks[self.i]

    def next_non_space(self):
        while True:
            tok = self.next()
            if tok[0] != T_SPACE:
                return tok

    def peek_non_space(self):
        tok = self.next_non_space()
        self.backup()
        return tok

    # errors -----------------------------------------------------------------------------------
    def errorf(self, msg: str, pos: int | None = None):
        if pos is None:
            pos = self.last[1]
        line, col = self.loc(pos)
        raise GoTemplateError("template: %s:%d:%d: %s" % (self.name, line, col, msg),
                              line=line, col=col, reason=msg)

    def unexpected(self, tok, context: str):
        self.errorf("unexpected %s in %s" % (_token_str(tok), context), tok[1])

    def expect(self, typ: int, context: str):
        tok = self.next_non_space()
        if tok[0] != typ:
            self.unexpected(tok, context)
        return tok

    # grammar ----------------------------------------------------------------------------------
    def parse(self) -> dict[str, _ListNode]:
        root = _ListNode(self.peek()[1])
        while self.peek()[0] != T_EOF:
            if self.peek()[0] == T_LEFT_DELIM:
                save = self.i
                self.next()
                if self.next_non_space()[0] == T_DEFINE:
                    self.parse_definition()
                    continue
                self.i = save
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                self.errorf("unexpected %s" % node, node.pos)
            root.nodes.append(node)
        self.add(self.name, root)
        return self.trees

    def add(self, name: str, root: _ListNode) -> None:
        tree = self.trees.get(name)
        if tree is None or _is_empty_tree(tree):
            self.trees[name] = root
            return
        if not _is_empty_tree(root):
            self.errorf("template: multiple definition of template %s" % _go_quote(name))

    def parse_definition(self) -> None:
        context = "define clause"
        tok = self.next_non_space()
        if tok[0] not in (T_STRING, T_RAW_STRING):
            self.unexpected(tok, context)
        name = self.unquote(tok)
        self.expect(T_RIGHT_DELIM, context)
        saved = (self.vars, self.range_depth)
        self.vars, self.range_depth = ["$"], 0
        root, end = self.item_list()
        if not isinstance(end, _EndNode):
            self.errorf("unexpected %s in %s" % (end, context), end.pos)
        self.add(name, root)
        self.vars, self.range_depth = saved

    def item_list(self):
        lst = _ListNode(self.peek_non_space()[1])
        while self.peek_non_space()[0] != T_EOF:
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                return lst, node
            lst.nodes.append(node)
        self.errorf("unexpected EOF")

    def text_or_action(self):
        tok = self.next_non_space()
        if tok[0] == T_TEXT:
            return _TextNode(tok[1], tok[2])
        if tok[0] == T_LEFT_DELIM:
            saved = self.action_pos
            self.action_pos = tok[1]
            try:
                return self.action()
            finally:
                self.action_pos = saved
        self.unexpected(tok, "input")

    def action(self):
        tok = self.next_non_space()
        typ = tok[0]
        if typ == T_BLOCK:
            return self.block_control()
        if typ == T_BREAK or typ == T_CONTINUE:
            word = "break" if typ == T_BREAK else "continue"
            nxt = self.next_non_space()
            if nxt[0] != T_RIGHT_DELIM:
                self.unexpected(nxt, "{{%s}}" % word)
            if self.range_depth == 0:
                self.errorf("{{%s}} outside {{range}}" % word, tok[1])
            return _BreakNode(tok[1]) if typ == T_BREAK else _ContinueNode(tok[1])
        if typ == T_ELSE:
            peek = self.peek_non_space()
            if peek[0] in (T_IF, T_WITH):
                return _ElseNode(peek[1])
            return _ElseNode(self.expect(T_RIGHT_DELIM, "else")[1])
        if typ == T_END:
            return _EndNode(self.expect(T_RIGHT_DELIM, "end")[1])
        if typ == T_IF:
            return _IfNode(*self.parse_control("if"))
        if typ == T_RANGE:
            return _RangeNode(*self.parse_control("range"))
        if typ == T_WITH:
            return _WithNode(*self.parse_control("with"))
        if typ == T_TEMPLATE:
            return self.template_control()
        self.backup()
        tok = self.peek()
        return _ActionNode(tok[1], self.pipeline("command", T_RIGHT_DELIM))

    def parse_control(self, context: str):
        nvars = len(self.vars)
        try:
            pipe = self.pipeline(context, T_RIGHT_DELIM)
            if context == "range":
                self.range_depth += 1
            lst, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list = None
            if isinstance(nxt, _ElseNode):
                if context == "if" and self.peek()[0] == T_IF:
                    self.next()
                    else_list = _ListNode(nxt.pos, [_IfNode(*self.parse_control("if"))])
                elif context == "with" and self.peek()[0] == T_WITH:
                    self.next()
                    else_list = _ListNode(nxt.pos, [_WithNode(*self.parse_control("with"))])
                else:
                    else_list, nxt = self.item_list()
                    if not isinstance(nxt, _EndNode):
                        self.errorf("expected end; found %s" % nxt, nxt.pos)
            return pipe.pos, pipe, lst, else_list
        finally:
            del self.vars[nvars:]

    def block_control(self):
        context = "block clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = self.pipeline(context, T_RIGHT_DELIM)
        saved = (self.vars, self.range_depth)
        self.vars, self.range_depth = ["$"], 0
        root, end = self.item_list()
        if not isinstance(end, _EndNode):
            self.errorf("unexpected %s in %s" % (end, context), end.pos)
        self.add(name, root)
        self.vars, self.range_depth = saved
        return _TemplateNode(tok[1], name, pipe)

    def template_control(self):
        context = "template clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = None
        if self.next_non_space()[0] != T_RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, T_RIGHT_DELIM)
        return _TemplateNode(tok[1], name, pipe)

    def template_name(self, tok, context: str) -> str:
        if tok[0] in (T_STRING, T_RAW_STRING):
            return self.unquote(tok)
        self.unexpected(tok, context)

    def unquote(self, tok) -> str:
        try:
            return _go_unquote(tok[2])
        except ValueError as e:
            self.errorf(str(e), tok[1])

    def pipeline(self, context: str, end: int) -> _PipeNode:
        pipe = _PipeNode(self.peek_non_space()[1])
        while True:  # declarations
            v = self.peek_non_space()
            if v[0] != T_VARIABLE:
                break
            at_v = self.i
            self.next()
            nxt = self.peek_non_space()
            if nxt[0] in (T_ASSIGN, T_DECLARE):
                pipe.is_assign = nxt[0] == T_ASSIGN
                self.next_non_space()
                pipe.decl.append(_VariableNode(v[1], [v[2]]))
                self.vars.append(v[2])
                break
            if nxt[0] == T_CHAR and nxt[2] == ",":
                self.next_non_space()
                pipe.decl.append(_VariableNode(v[1], [v[2]]))
                self.vars.append(v[2])
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space()[0] in (T_VARIABLE, T_RIGHT_DELIM, T_RIGHT_PAREN):
                        continue
                    self.errorf("range can only initialize variables")
                self.errorf("too many declarations in %s" % context)
            # "$x" is an operand, not a declaration: push it (and what follows) back
            self.i = at_v
            break
        while True:
            tok = self.next_non_space()
            if tok[0] == end:
                self.check_pipeline(pipe, context)
                return pipe
            if tok[0] in _OPERAND_START:
                self.backup()
                pipe.cmds.append(self.command())
            else:
                self.unexpected(tok, context)

    def check_pipeline(self, pipe: _PipeNode, context: str) -> None:
        if not pipe.cmds:
            self.errorf("missing value for %s" % context)
        for i, c in enumerate(pipe.cmds[1:]):
            if isinstance(c.args[0], (_BoolNode, _DotNode, _NilNode, _NumberNode, _StringNode)):
                self.errorf("non executable command in pipeline stage %d" % (i + 2), c.pos)

    def command(self) -> _CommandNode:
        cmd = _CommandNode(self.peek_non_space()[1])
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            tok = self.next()
            if tok[0] == T_SPACE:
                continue
            if tok[0] in (T_RIGHT_DELIM, T_RIGHT_PAREN):
                self.backup()
            elif tok[0] != T_PIPE:
                self.unexpected(tok, "operand")
            break
        if not cmd.args:
            self.errorf("empty command")
        return cmd

    def operand(self):
        node = self.term()
        if node is None:
            return None
        if self.peek()[0] == T_FIELD:
            chain = _ChainNode(self.peek()[1], node)
            while self.peek()[0] == T_FIELD:
                chain.fields.append(self.next()[2][1:])
            if isinstance(node, _FieldNode):
                node = _FieldNode(chain.pos, node.ident + chain.fields)
            elif isinstance(node, _VariableNode):
                node = _VariableNode(chain.pos, node.ident + chain.fields)
            elif isinstance(node, (_BoolNode, _StringNode, _NumberNode, _NilNode, _DotNode)):
                self.errorf("unexpected . after term %s" % _go_quote(str(node)), chain.pos)
            else:
                node = chain
        return node

    def term(self):
        tok = self.next_non_space()
        typ, pos, val = tok
        if typ == T_IDENTIFIER:
            if val not in self.funcs:
                self.errorf("function %s not defined" % _go_quote(val), pos)
            return _IdentifierNode(pos, val)
        if typ == T_DOT:
            return _DotNode(pos)
        if typ == T_NIL:
            return _NilNode(pos)
        if typ == T_VARIABLE:
            if val not in self.vars:
                self.errorf("undefined variable %s" % _go_quote(val), pos)
            return _VariableNode(pos, [val])
        if typ == T_FIELD:
            return _FieldNode(pos, val[1:].split("."))
        if typ == T_BOOL:
            return _BoolNode(pos, val == "true")
        if typ in (T_CHAR_CONSTANT, T_COMPLEX, T_NUMBER):
            return self.number(tok)
        if typ == T_LEFT_PAREN:
            if self.paren_depth >= _MAX_PAREN_DEPTH:
                self.errorf("max expression depth exceeded", pos)
            self.paren_depth += 1
            try:
                return self.pipeline("parenthesized pipeline", T_RIGHT_PAREN)
            finally:
                self.paren_depth -= 1
        if typ in (T_STRING, T_RAW_STRING):
            return _StringNode(pos, val, self.unquote(tok))
        self.backup()
        return None

    def number(self, tok) -> _NumberNode:
        typ, pos, text = tok
        node = _NumberNode(pos, text)
        try:
            if typ == T_CHAR_CONSTANT:
                r = _char_constant(text)
                node.is_int = node.is_uint = node.is_float = True
                node.int_val = r
                node.float_val = float(r)
                return node
            if typ == T_COMPLEX:
                try:
                    c = complex(text.replace("_", "").replace("i", "j"))
                except ValueError:
                    raise ValueError("illegal number syntax: %s" % _go_quote(text)) from None
                node.is_complex = True
                node.complex_val = c
                _simplify_complex(node)
                return node
            if text.endswith("i"):
                f = _parse_go_float(text[:-1])
                if f is None:
                    i = _parse_go_int(text[:-1])
                    f = float(i) if i is not None else None
                if f is not None:
                    node.is_complex = True
                    node.complex_val = complex(0, f)
                    _simplify_complex(node)
                    return node
            i = _parse_go_int(text)
            if i is not None and -(1 << 63) <= i < (1 << 63):
                node.is_int = True
                node.int_val = i
                node.is_uint = i >= 0
            elif i is not None and 0 <= i < (1 << 64):
                node.is_uint = True
                node.int_val = i
            if node.is_int or node.is_uint:
                node.is_float = True
                node.float_val = float(node.int_val)
            else:
                f = _parse_go_float(text)
                if f is not None and not math.isinf(f):
                    if not any(c in text for c in ".eEpP"):
                        raise ValueError("integer overflow: %s" % _go_quote(text))
                    node.is_float = True
                    node.float_val = f
                    if f == int(f) and -(1 << 63) <= int(f) < (1 << 63):
                        node.is_int = True
                        node.int_val = int(f)
                        node.is_uint = f >= 0
            if not (node.is_int or node.is_uint or node.is_float):
                raise ValueError("illegal number syntax: %s" % _go_quote(text))
        except ValueError as e:
            self.errorf(str(e), pos)
        return node


def _simplify_complex(node: _NumberNode) -> None:
    if node.complex_val.imag == 0:
        node.is_float = True
        node.float_val = node.complex_val.real
        f = node.float_val
        if f == int(f) and -(1 << 63) <= int(f) < (1 << 63):
            node.is_int = True
            node.int_val = int(f)
            node.is_uint = f >= 0


# ----------------------------------------------------------------------------------------------
# Builtin functions (text/template/funcs.go) and Ollama's (template/template.go)
# ----------------------------------------------------------------------------------------------


class _FuncError(Exception):
    """An error a function returns: reported as "error calling NAME: ..."."""


class _Func:
    __slots__ = ("params", "variadic", "impl")

    def __init__(self, params: tuple, variadic: str | None, impl):
        self.params = params  # per fixed parameter: "value" (reflect.Value), "any", "string"
        self.variadic = variadic
        self.impl = impl


def _nil_to_invalid(v: Any) -> Any:
    """indirectInterface: a nil interface is the zero Value."""
    return _INVALID if v is None else v


def _truth(v: Any) -> bool:
    return _is_true(_nil_to_invalid(v))[0]


def _f_not(args):
    return not _truth(args[0])


def _f_len(args):
    v = args[0]
    if v is _INVALID:
        raise _FuncError("reflect: call of reflect.Value.Type on zero Value")
    if v is None:
        raise _FuncError("len of nil pointer")
    k = _kind(v)
    if k == "string":
        return _utf8_len(v)
    if k in ("map", "slice"):
        return len(v)
    if k == "gonil":
        return 0
    raise _FuncError("len of type %s" % _go_type(v).lstrip("*"))


def _index_arg(index: Any, size: int) -> int:
    k = _kind(index)
    if k == "int":
        x = int(index)
    elif k in ("invalid", "nil"):
        raise _FuncError("cannot index slice/array with nil")
    else:
        raise _FuncError("cannot index slice/array with type %s" % _go_type(index))
    if x < 0 or x > size:
        raise _FuncError("index out of range: %d" % x)
    return x


def _f_index(args):
    item = _nil_to_invalid(args[0])
    if item is _INVALID:
        raise _FuncError("index of untyped nil")
    for index in args[1:]:
        index = _nil_to_invalid(index)
        if item is None:
            raise _FuncError("index of nil pointer")
        k = _kind(item)
        if k == "string" or k == "slice" or (k == "gonil" and item.kind == "slice"):
            data = item.encode("utf-8", "surrogatepass") if k == "string" else item
            size = 0 if k == "gonil" else len(data)
            x = _index_arg(index, size)
            if x == size:
                raise _FuncError("index out of range: %d" % x)
            item = data[x]
        elif k == "map" or k == "gonil":
            if index is _INVALID:
                raise _FuncError("value is nil; should be of type string")
            if _kind(index) != "string":
                raise _FuncError("value has type %s; should be string" % _go_type(index))
            item = item.get(index) if k == "map" else None
        else:
            raise _FuncError("can't index item of type %s" % _go_type(item))
    return item


def _f_slice(args):
    item = _nil_to_invalid(args[0])
    if item is _INVALID:
        raise _FuncError("slice of untyped nil")
    indexes = args[1:]
    if len(indexes) > 3:
        raise _FuncError("too many slice indexes: %d" % len(indexes))
    k = _kind(item)
    if k == "string":
        if len(indexes) == 3:
            raise _FuncError("cannot 3-index slice a string")
        data = item.encode("utf-8", "surrogatepass")
    elif k == "slice":
        data = item
    elif k == "gonil" and item.kind == "slice":
        data = []
    else:
        raise _FuncError("can't slice item of type %s" % _go_type(item))
    idx = [0, len(data), len(data)]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(_nil_to_invalid(index), len(data))
    if idx[0] > idx[1]:
        raise _FuncError("invalid slice index: %d > %d" % (idx[0], idx[1]))
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise _FuncError("invalid slice index: %d > %d" % (idx[1], idx[2]))
    if k == "string":
        return data[idx[0]:idx[1]].decode("utf-8", "replace")
    if k == "gonil":
        return item
    return list(data[idx[0]:idx[1]])


_BASIC = {"bool": "bool", "int": "int", "float": "float", "complex": "complex", "string": "string"}


def _basic_kind(v: Any) -> str | None:
    return _BASIC.get(_kind(v))


def _is_nil_value(v: Any) -> bool:
    return v is _INVALID or v is None or isinstance(v, _GoNil) or getattr(v, "is_nil", False)


def _f_eq(args):
    a1 = _nil_to_invalid(args[0])
    if len(args) < 2:
        raise _FuncError("missing argument for comparison")
    k1 = _basic_kind(a1)
    for arg in args[1:]:
        arg = _nil_to_invalid(arg)
        k2 = _basic_kind(arg)
        if k1 != k2:
            if a1 is not _INVALID and arg is not _INVALID:
                raise _FuncError("incompatible types for comparison")
            truth = False
        elif k1 is not None:
            truth = a1 == arg
        else:
            n1, n2 = _is_nil_value(a1), _is_nil_value(arg)
            if n1 or n2:
                truth = n1 == n2
            else:
                if _go_type(a1) != _go_type(arg):
                    raise _FuncError("non-comparable types %s: %s, %s: %s" % (
                        go_sprint(a1), _go_type(a1), _go_type(arg), go_sprint(arg)))
                if _kind(arg) in ("map", "slice"):
                    raise _FuncError("non-comparable type %s: %s" % (go_sprint(arg),
                                                                     _go_type(arg)))
                truth = a1 is arg if getattr(a1, "pointer", False) else a1 == arg
        if truth:
            return True
    return False


def _f_ne(args):
    return not _f_eq(args)


def _f_lt(args):
    a1, a2 = _nil_to_invalid(args[0]), _nil_to_invalid(args[1])
    k1 = _basic_kind(a1)
    if k1 is None:
        raise _FuncError("invalid type for comparison")
    k2 = _basic_kind(a2)
    if k2 is None:
        raise _FuncError("invalid type for comparison")
    if k1 != k2:
        raise _FuncError("incompatible types for comparison")
    if k1 in ("bool", "complex"):
        raise _FuncError("invalid type for comparison")
    if k1 == "string":
        return a1.encode("utf-8", "surrogatepass") < a2.encode("utf-8", "surrogatepass")
    return a1 < a2


def _f_le(args):
    return _f_lt(args) or _f_eq(args)


def _f_gt(args):
    return not _f_le(args)


def _f_ge(args):
    return not _f_lt(args)


def _fmt_args(args):
    return [None if a is _INVALID else a for a in args]


def _eval_args(args) -> str:
    """text/template's evalArgs: like fmt.Sprint, but a nil prints as <no value>."""
    if len(args) == 1 and _is_go_string(args[0]):
        return args[0]
    return go_sprint(*["<no value>" if a is None or a is _INVALID else a for a in args])


def _html_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&#34;").replace("\0", "\ufffd"))


def _js_escape(s: str) -> str:
    out = []
    table = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E",
             "&": "\\u0026", "=": "\\u003D"}
    for ch in s:
        if ch in table:
            out.append(table[ch])
        elif ord(ch) < 0x20:
            out.append("\\u00%02X" % ord(ch))
        elif ord(ch) < 0x80 or _go_is_print(ch):
            out.append(ch)
        else:
            out.append("\\u%04X" % ord(ch))
    return "".join(out)


def _f_call(args):
    fn = _nil_to_invalid(args[0])
    if fn is _INVALID:
        raise _FuncError("call of nil")
    raise _FuncError("non-function %s of type %s" % (go_sprint(fn), _go_type(fn)))


def _ts_type(prop: GoStruct) -> str:
    any_of = prop.fields.get("AnyOf")
    if isinstance(any_of, list) and any_of:
        return " | ".join(_ts_type(p) if isinstance(p, GoStruct) else "any" for p in any_of)
    types = prop.fields.get("Type") or []
    names = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
             "array": "any[]", "object": "Record<string, any>", "null": "null"}
    if not types:
        return "any"
    return " | ".join(names.get(t, "any") for t in types)


def _f_to_typescript_type(args):
    v = args[0]
    if isinstance(v, GoStruct) and v.go_type.lstrip("*") == "api.ToolProperty":
        return _ts_type(v)
    return "any"


_FUNCS: dict[str, _Func] = {
    "and": _Func(("value",), "value", None),
    "or": _Func(("value",), "value", None),
    "not": _Func(("value",), None, _f_not),
    "len": _Func(("value",), None, _f_len),
    "index": _Func(("value",), "value", _f_index),
    "slice": _Func(("value",), "value", _f_slice),
    "call": _Func(("value",), "value", _f_call),
    "eq": _Func(("value",), "value", _f_eq),
    "ne": _Func(("value", "value"), None, _f_ne),
    "lt": _Func(("value", "value"), None, _f_lt),
    "le": _Func(("value", "value"), None, _f_le),
    "gt": _Func(("value", "value"), None, _f_gt),
    "ge": _Func(("value", "value"), None, _f_ge),
    "print": _Func((), "any", lambda a: go_sprint(*_fmt_args(a))),
    "println": _Func((), "any", lambda a: go_sprintln(*_fmt_args(a))),
    "printf": _Func(("string",), "any", lambda a: go_sprintf(a[0], *_fmt_args(a[1:]))),
    "html": _Func((), "any", lambda a: _html_escape(_eval_args(a))),
    "js": _Func((), "any", lambda a: _js_escape(_eval_args(a))),
    "urlquery": _Func((), "any",
                      lambda a: urllib.parse.quote_plus(_eval_args(a).encode("utf-8"), safe="")),
    # Ollama's template functions
    "json": _Func(("any",), None, lambda a: _json_or_empty(a[0])),
    "currentDate": _Func((), "string", lambda a: datetime.date.today().isoformat()),
    "yesterdayDate": _Func((), "string",
                           lambda a: (datetime.date.today() - datetime.timedelta(days=1))
                           .isoformat()),
    "toTypeScriptType": _Func(("any",), None, _f_to_typescript_type),
}


# ----------------------------------------------------------------------------------------------
# Execution (text/template/exec.go)
# ----------------------------------------------------------------------------------------------

_MAX_EXEC_DEPTH = 100


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _State:
    __slots__ = ("tmpl", "trees", "out", "missingkey", "name", "node", "vars", "depth")

    def __init__(self, tmpl: "GoTemplate", out: list[str], missingkey: str, name: str,
                 depth: int = 0):
        self.tmpl = tmpl
        self.trees = tmpl._trees
        self.out = out
        self.missingkey = missingkey
        self.name = name
        self.node: _Node | None = None
        self.vars: list[list] = []
        self.depth = depth

    # errors -----------------------------------------------------------------------------------
    def errorf(self, msg: str):
        node = self.node
        if node is None:
            raise GoTemplateError("template: %s: %s" % (self.name, msg), reason=msg)
        line, col = self.tmpl._loc(node.pos)
        raise GoTemplateError(
            'template: %s:%d:%d: executing %s at <%s>: %s'
            % (self.tmpl.name, line, col, _go_quote(self.name), node, msg),
            line=line, col=col, reason=msg)

    # variables --------------------------------------------------------------------------------
    def var_value(self, name: str):
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                return self.vars[i][1]
        self.errorf("undefined variable: %s" % name)

    def set_var(self, name: str, value) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i][1] = value
                return
        self.errorf("undefined variable: %s" % name)

    # walking ----------------------------------------------------------------------------------
    def walk(self, dot, node: _Node) -> None:
        self.node = node
        t = type(node)
        if t is _TextNode:
            self.out.append(node.text)
        elif t is _ActionNode:
            val = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.out.append(_print_value(val))
        elif t is _ListNode:
            for n in node.nodes:
                self.walk(dot, n)
        elif t is _IfNode or t is _WithNode:
            self.walk_if_or_with(t is _WithNode, dot, node)
        elif t is _RangeNode:
            self.walk_range(dot, node)
        elif t is _TemplateNode:
            self.walk_template(dot, node)
        elif t is _BreakNode:
            raise _Break
        elif t is _ContinueNode:
            raise _Continue
        else:
            self.errorf("unknown node: %s" % node)

    def walk_if_or_with(self, is_with: bool, dot, node: _BranchNode) -> None:
        mark = len(self.vars)
        try:
            val = self.eval_pipeline(dot, node.pipe)
            truth, ok = _is_true(val)
            if not ok:
                self.errorf("if/with can't use %s" % go_sprint(val))
            if truth:
                self.walk(val if is_with else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot, r: _RangeNode) -> None:
        self.node = r
        mark0 = len(self.vars)
        try:
            val = self.eval_pipeline(dot, r.pipe)
            mark = len(self.vars)
            decl = r.pipe.decl

            def one(index, elem) -> None:
                if decl:
                    if r.pipe.is_assign:
                        self.set_var(decl[0].ident[0], index if len(decl) > 1 else elem)
                    else:
                        self.vars[-1][1] = elem
                if len(decl) > 1:
                    if r.pipe.is_assign:
                        self.set_var(decl[1].ident[0], elem)
                    else:
                        self.vars[-2][1] = index
                try:
                    self.walk(elem, r.list)
                except _Continue:
                    pass
                finally:
                    del self.vars[mark:]

            k = _kind(val)
            try:
                if k == "slice":
                    if len(val):
                        for i, elem in enumerate(val):
                            one(i, elem)
                        return
                elif k == "map":
                    if len(val):
                        for key in _sorted_keys(val):
                            one(key, val[key])
                        return
                elif k == "int":
                    self.node = r
                    if len(decl) > 1:
                        self.errorf("can't use %s to iterate over more than one variable"
                                    % go_sprint(val))
                    if val > 0:
                        for i in range(val):
                            one(_INVALID, i)
                        return
                elif k not in ("invalid", "nil", "gonil"):
                    self.node = r
                    self.errorf("range can't iterate over %s" % go_sprint(val))
            except _Break:
                return
            if r.else_list is not None:
                self.walk(dot, r.else_list)
        finally:
            del self.vars[mark0:]

    def walk_template(self, dot, t: _TemplateNode) -> None:
        self.node = t
        tree = self.trees.get(t.name)
        if tree is None:
            self.errorf("template %s not defined" % _go_quote(t.name))
        if self.depth >= _MAX_EXEC_DEPTH:
            self.errorf("exceeded maximum template depth (%d)" % _MAX_EXEC_DEPTH)
        dot = self.eval_pipeline(dot, t.pipe)
        st = _State(self.tmpl, self.out, self.missingkey, t.name, self.depth + 1)
        st.vars = [["$", dot]]
        st.walk(dot, tree)

    # evaluation -------------------------------------------------------------------------------
    def eval_pipeline(self, dot, pipe: _PipeNode | None):
        if pipe is None:
            return _INVALID
        self.node = pipe
        value = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:  # an interface{} holding nil: dig down to the (invalid) value
                value = _INVALID
        for var in pipe.decl:
            if pipe.is_assign:
                self.set_var(var.ident[0], value)
            else:
                self.vars.append([var.ident[0], value])
        return value

    def not_a_function(self, args, final) -> None:
        if (args is not None and len(args) > 1) or final is not _MISSING:
            self.errorf("can't give argument to non-function %s" % args[0])

    def eval_command(self, dot, cmd: _CommandNode, final):
        first = cmd.args[0]
        t = type(first)
        if t is _FieldNode:
            return self.eval_field_node(dot, first, cmd.args, final)
        if t is _ChainNode:
            return self.eval_chain_node(dot, first, cmd.args, final)
        if t is _IdentifierNode:
            return self.eval_function(dot, first, cmd, cmd.args, final)
        if t is _PipeNode:
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if t is _VariableNode:
            return self.eval_variable_node(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if t is _BoolNode:
            return first.value
        if t is _DotNode:
            return dot
        if t is _NilNode:
            self.errorf("nil is not a command")
        if t is _NumberNode:
            return self.ideal_constant(first)
        if t is _StringNode:
            return first.text
        self.errorf("can't evaluate command %s" % _go_quote(str(first)))

    def ideal_constant(self, c: _NumberNode):
        self.node = c
        text = c.text
        if c.is_complex:
            return c.complex_val
        is_hex_int = len(text) > 2 and text[0] == "0" and text[1] in "xX" and \
            not any(ch in text for ch in "pP")
        if c.is_float and not is_hex_int and not text.startswith("'") and \
                any(ch in text for ch in ".eEpP"):
            return c.float_val
        if c.is_int:
            return c.int_val
        if c.is_uint:
            self.errorf("%s overflows int" % text)
        return _INVALID

    def eval_field_node(self, dot, field: _FieldNode, args, final):
        self.node = field
        return self.eval_field_chain(dot, dot, field, field.ident, args, final)

    def eval_chain_node(self, dot, chain: _ChainNode, args, final):
        self.node = chain
        if isinstance(chain.node, _NilNode):
            self.errorf("indirection through explicit nil in %s" % chain)
        pipe = self.eval_arg(dot, None, chain.node)
        return self.eval_field_chain(dot, pipe, chain, chain.fields, args, final)

    def eval_variable_node(self, dot, var: _VariableNode, args, final):
        self.node = var
        value = self.var_value(var.ident[0])
        if len(var.ident) == 1:
            self.not_a_function(args if args is not None else [var], final)
            return value
        return self.eval_field_chain(dot, value, var, var.ident[1:], args, final)

    def eval_field_chain(self, dot, receiver, node, ident, args, final):
        for name in ident[:-1]:
            receiver = self.eval_field(dot, name, node, None, _MISSING, receiver)
        return self.eval_field(dot, ident[-1], node, args, final, receiver)

    def eval_field(self, dot, name: str, node, args, final, receiver):
        self.node = node
        if receiver is _INVALID:
            if self.missingkey == "error":
                self.errorf("nil data; no entry for key %s" % _go_quote(name))
            return _INVALID
        if receiver is None:
            self.errorf("nil pointer evaluating interface {}.%s" % name)
        has_args = (args is not None and len(args) > 1) or final is not _MISSING
        if name == "String":
            s = _Printer()._stringer(receiver)
            if s is not None:  # the String method of Ollama's JSON-printing types
                n_in = (len(args) - 1 if args else 0) + (final is not _MISSING)
                if n_in:
                    self.errorf("wrong number of args for String: want 0 got %d" % n_in)
                return s
        k = _kind(receiver)
        if k == "struct":
            if name in receiver.fields:
                if has_args:
                    self.errorf("%s has arguments but cannot be invoked as function" % name)
                return receiver.fields[name]
        elif k == "map" or (k == "gonil" and receiver.kind == "map"):
            if has_args:
                self.errorf("%s is not a method but has arguments" % name)
            if k == "map" and name in receiver:
                return receiver[name]
            if self.missingkey == "zero":
                return None
            if self.missingkey == "error":
                self.errorf("map has no entry for key %s" % _go_quote(name))
            return _INVALID
        self.errorf("can't evaluate field %s in type %s" % (name, _go_type(receiver)))

    def eval_function(self, dot, node: _IdentifierNode, cmd, args, final):
        self.node = node
        fn = _FUNCS.get(node.name)
        if fn is None:
            self.errorf("%s is not a defined function" % _go_quote(node.name))
        return self.eval_call(dot, fn, cmd, node.name, args, final)

    def eval_call(self, dot, fn: _Func, node, name: str, args, final):
        args = list(args[1:]) if args is not None else []
        num_in = len(args) + (final is not _MISSING)
        fixed = fn.params
        if fn.variadic is not None:
            if num_in < len(fixed):
                self.errorf("wrong number of args for %s: want at least %d got %d"
                            % (name, len(fixed), len(args)))
        elif num_in != len(fixed):
            self.errorf("wrong number of args for %s: want %d got %d" % (name, len(fixed), num_in))
        if name in ("and", "or"):
            v = _INVALID
            for arg in args:
                v = self.eval_arg(dot, "value", arg)
                if _truth(v) == (name == "or"):
                    return v
            if final is not _MISSING:
                v = self.validate_type(final, "value")
            return v
        argv = []
        for i, arg in enumerate(args):
            argv.append(self.eval_arg(dot, fixed[i] if i < len(fixed) else fn.variadic, arg))
        if final is not _MISSING:
            i = len(args)
            typ = fixed[i] if i < len(fixed) else (fn.variadic or fixed[-1])
            argv.append(self.validate_type(final, typ))
        try:
            return fn.impl(argv)
        except _FuncError as e:
            self.node = node
            self.errorf("error calling %s: %s" % (name, e))

    def validate_type(self, value, typ: str | None):
        if value is _INVALID:
            if typ is None or typ == "value":
                return _INVALID
            if typ == "any":
                return None
            self.errorf("invalid value; expected %s" % typ)
        if typ == "string" and _kind(value) != "string":
            self.errorf("wrong type for value; expected string; got %s" % _go_type(value))
        return value

    def eval_arg(self, dot, typ: str | None, n: _Node):
        self.node = n
        t = type(n)
        if t is _DotNode:
            return self.validate_type(dot, typ)
        if t is _NilNode:
            if typ == "string":
                self.errorf("cannot assign nil to string")
            return None if typ == "any" else _INVALID
        if t is _FieldNode:
            return self.validate_type(self.eval_field_node(dot, n, [n], _MISSING), typ)
        if t is _VariableNode:
            return self.validate_type(self.eval_variable_node(dot, n, None, _MISSING), typ)
        if t is _PipeNode:
            return self.validate_type(self.eval_pipeline(dot, n), typ)
        if t is _IdentifierNode:
            return self.validate_type(self.eval_function(dot, n, n, None, _MISSING), typ)
        if t is _ChainNode:
            return self.validate_type(self.eval_chain_node(dot, n, None, _MISSING), typ)
        if typ == "string":
            if t is _StringNode:
                return n.text
            self.errorf("expected string; found %s" % n)
        if t is _BoolNode:
            return n.value
        if t is _NumberNode:
            return self.ideal_constant(n)
        if t is _StringNode:
            return n.text
        self.errorf("can't handle %s for arg of type %s" % (n, typ))


def _print_value(v) -> str:
    """printValue: <no value> for the zero Value, else fmt.Print of the (dereferenced) value."""
    if v is _INVALID or v is _MISSING:
        return "<no value>"
    if isinstance(v, GoStruct) and v.pointer:
        v = GoStruct(v.go_type, v.fields, json_fields=v.json_fields, json_string=v.json_string)
    return go_sprint(v)


# ----------------------------------------------------------------------------------------------
# GoTemplate
# ----------------------------------------------------------------------------------------------


class GoTemplate:
    """A parsed Go text/template.

    `GoTemplate(source)` parses once (raising `GoTemplateError` on a syntax error);
    `render(data)` executes the main template with `data` as dot. `missingkey` is Go's option:
    "zero" (Ollama's choice, the default here), "default"/"invalid" or "error"."""

    def __init__(self, source: str, *, name: str = "", missingkey: str = "zero"):
        if not isinstance(source, str):
            raise TypeError("template source must be a str, not %s" % type(source).__name__)
        if missingkey == "invalid":
            missingkey = "default"
        if missingkey not in ("default", "zero", "error"):
            raise ValueError("missingkey must be one of default, invalid, zero, error")
        self.source = source
        self.name = name
        self.missingkey = missingkey
        parser = _Parser(source, name, _FUNCS)
        self._trees = parser.parse()
        self._loc = parser.loc
        self._ollama: dict[str, Any] = {}

    def __repr__(self) -> str:
        src = self.source if len(self.source) <= 40 else self.source[:37] + "..."
        return "GoTemplate(%r)" % src

    @property
    def templates(self) -> list[str]:
        """Names of the templates defined (the main one included), sorted."""
        return sorted(self._trees)

    def render(self, data: Any = None, *, missingkey: str | None = None) -> str:
        return self._execute(self._trees[self.name], data, missingkey or self.missingkey,
                             self.name)

    def render_template(self, name: str, data: Any = None) -> str:
        """ExecuteTemplate: render the associated template `name`."""
        if name not in self._trees:
            raise GoTemplateError("template: no template %s associated with template %s"
                                  % (_go_quote(name), _go_quote(self.name)))
        return self._execute(self._trees[name], data, self.missingkey, name)

    def identifiers(self) -> list[str]:
        """Ollama's Template.Vars(): the field and variable names the templates mention,
        lowercased and sorted (`.Messages` and `$.Messages` both give "messages")."""
        names: set[str] = set()
        for root in self._trees.values():
            names.update(x.lower() for x in _identifiers(root))
        return sorted(names)

    def _execute(self, root: _ListNode, data: Any, missingkey: str, name: str) -> str:
        out: list[str] = []
        st = _State(self, out, "default" if missingkey == "invalid" else missingkey, name)
        st.vars = [["$", data]]
        try:
            st.walk(data, root)
        except _Unsupported as e:
            st.errorf(str(e))
        except (_Break, _Continue):  # cannot happen: the parser only allows them inside range
            st.errorf("break or continue outside range")
        except RecursionError:  # data or parentheses nested deeper than Python's stack
            raise GoTemplateError("template: %s: exceeded maximum nesting depth" % self.name,
                                  reason="exceeded maximum nesting depth") from None
        return "".join(out)


def _identifiers(n) -> list[str]:
    if n is None:
        return []
    t = type(n)
    if t is _ListNode:
        return [x for c in n.nodes for x in _identifiers(c)]
    if t is _TemplateNode or t is _ActionNode:
        return _identifiers(n.pipe)
    if isinstance(n, _BranchNode):
        return _identifiers(n.pipe) + _identifiers(n.list) + _identifiers(n.else_list)
    if t is _PipeNode:
        return [x for c in n.cmds for a in c.args for x in _identifiers(a)]
    if t is _FieldNode or t is _VariableNode:
        return list(n.ident)
    return []


# ----------------------------------------------------------------------------------------------
# Ollama: the values a TEMPLATE sees, and the way Ollama executes it
# ----------------------------------------------------------------------------------------------

_THINK_LEVELS = ("high", "medium", "low", "max")


def _think_values(think: bool | str | None) -> dict[str, Any]:
    """.Think, .ThinkLevel and .IsThinkSet from a request's `think` (api.ThinkValue)."""
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, bool):
        return {"Think": think, "ThinkLevel": "medium" if think else "", "IsThinkSet": True}
    if isinstance(think, str) and think in _THINK_LEVELS:
        return {"Think": True, "ThinkLevel": think, "IsThinkSet": True}
    raise ValueError("think must be a bool or one of %s, not %r"
                     % (", ".join(_THINK_LEVELS), think))


def _str_field(m: Mapping, key: str) -> str:
    v = m.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError("message field %r must be a string, not %s" % (key, type(v).__name__))
    return v


def _tool_call_struct(tc: Mapping) -> GoStruct:
    if not isinstance(tc, Mapping):
        raise ValueError("a tool call must be a mapping, not %s" % type(tc).__name__)
    fn = tc.get("function") or {}
    args = fn.get("arguments")
    if args is None:
        args = {}
    if isinstance(args, str):
        import json as _json

        args = _json.loads(args) if args.strip() else {}
    if not isinstance(args, Mapping):
        raise ValueError("tool call arguments must be an object")
    arguments = _JSONMap(args)
    arguments.go_type = "template.templateArgs"
    function = GoStruct("template.templateToolCallFunction", {
        "Index": int(fn.get("index") or 0),
        "Name": _str_field(fn, "name"),
        "Arguments": arguments,
    })
    return GoStruct("template.templateToolCall", {"ID": _str_field(tc, "id"),
                                                  "Function": function})


def _message_struct(m: Mapping) -> GoStruct:
    """A templateMessage: what `range .Messages` gives (fields Role, Content, Thinking, Images,
    ToolCalls, ToolName, ToolCallID)."""
    if not isinstance(m, Mapping):
        raise ValueError("a message must be a mapping, not %s" % type(m).__name__)
    tool_calls = m.get("tool_calls")
    images = m.get("images")
    return GoStruct("*template.templateMessage", {
        "Role": _str_field(m, "role").lower(),
        "Content": _str_field(m, "content"),
        "Thinking": _str_field(m, "thinking"),
        "Images": list(images) if images else _GoNil("[]api.ImageData", "slice"),
        "ToolCalls": [_tool_call_struct(tc) for tc in tool_calls] if tool_calls
        else _GoNil("[]template.templateToolCall", "slice"),
        "ToolName": _str_field(m, "tool_name"),
        "ToolCallID": _str_field(m, "tool_call_id"),
    }, pointer=True)


def _properties_map(props: Any, *, top: bool) -> _JSONMap:
    out = _JSONMap()
    if props is None:
        out.is_nil = True
    else:
        if not isinstance(props, Mapping):
            raise ValueError("tool parameter properties must be an object")
        for key, value in props.items():
            out[key] = _tool_property(value)
    out.go_type = "template.templateProperties" if top else "*api.ToolPropertiesMap"
    out.sort_keys = top  # a Go map marshals sorted; Ollama's ordered map keeps insertion order
    return out


def _tool_property(p: Any) -> GoStruct:
    if not isinstance(p, Mapping):
        raise ValueError("a tool property must be an object")
    t = p.get("type")
    ptype = _PropertyType([t] if isinstance(t, str) else list(t or []))
    any_of = p.get("anyOf")
    enum = p.get("enum")
    required = p.get("required")
    props = p.get("properties")
    fields = {
        "AnyOf": [_tool_property(x) for x in any_of] if any_of
        else _GoNil("[]api.ToolProperty", "slice"),
        "Type": ptype,
        "Items": p.get("items"),
        "Description": p.get("description") or "",
        "Enum": list(enum) if enum else _GoNil("[]interface {}", "slice"),
        "Properties": _properties_map(props, top=False) if props is not None else None,
        "Required": list(required) if required else _GoNil("[]string", "slice"),
    }
    layout = [("AnyOf", "anyOf", True), ("Type", "type", True), ("Items", "items", True),
              ("Description", "description", True), ("Enum", "enum", True),
              ("Properties", "properties", True), ("Required", "required", True)]
    return GoStruct("api.ToolProperty", fields, json_fields=layout)


def _tool_struct(tool: Any) -> GoStruct:
    if not isinstance(tool, Mapping):
        raise ValueError("a tool must be a mapping, not %s" % type(tool).__name__)
    fn = tool.get("function") or {}
    params = fn.get("parameters") or {}
    required = params.get("required")
    parameters = GoStruct("template.templateToolFunctionParameters", {
        "Type": params.get("type") or "",
        "Defs": params.get("$defs"),
        "Items": params.get("items"),
        "Required": list(required) if required else _GoNil("[]string", "slice"),
        "Properties": _properties_map(params.get("properties"), top=True),
    }, json_fields=[("Type", "type", False), ("Defs", "$defs", True), ("Items", "items", True),
                    ("Required", "required", True), ("Properties", "properties", False)])
    function = GoStruct("template.templateToolFunction", {
        "Name": fn.get("name") or "",
        "Description": fn.get("description") or "",
        "Parameters": parameters,
    }, json_fields=[("Name", "name", False), ("Description", "description", False),
                    ("Parameters", "parameters", False)])
    return GoStruct("template.templateTool", {
        "Type": tool.get("type") or "",
        "Items": tool.get("items"),
        "Function": function,
    }, json_fields=[("Type", "type", False), ("Items", "items", True),
                    ("Function", "function", False)], json_string=True)


def _tools_value(tools: list | None) -> _JSONList:
    out = _JSONList(_tool_struct(t) for t in (tools or []))
    out.go_type = "template.templateTools"
    out.is_nil = tools is None
    return out


def _collate(messages: list[Mapping]) -> tuple[str, list[dict]]:
    """Ollama's collate: consecutive messages of one role (but tool) merge with a blank line;
    returns the system messages joined by a blank line, and the merged list."""
    system: list[str] = []
    out: list[dict] = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise ValueError("a message must be a mapping, not %s" % type(m).__name__)
        role = _str_field(m, "role").lower()
        content = _str_field(m, "content")
        if role == "system":
            system.append(content)
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] += "\n\n" + content
        else:
            out.append(dict(m, role=role, content=content))
    return "\n\n".join(system), out


def _ollama_info(t: GoTemplate) -> dict[str, Any]:
    info = t._ollama
    if not info:
        for root in t._trees.values():
            _check_template_nodes(root)
        variables = t.identifiers()
        root = t._trees[t.name]
        if "messages" not in variables and "response" not in variables:
            response = _ActionNode(len(t.source), _PipeNode(len(t.source), cmds=[
                _CommandNode(len(t.source), [_FieldNode(len(t.source), ["Response"])])]))
            root = _ListNode(root.pos, root.nodes + [response])
        info["vars"] = variables
        info["root"] = root
        info["cut"] = _cut_after_response(root)
    return info


def _check_template_nodes(n) -> None:
    """Ollama's Identifiers() refuses `{{template "x"}}` without a pipeline."""
    if isinstance(n, _ListNode):
        for c in n.nodes:
            _check_template_nodes(c)
    elif isinstance(n, _TemplateNode) and n.pipe is None:
        raise GoTemplateError("undefined template specified", reason="undefined template specified")
    elif isinstance(n, _BranchNode):
        _check_template_nodes(n.list)
        if n.else_list is not None:
            _check_template_nodes(n.else_list)


def _cut_after_response(root: _ListNode) -> _ListNode:
    """Ollama's deleteNode: a copy of the tree with everything after the first `.Response` field
    (in walk order) removed; the pipelines of if/range/with are not walked."""
    cut = False

    def fn(n) -> bool:
        nonlocal cut
        if isinstance(n, _FieldNode) and "Response" in n.ident:
            cut = True
            return False
        return cut

    def walk(n):
        if fn(n):
            return None
        if isinstance(n, _ListNode):
            return _ListNode(n.pos, [c2 for c in n.nodes if (c2 := walk(c)) is not None])
        if isinstance(n, _BranchNode):
            lst = walk(n.list)
            # (Ollama panics when the cut falls inside the list of a branch that has an else;
            # here the else branch is dropped, as everything after the cut is.)
            else_list = walk(n.else_list) if n.else_list is not None else None
            return type(n)(n.pos, n.pipe, lst if lst is not None else _ListNode(n.pos),
                           else_list)
        if isinstance(n, _ActionNode):
            p = walk(n.pipe)
            return None if p is None else _ActionNode(n.pos, p)
        if isinstance(n, _PipeNode):
            cmds = []
            for c in n.cmds:
                args = [a2 for a in c.args if (a2 := walk(a)) is not None]
                if not args:
                    return None
                cmds.append(_CommandNode(c.pos, args))
            if not cmds:
                return None
            return _PipeNode(n.pos, n.decl, cmds, n.is_assign)
        return n

    return walk(root) or _ListNode(root.pos)


def render_ollama(template: GoTemplate, *, system: str | None = None, prompt: str | None = None,
                  response: str = "", messages: list[Mapping] | None = None,
                  tools: list | None = None, think: bool | str | None = None) -> str:
    """Execute `template` once with the values Ollama gives a template.

    `.System`, `.Prompt` and `.Messages` are present when given (`.Messages` as Ollama's message
    structs: `.Role`, `.Content`, `.Thinking`, `.ToolCalls`, `.ToolName`, `.ToolCallID`,
    `.Images`), `.Tools` with the messages or when given (printing as JSON), `.Response`,
    `.Think`, `.ThinkLevel` and `.IsThinkSet` always. The messages are used as given (no merging);
    for Ollama's whole chat logic use `render_ollama_chat`. As in Ollama, a template that mentions
    neither `.Messages` nor `.Response` has `{{ .Response }}` appended."""
    info = _ollama_info(template)
    data: dict[str, Any] = {}
    if system is not None:
        data["System"] = system
    if prompt is not None:
        data["Prompt"] = prompt
    if messages is not None:
        data["Messages"] = [_message_struct(m) for m in messages]
    if messages is not None or tools is not None:
        data["Tools"] = _tools_value(tools)
    data["Response"] = response
    data.update(_think_values(think))
    return template._execute(info["root"], data, "zero", template.name)


def render_ollama_chat(template: GoTemplate, messages: list[Mapping], *, tools: list | None = None,
                       think: bool | str | None = None) -> str:
    """Render a conversation as Ollama's `Template.Execute` does.

    Consecutive messages of one role are merged (blank line between), system messages are also
    joined into `.System`. A template that mentions `.Messages` is executed once with
    `.System`, `.Messages`, `.Tools`, `.Response` "" and the think values. Any other (legacy)
    template is executed once per turn with `.System`/`.Prompt`/`.Response` (a turn ends when a
    user message follows an assistant reply, or a system message follows either; tool messages are
    skipped), and the last turn with the template cut after its `{{ .Response }}`, so the prompt
    ends where the model's answer starts."""
    info = _ollama_info(template)
    system, collated = _collate(messages)
    think_values = _think_values(think)
    if "messages" in info["vars"]:
        data = {"System": system, "Messages": [_message_struct(m) for m in collated],
                "Tools": _tools_value(tools), "Response": ""}
        data.update(think_values)
        return template._execute(info["root"], data, "zero", template.name)

    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def execute() -> None:
        out.append(template._execute(info["root"], dict(turn, **think_values), "zero",
                                     template.name))
        turn.update(System="", Prompt="", Response="")

    for m in collated:
        role, content = m["role"], m["content"]
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                execute()
            turn["System"] = content
        elif role == "user":
            if turn["Response"]:
                execute()
            turn["Prompt"] = content
        elif role == "assistant":
            turn["Response"] = content
    # Ollama runs the cut tree as a new template, without the missingkey=zero option
    out.append(template._execute(info["cut"], dict(turn, **think_values), "default",
                                 template.name))
    return "".join(out)


def ollama_chat_messages(messages: list[Mapping], *, system: str | None = None,
                         model_messages: list[Mapping] | None = None) -> list[Mapping]:
    """The conversation Ollama's /api/chat renders: the Modelfile's MESSAGEs, then the request's
    messages, with the Modelfile's SYSTEM in front unless the request starts with a system
    message."""
    msgs = list(model_messages or []) + list(messages)
    if messages and str(messages[0].get("role", "")).lower() != "system" and system:
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def render_ollama_generate(template: GoTemplate, prompt: str, *, system: str | None = None,
                           model_messages: list[Mapping] | None = None, suffix: str = "",
                           think: bool | str | None = None) -> str:
    """The prompt Ollama's /api/generate renders (not raw): with a suffix, one execution with
    `.Prompt` and `.Suffix`; otherwise the conversation [system] + MESSAGEs + user prompt through
    `render_ollama_chat` (with an empty, non-nil tool list). `system` is the request's system, or
    the Modelfile's when the request has none."""
    if suffix:
        info = _ollama_info(template)
        if prompt:
            data = {"Prompt": prompt, "Suffix": suffix, "Response": ""}
            data.update(_think_values(think))
            return template._execute(info["root"], data, "zero", template.name)
        return render_ollama_chat(template, [], think=think)
    msgs: list[Mapping] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.extend(model_messages or [])
    msgs.append({"role": "user", "content": prompt})
    return render_ollama_chat(template, msgs, tools=[], think=think)
