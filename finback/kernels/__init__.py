"""Triton kernels and their pure-torch references, one file per kernel family.

Conventions every kernel module follows:
- `triton` is optional: a CPU install without it imports every module here (the kernels are then
  unavailable and callers take the torch path). Use `HAS_TRITON` and import triton under it.
- Each kernel has a torch reference in the same file (`*_ref`), which is also the CPU path, and a
  test in tests/kernels/ compares the two on fresh random inputs with a poisoned output buffer. On CPU
  the tests run the kernels under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
  before any kernel is defined); on a GPU the same tests run the compiled kernels.
- Only what triton 3.6 offers is used (the GPU machines have triton 3.6 and torch 2.11).
- `use_triton(t)` says whether layers should dispatch to a kernel for tensor `t`: only on CUDA.
  Layers on CPU always take the torch path (even when the interpreter is on, as in the tests);
  kernel tests call the kernel functions directly.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the install
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken triton install
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda
