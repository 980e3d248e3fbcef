"""`finback run`: a one-shot answer or Ollama's chat REPL, as a client of the server.

The conversation lives here (the messages sent with each /api/chat request); the server keeps the
model loaded between turns. Reasoning arrives in `thinking` (think=true is sent to models whose
capabilities include "thinking") and is printed dimmed, apart from the answer. Ctrl-C during an
answer closes the HTTP stream, which aborts the request on the server; the session goes on, and the
interrupted turn is forgotten.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from finback.cli import fmt
from finback.cli.client import APIStatusError, CLIError, Client

DIM, RESET = "\x1b[2m", "\x1b[0m"

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""

SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set think             Enable thinking
  /set nothink           Disable thinking
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""

SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""


class Session:
    def __init__(self, client: Client, model: str, *, options: dict[str, Any], system: str | None,
                 think: bool | None, hide_thinking: bool, verbose: bool, keep_alive: str | None,
                 info: dict | None):
        self.client = client
        self.model = model
        self.options = dict(options)
        self.system = system
        self.think = think
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self.keep_alive = keep_alive
        self.info = info
        self.messages: list[dict[str, Any]] = []
        self.color = sys.stdout.isatty()

    # -- one answer ------------------------------------------------------------------------
    def _request(self) -> dict[str, Any]:
        msgs = list(self.messages)
        if self.system:
            msgs.insert(0, {"role": "system", "content": self.system})
        req: dict[str, Any] = {"model": self.model, "messages": msgs, "stream": True}
        if self.options:
            req["options"] = self.options
        if self.think is not None:
            req["think"] = self.think
        if self.keep_alive is not None:
            req["keep_alive"] = self.keep_alive
        return req

    def answer(self, prompt: str) -> bool:
        """Send `prompt` as the next user turn and stream the answer. False if interrupted."""
        self.messages.append({"role": "user", "content": prompt})
        out = sys.stdout
        content: list[str] = []
        thinking_open = False
        final = None
        stream = None
        try:
            stream = self.client.stream("/api/chat", self._request())
            for item in stream:
                msg = item.get("message") or {}
                think = msg.get("thinking") or ""
                text = msg.get("content") or ""
                if think and not self.hide_thinking:
                    if not thinking_open:
                        out.write((DIM if self.color else "") + "Thinking...\n")
                        thinking_open = True
                    out.write(think)
                if text:
                    if thinking_open:
                        out.write("\n...done thinking.\n\n" + (RESET if self.color else ""))
                        thinking_open = False
                    out.write(text)
                    content.append(text)
                out.flush()
                if item.get("done"):
                    final = item
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # the server aborts the request when the connection drops
            if thinking_open and self.color:
                out.write(RESET)
            out.write("\n")
            out.flush()
            self.messages.pop()
            return False
        except BaseException:
            self.messages.pop()
            raise
        finally:
            if stream is not None:
                stream.close()
        if thinking_open:
            out.write("\n...done thinking.\n\n" + (RESET if self.color else ""))
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": "".join(content)})
        if self.verbose and final is not None:
            fmt.print_stats(final)
        return True

    # -- the REPL --------------------------------------------------------------------------
    def _read(self, prompt: str) -> str:
        return input(prompt)

    def repl(self) -> int:
        try:
            import readline  # noqa: F401  (history and line editing for input())
        except ImportError:
            pass
        while True:
            try:
                line = self._read(">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.")
                continue
            stripped = line.strip()
            if stripped.startswith('"""'):
                try:
                    line = self._multiline(line.lstrip()[3:])
                except EOFError:
                    print()
                    return 0
                except KeyboardInterrupt:
                    print()
                    continue
                if line is None:
                    continue
                self.answer(line)
                print()
                continue
            if not stripped:
                continue
            if stripped.startswith("/"):
                if self.command(stripped):
                    return 0
                continue
            self.answer(line)
            print()

    def _multiline(self, first: str) -> str | None:
        parts = []
        rest = first
        while True:
            if rest.rstrip().endswith('"""'):
                parts.append(rest.rstrip()[:-3])
                break
            parts.append(rest)
            rest = self._read("... ")
        text = "\n".join(parts).strip("\n")
        return text if text.strip() else None

    def command(self, line: str) -> bool:
        """Run a /command. True to end the session."""
        args = line.split()
        cmd = args[0]
        if cmd in ("/bye", "/exit"):
            return True
        if cmd in ("/?", "/help"):
            topic = args[1] if len(args) > 1 else ""
            print(SET_HELP if topic == "/set" else SHOW_HELP if topic == "/show" else HELP)
        elif cmd == "/clear":
            self.messages.clear()
            print("Cleared session context")
        elif cmd == "/set":
            self._set(line, args)
        elif cmd == "/show":
            self._show(args)
        else:
            print(f"Unknown command '{cmd}'. Type /? for help")
        return False

    def _set(self, line: str, args: list[str]) -> None:
        if len(args) < 2:
            print(SET_HELP)
            return
        what = args[1]
        if what == "verbose":
            self.verbose = True
            print("Set 'verbose' mode.")
        elif what == "quiet":
            self.verbose = False
            print("Set 'quiet' mode.")
        elif what == "think":
            self.think = True
            print("Set 'think' mode.")
        elif what == "nothink":
            self.think = False
            print("Set 'nothink' mode.")
        elif what == "system":
            text = line.split(None, 2)[2] if len(args) > 2 else ""
            if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
                text = text[3:-3]
            elif len(text) >= 2 and text[0] == text[-1] == '"':
                text = text[1:-1]
            self.system = text or None
            print("Set system message.")
        elif what == "parameter":
            if len(args) < 4:
                print("Usage:\n  /set parameter <name> <value>")
                return
            name = args[2]
            raw = line.split(None, 3)[3]
            try:
                value = parse_option(name, raw)
            except ValueError as exc:
                print(f"Couldn't set parameter: {exc}")
                return
            if name == "stop":
                self.options.setdefault("stop", [])
                self.options["stop"] = list(self.options["stop"]) + value
            else:
                self.options[name] = value
            print(f"Set parameter '{name}' to '{raw}'")
        else:
            print(f"Unknown command '/set {what}'. Type /? for help")

    def _show(self, args: list[str]) -> None:
        from finback.cli import commands

        if len(args) < 2:
            print(SHOW_HELP)
            return
        what = args[1]
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            print(f"Unknown command '/show {what}'. Type /? for help")
            return
        if self.info is None:
            try:
                self.info = commands.show_info(self.client, self.model)
            except CLIError as exc:
                print(f"error: couldn't get model information: {exc}")
                return
        if what == "info":
            print(commands.summary(self.info))
        elif what == "modelfile":
            print(commands._modelfile_text(self.info, self.model))
        elif what == "system":
            text = self.system if self.system is not None else self.info.get("system")
            print(text or "No system message was specified for this model.")
        elif what == "parameters":
            model_lines = [ln for ln in (self.info.get("parameters") or "").splitlines() if ln.strip()]
            user_lines = [f"{k} {item}" for k, v in self.options.items()
                          for item in (v if isinstance(v, list) else [v])]
            if self.system is not None:
                user_lines.append(f"system {self.system}")
            if not model_lines and not user_lines:
                print("No parameters were specified for this model.")
            for title, lines in (("User defined parameters:", user_lines),
                                 ("Model defined parameters:", model_lines)):
                if lines:
                    print(title)
                    for ln in lines:
                        k, _, v = ln.partition(" ")
                        print(f"{k:<30}{v.strip()}")
                    print()
        else:
            text = self.info.get(what) or ""
            print(text if text else f"No {what} was specified for this model.")


