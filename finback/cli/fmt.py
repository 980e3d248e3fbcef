"""Ollama's ways of writing sizes, times and durations (its `format` package and Go's
time.Duration), and its `--verbose` statistics block."""

from __future__ import annotations

import datetime as dt
import math
import sys


def human_bytes(b: int) -> str:
    """format.HumanBytes: decimal units, '91 MB', '4.7 GB', '512 B'."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            v = b / div
            if v >= 10 or v == math.trunc(v):
                return f"{int(v)} {unit}"
            return f"{v:.1f} {unit}"
    return f"{b} B"


def _human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    # Go writes nanoseconds; Python reads at most microseconds
    if "." in v:
        head, _, tail = v.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        rest = tail[len(digits):]
        v = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def human_time(value: str | dt.datetime | None, zero: str = "Never", now: dt.datetime | None = None) -> str:
    """format.HumanTime: '2 minutes ago', '4 minutes from now', 'Forever'."""
    t = parse_time(value) if isinstance(value, str) or value is None else value
    if t is None:
        return zero
    now = now or dt.datetime.now(dt.timezone.utc)
    delta = (now - t).total_seconds()
    if delta / 3600 / 24 / 365 < -20:
        return "Forever"
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def _frac(v: int, prec: int) -> str:
    whole, f = divmod(v, 10 ** prec)
    s = str(whole)
    if f:
        s += "." + str(f).zfill(prec).rstrip("0")
    return s


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): '1.234567s', '12.5ms', '830µs', '1m2.5s', '0s'."""
    ns = int(ns)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_frac(ns, 3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_frac(ns, 6)}ms"
    hours, rem = divmod(ns, 3600 * 10 ** 9)
    minutes, rem = divmod(rem, 60 * 10 ** 9)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + _frac(rem, 9) + "s"


def stats_block(final: dict) -> str:
    """What `ollama run --verbose` prints after an answer (api.Metrics.Summary)."""
    lines = []
    if final.get("total_duration"):
        lines.append(f"total duration:       {go_duration(final['total_duration'])}")
    if final.get("load_duration") is not None:
        lines.append(f"load duration:        {go_duration(final['load_duration'])}")
    pc, pd = final.get("prompt_eval_count") or 0, final.get("prompt_eval_duration") or 0
    if pc:
        lines.append(f"prompt eval count:    {pc} token(s)")
    if pd:
        lines.append(f"prompt eval duration: {go_duration(pd)}")
        lines.append(f"prompt eval rate:     {pc / (pd / 1e9):.2f} tokens/s")
    ec, ed = final.get("eval_count") or 0, final.get("eval_duration") or 0
    if ec:
        lines.append(f"eval count:           {ec} token(s)")
    if ed:
        lines.append(f"eval duration:        {go_duration(ed)}")
        lines.append(f"eval rate:            {ec / (ed / 1e9):.2f} tokens/s")
    return "\n".join(lines)


def print_stats(final: dict) -> None:
    sys.stderr.write(stats_block(final) + "\n")
    sys.stderr.flush()


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain columns as Ollama's list/ps print them (no borders, left aligned)."""
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    out = []
    for r in [headers, *rows]:
        out.append("    ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(out)
