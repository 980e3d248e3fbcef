"""Jinja chat templates, rendered exactly as Hugging Face `transformers` renders them.

A model ships its chat template as Jinja source: in GGUF metadata (`tokenizer.chat_template`), in
`tokenizer_config.json` (`chat_template`, a string or a list of named templates) or, in the newer
layout, as a `chat_template.jinja` file beside it. `ChatTemplate` compiles that source once and renders
conversations into the prompt string the model was trained on, with the same output, byte for byte, as
`tokenizer.apply_chat_template(messages, tokenize=False, ...)`:

- the same Jinja environment: an immutable sandbox, `trim_blocks`, `lstrip_blocks`, the `loopcontrols`
  extension and the `{% generation %}` tag; `tojson` that keeps non-ASCII text as is and takes
  `indent`, `separators` and `sort_keys`; the globals `raise_exception`, `strftime_now`, a safe `dict`
  and a `namespace` that refuses underscore names;
- the same context: `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
  (`bos_token`, `eos_token`, ...) and any extra keyword arguments, which override the special tokens;
- the same preparation of the messages: keys whose value is None are dropped, everything is copied
  into plain JSON-like data, reasoning given under `reasoning_content`, `thinking` or `reasoning` is
  visible under the first two names;
- the same `continue_final_message`: the prompt ends where the last message's text ends, so the model
  continues it.

Untrusted templates stay in the sandbox: a template that reaches for Python internals, mutates its
inputs, calls `raise_exception` or fails in any other way raises `ChatTemplateError`.

This module imports only jinja2 and the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]

# Older jinja2 releases have known sandbox escapes, and chat templates come from untrusted model files.
_MIN_JINJA2 = (3, 1, 6)

# Names a message's reasoning may come under; the first is the one chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Appended to the text of the final message for `continue_final_message`, then cut off again.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_EXTRA_TEMPLATES_DIR = "additional_chat_templates"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_GGUF_TEMPLATE_KEY = "tokenizer.chat_template"


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered, or messages it cannot be rendered with."""


class _TemplateRaised(TemplateError):
    """What `raise_exception(message)` raises inside a template."""


# ---------------------------------------------------------------------------------------------
# The Jinja environment


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and takes only `indent`; templates are
    # written against this one.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the class itself (and its attributes) being reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
            "Please rename the attribute."
        )


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses dunder (and any underscore) attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _jinja2_version() -> tuple[int, ...]:
    parts = []
    for piece in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_ENVIRONMENT: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        if _jinja2_version() < _MIN_JINJA2:
            raise ChatTemplateError(
                f"chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA2))} (older releases have known "
                f"sandbox escapes); this is jinja2 {jinja2.__version__}"
            )
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        _ENVIRONMENT = env  # building it twice in a race is harmless: both are the same
    return _ENVIRONMENT


# ---------------------------------------------------------------------------------------------
# Preparing what the template sees


