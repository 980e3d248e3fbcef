"""Random weights of a real shape: vLLM's `--load-format dummy`.

`DummyCheckpoint(path)` reads only a config (a Hugging Face config.json, or a folder holding one)
and loads no tensor: the runner fills every parameter with random values instead (`init_dummy`).
Benchmarks use it to time real shapes (R1-Distill-Qwen-7B, the 671B) with no download and no disk.
A config with quantization_config fp8 gives a model built for block-FP8 weights (on CUDA): their e4m3
values and scales are drawn directly on the device, so a stack of 671B-width layers fits where the
weights would.
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
    and 0 so activations keep a sane scale through many layers. Block-FP8 weights (parameters with an
    `fp8_scale`) get e4m3 values ~ N(0, 64) and scales near std/64, drawn on their device.
    Deterministic for a seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = list(model.named_parameters())
    scales = {id(p.fp8_scale) for _, p in params if p.dtype == torch.float8_e4m3fn and hasattr(p, "fp8_scale")}
    for i, (name, p) in enumerate(params):
        if p.numel() == 0 or not p.dtype.is_floating_point or id(p) in scales:
            continue
        if p.dtype == torch.float8_e4m3fn:
            _dummy_fp8(p, p.fp8_scale, seed * 100003 + i, std)
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


def _dummy_fp8(weight: torch.Tensor, scale: torch.Tensor, seed: int, std: float) -> None:
    """e4m3 values ~ N(0, 64) (clamped to +-448) and scales std/64 x U(0.75, 1.25), so that
    weight * scale ~ N(0, std) as the dense init; generated in chunks on the weight's device."""
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    flat = weight.data.view(-1)
    chunk = 1 << 26
    for r in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - r)
        flat[r:r + n].copy_((torch.randn(n, generator=gen, device=weight.device) * 64).clamp_(-448, 448))
    scale.data.copy_(torch.rand(scale.shape, generator=gen, device=scale.device) * 0.5 + 0.75).mul_(std / 64)
