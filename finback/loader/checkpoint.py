"""Open a model checkpoint — a GGUF file (split or not) or a Hugging Face safetensors folder —
and stream its tensors under Hugging Face names, full (unsplit) shapes.

GGUF tensors are renamed from llama.cpp's names and, for the Llama architecture, the Q/K rows
that llama.cpp's converter permuted (interleaved rotary layout) are put back in Hugging Face's
order, so one model implementation serves both sources.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import torch

from finback.loader.config import ModelConfig
from finback.loader.errors import ModelLoadError

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "half": torch.float16, "float": torch.float32}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _BLK.match(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of Llama Q/K rows (interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class Checkpoint:
    """A model's weights and config, from one of the supported sources."""

    format: str
    path: str
    config: ModelConfig
    gguf_metadata: dict[str, Any] | None = None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path: str):
        from finback.loader.gguf import GGUFModel

        self.path = path
        self.file = GGUFModel(path)
        self.gguf_metadata = self.file.metadata
        shapes = {name: tuple(info.shape) for name, info in self.file.tensors.items()}
        self.config = ModelConfig.from_gguf(self.file.metadata, shapes, path)

    def weights(self):
        cfg = self.config
        for name, info in self.file.tensors.items():
            hf = gguf_to_hf_name(name)
            if hf is None:
                raise ModelLoadError(self.path, f"unexpected tensor {name!r} for architecture {cfg.architecture}")
            tensor = self.file.load(name)
            if cfg.architecture == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight",
                                                              ".attn_q.bias", ".attn_k.bias")):
                heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                if tensor.shape[0] % (2 * heads):
                    raise ModelLoadError(self.path, f"tensor {name} has {tensor.shape[0]} rows, "
                                                    f"not a multiple of 2 x {heads} heads")
                tensor = unpermute_qk(tensor, heads)
            yield hf, tensor

    def close(self):
        self.file.close()


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, folder: str):
        self.path = folder
        self.config = ModelConfig.from_json_file(os.path.join(folder, "config.json"))
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(index, f"bad safetensors index: {exc}") from None
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ModelLoadError(folder, "no .safetensors files in the folder")
        self.files = [os.path.join(folder, f) for f in files]
        for f in self.files:
            if not os.path.isfile(f):
                raise ModelLoadError(f, "safetensors shard listed in the index is missing")
            _check_safetensors_header(f)

    def weights(self):
        from safetensors import safe_open

        for path in self.files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except ModelLoadError:
                raise
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise ModelLoadError(path, f"cannot read safetensors data: {exc}") from None


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_safetensors_header(path: str) -> None:
    """Validate a safetensors header against the file size before any tensor is read."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(path, f"file is {size} bytes: too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 << 20:
                raise ModelLoadError(path, f"safetensors header claims {n} bytes but the file has {size}: truncated?")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(path, "safetensors header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(path, f"tensor {name!r} has a malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise ModelLoadError(path, f"tensor {name!r} has unsupported dtype {dtype}")
        if not (0 <= begin <= end <= data_size) or end - begin != count * _ST_DTYPES[dtype]:
            raise ModelLoadError(path, f"tensor {name!r} needs bytes {begin}..{end} of a {data_size}-byte "
                                       f"data section: truncated or corrupt")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    if os.path.isdir(path):
        return SafetensorsCheckpoint(path)
    if not os.path.exists(path):
        raise ModelLoadError(path, "no such file or folder")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or magic == b"FUGG":
        return GGUFCheckpoint(path)
    if path.endswith(".safetensors"):
        return SafetensorsCheckpoint(os.path.dirname(path) or ".")
    raise ModelLoadError(path, f"not a GGUF file (magic {magic!r}) nor a safetensors folder")