def parse_option(name: str, raw: str) -> Any:
    """A /set parameter value typed as Ollama types it (api.Options field types)."""
    from finback.store.modelfile import PARAMETER_TYPES

    kind = PARAMETER_TYPES.get(name)
    extra = {"max_thinking_tokens": int}
    kind = kind or extra.get(name)
    if kind is None:
        raise ValueError(f"unknown parameter '{name}'")
    raw = raw.strip()
    if kind is list:
        v = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
        return [v]
    if kind is bool:
        if raw.lower() in ("1", "t", "true"):
            return True
        if raw.lower() in ("0", "f", "false"):
            return False
        raise ValueError(f"invalid bool value '{raw}'")
    try:
        return int(raw) if kind is int else float(raw)
    except ValueError:
        raise ValueError(f"invalid {kind.__name__} value '{raw}'") from None


def start(client: Client, ns) -> int:
    """`finback run MODEL [PROMPT]`."""
    from finback.cli import commands

    model = ns.model
    info = None
    if os.path.exists(model):
        model = os.path.abspath(model)  # the server opens a path as the model (its cwd is not ours)
    else:
        try:
            info = commands.show_info(client, model)
        except APIStatusError as exc:
            if exc.status != 404:
                raise
            # Ollama pulls what it does not have; the embedded default model installs itself
            try:
                commands.pull(client, model, quiet=not sys.stderr.isatty())
            except CLIError as pull_exc:
                if "does not exist" in str(pull_exc) or "not found" in str(pull_exc):
                    raise CLIError(str(exc)) from None  # the server's "model 'x' not found"
                raise
            info = commands.show_info(client, model)
    think = ns.think
    if think is None and info is not None and "thinking" in (info.get("capabilities") or []):
        think = True
    session = Session(client, model, options=options_from_flags(ns), system=ns.system, think=think,
                      hide_thinking=ns.hidethinking, verbose=ns.verbose, keep_alive=ns.keepalive, info=info)
    prompt = " ".join(ns.prompt or [])
    if not sys.stdin.isatty():
        data = sys.stdin.read()
        if data.strip():
            prompt = (data + ("\n" + prompt if prompt else "")).strip()
        elif not prompt:
            return 0
    if prompt:
        session.answer(prompt)
        return 0
    # interactive: load the model first (Ollama shows a spinner here)
    req: dict[str, Any] = {"model": model, "messages": []}
    if ns.keepalive is not None:
        req["keep_alive"] = ns.keepalive
    client.json("POST", "/api/chat", req)
    return session.repl()


def options_from_flags(ns) -> dict[str, Any]:
    """The old sampling flags, as Ollama options."""
    opts: dict[str, Any] = {}
    for flag, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("max_tokens", "num_predict"), ("sampling_seed", "seed"), ("num_ctx", "num_ctx")):
        v = getattr(ns, flag, None)
        if v is not None:
            opts[key] = v
    if getattr(ns, "stop", None):
        opts["stop"] = list(ns.stop)
    for item in getattr(ns, "option", None) or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise CLIError(f"--option takes KEY=VALUE, not {item!r}")
        try:
            val = parse_option(k, v)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        opts[k] = (opts.get(k, []) + val) if isinstance(val, list) else val
    return opts
