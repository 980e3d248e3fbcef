"""Model names as Ollama writes them: `[host/][namespace/]model[:tag]`.

    deepseek-r1:7b                    -> registry.finback.local/library/deepseek-r1:7b
    myteam/r1-tuned                   -> registry.finback.local/myteam/r1-tuned:latest
    hf.co/unsloth/DeepSeek-R1-GGUF:UD-IQ1_S
    registry.ollama.ai/library/deepseek-r1:7b   (a model pulled by Ollama itself)

Rules (a superset of Ollama's, stricter where a name becomes a path on disk):
- every part is non-empty and made of `[A-Za-z0-9_.-]` (the host may also carry one `:port`);
- every part starts with a letter, a digit or `_` (so no `.`, `..`, `-x`, hidden files);
- no `..` anywhere, no `/` at either end, no empty part (`a//b`), at most host/namespace/model;
- lengths: host <= 350, namespace <= 80, model <= 128, tag <= 128 characters;
- a leading `http://` or `https://` is dropped, as Ollama does (people paste URLs).

A bad name raises `InvalidModelName` (a ValueError). Names compare case-insensitively (ASCII), as
Ollama's `Name.EqualFold`: `DeepSeek-R1:7B` and `deepseek-r1:7b` are the same model; the parts keep
the case they were typed with for display.

Hosts: a name typed without a host gets `DEFAULT_HOST` (`registry.finback.local`): that is where
models created or pulled by finback are written. Reading also looks under Ollama's
`registry.ollama.ai`, so pointing FINBACK_MODELS at an Ollama models folder works. `hf.co` (and
`huggingface.co`) names are Hugging Face repos, `modelscope.cn` names ModelScope repos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_HOST = "registry.finback.local"
OLLAMA_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
#: hosts tried, in order, for a name typed without one
READ_HOSTS = (DEFAULT_HOST, OLLAMA_HOST)
HF_HOSTS = ("hf.co", "huggingface.co")
MODELSCOPE_HOSTS = ("modelscope.cn", "www.modelscope.cn")

MAX_HOST = 350
MAX_NAMESPACE = 80
MAX_MODEL = 128
MAX_TAG = 128

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(?::[0-9]{1,5})?\Z")


class ModelNotFound(ValueError):
    """A well-formed name that is neither in the store nor anywhere it can come from."""


class InvalidModelName(ValueError):
    """A model name that does not follow `[host/][namespace/]model[:tag]` and its character rules."""

    def __init__(self, name: object, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f"invalid model name {name!r}: {problem}")


def _fold(s: str) -> str:
    # ASCII-only lower case, as Ollama's downcase (names are ASCII anyway)
    return s.translate(_FOLD)


_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check_part(raw: str, kind: str, value: str, limit: int, pattern: re.Pattern) -> None:
    if value == "":
        raise InvalidModelName(raw, f"empty {kind}")
    if len(value) > limit:
        raise InvalidModelName(raw, f"{kind} is {len(value)} characters (at most {limit})")
    if ".." in value:
        raise InvalidModelName(raw, f"{kind} {value!r} contains '..'")
    if not pattern.match(value):
        raise InvalidModelName(
            raw, f"{kind} {value!r} must start with a letter, digit or '_' and use only letters, digits, "
            "'_', '.' and '-'")


@dataclass(frozen=True, eq=False)
class ModelName:
    """A parsed, validated model name. Build one with `ModelName.parse`.

    `host_given` tells whether the host was typed: a name without one is looked up under every host
    of `READ_HOSTS` and written under `DEFAULT_HOST`.
    """

    host: str
    namespace: str
    model: str
    tag: str
    host_given: bool = True

    @classmethod
    def parse(cls, name: "str | ModelName") -> "ModelName":
        if isinstance(name, ModelName):
            return name
        if not isinstance(name, str):
            raise InvalidModelName(name, "a model name must be a string")
        raw = name
        s = name
        for scheme in ("http://", "https://"):
            if s.startswith(scheme):
                s = s[len(scheme):]
                break
        if s == "":
            raise InvalidModelName(raw, "empty name")
        if len(s) > MAX_HOST + MAX_NAMESPACE + MAX_MODEL + MAX_TAG + 3:
            raise InvalidModelName(raw, "too long")
        if s.startswith("/"):
            raise InvalidModelName(raw, "a model name is not an absolute path")
        slash = s.rfind("/")
        colon = s.rfind(":")
        tag = None
        if colon > slash:
            s, tag = s[:colon], s[colon + 1:]
            if tag == "":
                raise InvalidModelName(raw, "empty tag after ':'")
        parts = s.split("/")
        if len(parts) > 3:
            raise InvalidModelName(raw, "too many '/': the form is [host/][namespace/]model[:tag]")
        host_given = len(parts) == 3
        host = parts[0] if host_given else DEFAULT_HOST
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        model = parts[-1]
        if host_given:
            _check_part(raw, "host", host, MAX_HOST, _HOST)
        _check_part(raw, "namespace", namespace, MAX_NAMESPACE, _PART)
        _check_part(raw, "model", model, MAX_MODEL, _PART)
        if tag is None:
            tag = DEFAULT_TAG
        _check_part(raw, "tag", tag, MAX_TAG, _PART)
        return cls(host, namespace, model, tag, host_given)

    # --- views of the name ---

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """(host, namespace, model, tag): the folders of the manifest path, in order."""
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Case-folded parts: equal keys are the same model."""
        return tuple(_fold(p) for p in self.parts)  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = ModelName.parse(other)
            except InvalidModelName:
                return False
        if not isinstance(other, ModelName):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def with_host(self, host: str) -> "ModelName":
        _check_part(host, "host", host, MAX_HOST, _HOST)
        return ModelName(host, self.namespace, self.model, self.tag, True)

    def with_tag(self, tag: str) -> "ModelName":
        _check_part(tag, "tag", tag, MAX_TAG, _PART)
        return ModelName(self.host, self.namespace, self.model, tag, self.host_given)

    @property
    def is_hf(self) -> bool:
        return _fold(self.host) in HF_HOSTS

    @property
    def is_modelscope(self) -> bool:
        return _fold(self.host) in MODELSCOPE_HOSTS

    @property
    def repo(self) -> str:
        """`namespace/model`: the hub repo id for hf.co / modelscope.cn names."""
        return f"{self.namespace}/{self.model}"

    @property
    def is_default_host(self) -> bool:
        return _fold(self.host) in READ_HOSTS

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __repr__(self) -> str:
        return f"ModelName({str(self)!r})"

    @property
    def display(self) -> str:
        """The shortest form, as `ollama list` shows it: `deepseek-r1:7b`, `myteam/x:latest`,
        `hf.co/unsloth/DeepSeek-R1-GGUF:UD-IQ1_S`. The tag is always shown."""
        if self.is_default_host:
            if _fold(self.namespace) == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return str(self)


def parse_name(name: "str | ModelName") -> ModelName:
    return ModelName.parse(name)


def is_valid_name(name: str) -> bool:
    try:
        ModelName.parse(name)
    except InvalidModelName:
        return False
    return True