def _to_dicts(value: Any) -> Any:
    """Mappings, dataclasses and pydantic models (e.g. OpenAI SDK messages) to dicts, recursively."""
    if isinstance(value, Mapping):
        return {key: _to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _to_dicts(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    """A copy made only of JSON-like data (str, int, float, bool, None, dict, list, tuple).

    Anything else becomes an inert placeholder naming its type ("<ndarray>"): rich objects carry
    methods the sandbox does not know are dangerous.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses, str enums: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalars (np.bool_(False) must not become a truthy string)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    prepared = []
    for index, message in enumerate(_to_dicts(list(messages))):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {index} must be a dict, got {type(message).__name__}: {message!r:.80}")
        # APIs send `content: null`, `tool_calls: null`; templates handle a missing key better than None.
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if not isinstance(role, str):
            problem = "has no role" if role is None else f"has a role that is not a string ({type(role).__name__})"
            raise ChatTemplateError(f"message {index} {problem}: {message!r:.80}")
        message = _plain(message)
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _prepare_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list of JSON schemas (dicts), got {type(tools).__name__}")
    schemas = []
    for index, tool in enumerate(_to_dicts(list(tools))):
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"tool {index} must be a JSON schema (a dict), got {type(tool).__name__}")
        schemas.append(tool)
    return _plain(schemas)


def _prepare_documents(documents: Any) -> list | None:
    if documents is None:
        return None
    if not isinstance(documents, (list, tuple)):
        raise ChatTemplateError(f"documents must be a list of dicts, got {type(documents).__name__}")
    documents = _to_dicts(list(documents))
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise ChatTemplateError(f"document {index} must be a dict with 'title' and 'text' keys")
    return _plain(documents)


# ---------------------------------------------------------------------------------------------
# The template


class ChatTemplate:
    """A chat template compiled once; `render` turns a conversation into the model's prompt text.

    `bos_token`, `eos_token` and any other special tokens given by keyword (`pad_token`, `unk_token`,
    ...) are visible to the template under those names; tokens given as None are left out, as
    transformers leaves out a tokenizer's unset special tokens.
    """

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None, **special_tokens: str | None):
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template is Jinja source text (str), got {type(source).__name__}")
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}
        for name, value in tokens.items():
            if value is not None and not isinstance(value, str):
                raise ChatTemplateError(f"special token {name} must be a string, got {type(value).__name__}")
        self.source = source
        self.special_tokens: dict[str, str] = {name: value for name, value in tokens.items() if value is not None}
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as err:
            raise ChatTemplateError(f"chat template does not compile: {err.message} (line {err.lineno})") from err
        except TemplateError as err:
            raise ChatTemplateError(f"chat template does not compile: {err}") from err

    def __repr__(self) -> str:
        head = self.source[:40] + ("..." if len(self.source) > 40 else "")
        return f"ChatTemplate({head!r}, {len(self.source)} chars)"

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        documents: list | None = None,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, as `apply_chat_template(messages, tokenize=False, ...)` gives it.

        `add_generation_prompt` ends the prompt with the header of a new assistant turn.
        `continue_final_message` instead ends the prompt where the final message's text ends, so the
        model continues that message; it implies `add_generation_prompt=False`. Pass a field name
        (e.g. "reasoning_content") to continue that field instead of "content".
        `tools` are JSON schemas; `documents` are dicts (usually with "title" and "text"). Any other
        keyword argument is passed to the template as a variable (e.g. `enable_thinking=False`,
        `date_string=...`), overriding a special token of the same name.
        """
        chat = _prepare_messages(messages)
        tool_schemas = _prepare_tools(tools)
        documents = _prepare_documents(documents)
        variables = {**self.special_tokens, **_plain(kwargs)}
        if continue_final_message:
            add_generation_prompt = False
            field, final_text = self._tag_final_message(chat, continue_final_message)
        try:
            rendered = self._template.render(
                messages=chat,
                tools=tool_schemas,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as err:
            raise ChatTemplateError(f"chat template raised an error: {err.message}") from err
        except SecurityError as err:
            raise ChatTemplateError(f"chat template tried an unsafe operation (SecurityError): {err}") from err
        except TemplateError as err:
            raise ChatTemplateError(f"chat template failed to render: {type(err).__name__}: {err}") from err
        except RecursionError as err:
            raise ChatTemplateError("chat template failed to render: recursion too deep") from err
        except Exception as err:  # noqa: BLE001 - any failure of an untrusted template is the template's
            raise ChatTemplateError(f"chat template failed to render: {type(err).__name__}: {err}") from err
        if continue_final_message:
            rendered = self._cut_at_tag(rendered, field, final_text)
        return rendered

    def _tag_final_message(self, chat: list[dict], continue_final_message: bool | str) -> tuple[str, str]:
        """Append the continue tag to the final message's text; returns (field, original text)."""
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1]
        final_message = final.get(field)
        if final_message is None:
            raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:
            # Reasoning is copied under several names: tag every copy, accept whichever the template reads.
            fields = [name for name in _REASONING_FIELDS if final.get(name) == final_message]
        if not any(name in self.source for name in fields):
            raise ChatTemplateError(
                f'continue_final_message is set to "{field}" but this is not an accepted field in the chat_template'
            )
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if isinstance(block, dict) and "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError(
                    "continue_final_message is set but we could not find any text to continue in the final message!"
                )
        else:
            for name in fields:
                try:
                    final[name] = final[name] + _CONTINUE_TAG
                except TypeError as err:
                    raise ChatTemplateError(
                        f'continue_final_message is set but the final message\'s "{name}" is not text'
                    ) from err
        if not isinstance(final_message, str):
            raise ChatTemplateError("continue_final_message is set but the text to continue is not a string")
        return field, final_message

    @staticmethod
    def _cut_at_tag(rendered: str, field: str, final_text: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                "continue_final_message is set but the final message does not appear in the chat after applying "
                "the chat template (the template deletes portions of it, e.g. reasoning before </think>). "
                f"Final message to continue: {final_text.strip()!r:.200}"
            )
        at = rendered.rindex(tag)
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:at]  # the template kept the text as is
        return rendered[:at].rstrip()  # the template trimmed trailing space: so do we


