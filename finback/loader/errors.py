"""The one error type a bad model file raises: it names the file and the problem."""

from __future__ import annotations

import os


class ModelLoadError(ValueError):
    """A model file (GGUF, safetensors, config.json) that cannot be loaded.

    `str(err)` is "<path>: <problem>", so a user sees which file is bad and why.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
