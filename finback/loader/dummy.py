"""Random weights of a real shape: vLLM's `--load-format dummy`.

`DummyCheckpoint(path)` reads only a config (a Hugging Face config.json, or a folder holding one)
and loads no tensor: the runner fills every parameter with random values instead (`init_dummy`).
Benchmarks use it to time real shapes (R1-Distill-Qwen-7B, the 671B) with no download and no disk.
"""

from __future__ import annotations

import json
import os

import torch

from finback.loader.checkpoint import Checkpoint
from finback.loader.config import ModelConfig
from finback.loader.errors import ModelLoadError


class DummyCheckpoint(Checkpoint):
    format = "dummy"
    config_source = "config.json"

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(file, f"cannot read the config: {exc}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(file, "the config is not a JSON object")
        self.path = file
        self.config = ModelConfig.from_hf(cfg, file)
        self.entries = []
        self.gguf_metadata = None

    def weights(self, int4: bool = False):
        return iter(())


@torch.no_grad()
def init_dummy(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place: matrices ~ N(0, std), vectors (norm weights, biases) near 1
    and 0 so activations keep a sane scale through many layers. Deterministic for a seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.numel() == 0 or not p.dtype.is_floating_point:
            continue
        if p.dim() == 1:
            value = (torch.ones(p.shape) if "norm" in name else torch.zeros(p.shape))
            value += torch.randn(p.shape, generator=gen) * std
        else:
            # generate in chunks of rows so a 7168x18432 matrix does not need an fp32 copy on the host
            flat = p.data.view(p.shape[0], -1)
            rows = max(1, (1 << 24) // max(1, flat.shape[1]))
            for r in range(0, flat.shape[0], rows):
                chunk = torch.randn(flat[r:r + rows].shape, generator=gen) * std
                flat[r:r + rows].copy_(chunk)
            continue
        p.data.copy_(value)