# ---------------------------------------------------------------------------------------------
# Finding a model's template


def _template_from_gguf_metadata(metadata: Mapping) -> str | None:
    value = metadata.get(_GGUF_TEMPLATE_KEY)
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    raise ChatTemplateError(f"GGUF metadata {_GGUF_TEMPLATE_KEY} is not a string ({type(value).__name__})")


def _pick_default(templates: Mapping[str, str], where: str) -> str:
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(
        f"{where} has several chat templates and none named 'default': {sorted(templates)}"
    )


def _template_from_tokenizer_config(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as err:
        raise ChatTemplateError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{path}: not a JSON object")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        try:
            named = {entry["name"]: entry["template"] for entry in template}
        except (TypeError, KeyError) as err:
            raise ChatTemplateError(f"{path}: chat_template list entries need 'name' and 'template'") from err
        return _pick_default(named, path)
    if isinstance(template, dict):
        return _pick_default(template, path)
    raise ChatTemplateError(f"{path}: chat_template is neither a string nor a list ({type(template).__name__})")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _template_from_folder(folder: str) -> str | None:
    # transformers' order: chat_template.jinja (and additional_chat_templates/*.jinja) replace any
    # chat_template in tokenizer_config.json.
    templates: dict[str, str] = {}
    main_file = os.path.join(folder, _CHAT_TEMPLATE_FILE)
    if os.path.isfile(main_file):
        templates["default"] = _read_text(main_file)
    extra_dir = os.path.join(folder, _EXTRA_TEMPLATES_DIR)
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            file = os.path.join(extra_dir, name)
            if name.endswith(".jinja") and os.path.isfile(file):
                templates[name.removesuffix(".jinja")] = _read_text(file)
    if templates:
        return _pick_default(templates, folder)
    config = os.path.join(folder, _TOKENIZER_CONFIG_FILE)
    if os.path.isfile(config):
        return _template_from_tokenizer_config(config)
    return None


def load_chat_template(path_or_metadata: str | os.PathLike | Mapping) -> str | None:
    """The Jinja source of a model's default chat template, or None if the model has none.

    Takes a GGUF metadata dict (`tokenizer.chat_template`), a model folder (`chat_template.jinja`,
    else `tokenizer_config.json`'s `chat_template`: a string, or a list of named templates of which
    the one named "default" is taken), or a single file: a `.jinja` template, a tokenizer_config
    `.json`, or a GGUF file (read with `finback.loader.gguf.read_gguf_metadata`).
    """
    if isinstance(path_or_metadata, Mapping):
        return _template_from_gguf_metadata(path_or_metadata)
    if not isinstance(path_or_metadata, (str, os.PathLike)):
        raise TypeError(f"expected a path or a GGUF metadata dict, got {type(path_or_metadata).__name__}")
    path = os.fspath(path_or_metadata)
    if os.path.isdir(path):
        return _template_from_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        from finback.loader.gguf import read_gguf_metadata  # only for GGUF files: keeps this module light

        return _template_from_gguf_metadata(read_gguf_metadata(path))
    if path.endswith(".json"):
        return _template_from_tokenizer_config(path)
    return _read_text(path)
