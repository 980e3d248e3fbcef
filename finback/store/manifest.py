"""Ollama's model manifest: a Docker v2 image manifest whose layers are the model's parts.

    {"schemaVersion": 2,
     "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
     "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:<64 hex>", "size": 487},
     "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:...", "size": 4683073184},
                {"mediaType": "application/vnd.ollama.image.template", ...},
                {"mediaType": "application/vnd.ollama.image.params", ...}]}

The config blob is JSON (Ollama's ConfigV2): model_format, model_family, model_families,
model_type (the parameter size, "7.6B"), file_type (the quantization, "Q4_K_M"), architecture, os,
rootfs.diff_ids. finback adds `parent_model` there when a model was created from another.

Layers, in order:
- `application/vnd.ollama.image.model`: GGUF weights. A split GGUF set is several model layers in
  shard order (shard 1 first); Ollama itself stores only single files, so a set is a finback
  extension that Ollama reads as "several model layers".
- `.template`, `.system` (text), `.params` (JSON object), `.messages` (JSON list of
  {role, content}), `.license` (text; one layer per license), `.adapter`, `.projector` (kept as is).
- `application/vnd.finback.image.safetensors` (ours): a Hugging Face safetensors folder, ONE LAYER
  PER FILE (weights, config.json, tokenizer files), each named by the OCI annotation
  `org.opencontainers.image.title`. Per-file layers (not a tar) because the hubs hash per file (the
  sha256 they publish is the blob digest, so downloads verify and resume per file), identical
  files dedupe across models, and nothing 700 GB is ever re-packed. A title is a plain file name
  (`[A-Za-z0-9_.-]`, not starting with '.'), never a path.

`Manifest.from_json` checks everything it reads (it is used on files from disk): schema, media
types, digests (`sha256:` + 64 lower-case hex, `InvalidDigest` otherwise), sizes (non-negative
integers), titles. Unknown layer media types are kept (forward compatibility), as Ollama does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from finback.store.blobs import InvalidDigest, check_digest  # noqa: F401 (InvalidDigest: raised from here)

SCHEMA_VERSION = 2
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_SAFETENSORS = "application/vnd.finback.image.safetensors"
TITLE = "org.opencontainers.image.title"
MAX_MANIFEST_BYTES = 16 << 20

_TITLE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}\Z")


class InvalidManifest(ValueError):
    def __init__(self, problem: str, source: str | None = None):
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: invalid manifest: {problem}" if source else f"invalid manifest: {problem}")


def check_title(title: object) -> str:
    if not isinstance(title, str) or not _TITLE_RE.match(title) or ".." in title:
        raise ValueError(f"invalid file name {title!r} in a layer title: a plain name of letters, digits, "
                         "'_', '.', '-' is required")
    return title


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str | None = None
    annotations: dict[str, str] | None = None

    @property
    def title(self) -> str | None:
        return (self.annotations or {}).get(TITLE)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            d["from"] = self.from_
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str, source: str | None = None) -> "Layer":
        if not isinstance(d, dict):
            raise InvalidManifest(f"{where} is not an object", source)
        mt = d.get("mediaType")
        if not isinstance(mt, str) or not mt or len(mt) > 255:
            raise InvalidManifest(f"{where}.mediaType is missing or not a string", source)
        digest = check_digest(d.get("digest"), f"{source or 'manifest'} {where}")  # InvalidDigest
        size = d.get("size")
        if type(size) is not int or size < 0:
            raise InvalidManifest(f"{where}.size must be a non-negative integer, got {size!r}", source)
        frm = d.get("from")
        if frm is not None and not isinstance(frm, str):
            raise InvalidManifest(f"{where}.from must be a string", source)
        ann = d.get("annotations")
        if ann is not None:
            if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
                raise InvalidManifest(f"{where}.annotations must map strings to strings", source)
            if TITLE in ann:
                try:
                    check_title(ann[TITLE])
                except ValueError as e:
                    raise InvalidManifest(f"{where}: {e}", source) from None
        if mt == MEDIA_SAFETENSORS and not (ann and TITLE in ann):
            raise InvalidManifest(f"{where}: a safetensors layer needs a {TITLE} annotation", source)
        return cls(mt, digest, size, frm or None, dict(ann) if ann else None)


@dataclass
class Manifest:
    config: Layer
    layers: list[Layer] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    media_type: str = MEDIA_MANIFEST

    # --- (de)serialisation ---

    def to_dict(self) -> dict[str, Any]:
        return {"schemaVersion": self.schema_version, "mediaType": self.media_type,
                "config": self.config.to_dict(), "layers": [l.to_dict() for l in self.layers]}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str, source: str | None = None) -> "Manifest":
        if isinstance(data, str):
            data = data.encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidManifest(f"{len(data)} bytes is too large", source)
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidManifest(f"not JSON ({e})", source) from None
        if not isinstance(d, dict):
            raise InvalidManifest("not a JSON object", source)
        if d.get("schemaVersion") != SCHEMA_VERSION or type(d.get("schemaVersion")) is not int:
            raise InvalidManifest(f"schemaVersion must be 2, got {d.get('schemaVersion')!r}", source)
        mt = d.get("mediaType", MEDIA_MANIFEST)
        if mt != MEDIA_MANIFEST:
            raise InvalidManifest(f"mediaType must be {MEDIA_MANIFEST}, got {mt!r}", source)
        config = Layer.from_dict(d.get("config"), "config", source)
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise InvalidManifest("layers must be a list", source)
        m = cls(config, [Layer.from_dict(l, f"layers[{i}]", source) for i, l in enumerate(layers)])
        titles = [l.title for l in m.layers if l.media_type == MEDIA_SAFETENSORS]
        if len(set(t.lower() for t in titles if t)) != len(titles):
            raise InvalidManifest("two safetensors layers have the same title", source)
        return m

    # --- queries ---

    def layers_of(self, media_type: str) -> list[Layer]:
        return [l for l in self.layers if l.media_type == media_type]

    def first(self, media_type: str) -> Layer | None:
        for l in self.layers:
            if l.media_type == media_type:
                return l
        return None

    @property
    def model_layers(self) -> list[Layer]:
        return self.layers_of(MEDIA_MODEL)

    @property
    def format(self) -> str | None:
        """'gguf', 'safetensors', or None when the manifest holds no weights."""
        if self.model_layers:
            return "gguf"
        if self.layers_of(MEDIA_SAFETENSORS):
            return "safetensors"
        return None

    @property
    def total_size(self) -> int:
        return self.config.size + sum(l.size for l in self.layers)

    def digests(self) -> set[str]:
        """Every blob the manifest references (config included)."""
        return {self.config.digest} | {l.digest for l in self.layers}
