"""Open a model checkpoint — a GGUF file (split or not) or a Hugging Face safetensors folder —
and stream its tensors under Hugging Face names, full (unsplit) shapes.

Opening a checkpoint validates it before any tensor data is read or any model memory is
allocated: every safetensors header is checked against its file (the format's rules: sizes,
dtypes, offsets within the data section, no overlaps, no gaps), and every tensor's name and shape
is matched against the model the config describes, built on the meta device. Every problem is one
`ModelLoadError` naming the file that holds it.

GGUF tensors are renamed from llama.cpp's names and, for the Llama architecture, the Q/K rows
that llama.cpp's converter permuted (interleaved rotary layout) are put back in Hugging Face's
order, so one model implementation serves both sources.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
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
    # deepseek2 (DeepSeek-V3 / R1): MLA projections, router, stacked and shared experts. Newer
    # llama.cpp files split kv_b into attn_k_b [H, kv_lora, nope] and attn_v_b [H, v, kv_lora]
    # (llama.cpp's converter names them k_b_proj / v_b_proj): the model rebuilds kv_b_proj from them.
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",
    "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# the projections that load into finback's linear layers, which take GGUF blocks (gguf_blocks mode)
_BLOCK_LINEAR = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                           # deepseek2: MLA's low-rank projections and the shared experts
                           "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "ffn_gate_shexp", "ffn_up_shexp",
                           "ffn_down_shexp"})
# stacked routed experts [E, N, K], which FusedMoE keeps as blocks (finback/layers/gguf_moe.py)
_BLOCK_EXPERTS = frozenset({"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"})
# whole llama.cpp tensor suffixes whose Hugging Face name has no .weight/.bias
_GGUF_LAYER_FULL = {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_BLK_FULL = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_GLOBAL = {v: k for k, v in _GGUF_GLOBAL.items()}
_HF_LAYER = {v: k for k, v in _GGUF_LAYER.items()}
_HF_LAYER_FULL = {v: k for k, v in _GGUF_LAYER_FULL.items()}
_HF_LAYER_ANY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# our fused parameters (see the models' load_weights) -> the checkpoint tensors they are loaded from
_FUSED = re.compile(r"^(.*)\.(qkv_proj|gate_up_proj)\.(weight|bias):(\w+)$")
_UNFUSE = {("qkv_proj", "q"): "q_proj", ("qkv_proj", "k"): "k_proj", ("qkv_proj", "v"): "v_proj",
           ("gate_up_proj", "0"): "gate_proj", ("gate_up_proj", "1"): "up_proj"}

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 256 << 20
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "half": torch.float16, "float": torch.float32}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _BLK.match(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    m = _BLK_FULL.match(name)
    if m and m.group(2) in _GGUF_LAYER_FULL:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_FULL[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name (the name itself when there is none)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_NAME.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"
    m = _HF_LAYER_ANY.match(name)
    if m and m.group(2) in _HF_LAYER_FULL:
        return f"blk.{m.group(1)}.{_HF_LAYER_FULL[m.group(2)]}"
    return name


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of Llama Q/K rows (interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class TensorEntry:
    name: str                 # Hugging Face name, as the model's load_weights takes it
    shape: tuple[int, ...]
    file: str                 # the file that holds it
    file_name: str            # its name in that file (llama.cpp's name in a GGUF)


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _layer_of(name: str) -> int | None:
    m = _HF_LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


class Checkpoint:
    """A model's weights and config, from one of the supported sources.

    `entries` lists every tensor (name, shape, file) as read from the file headers; the
    constructor has already matched them against `config`."""

    format: str
    path: str
    config: ModelConfig
    config_source: str
    entries: list[TensorEntry]
    gguf_metadata: dict[str, Any] | None = None

    def weights(self, int4: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _display(self, name: str) -> str:
        return name

    def _layers_key(self) -> str:
        return "num_hidden_layers"

    def _check_against_config(self) -> None:
        """Match every tensor's name and shape against the model `config` describes, built on the
        meta device: nothing is allocated and no tensor data is read. The model's own
        load_weights does the matching, so this accepts exactly what loading will accept."""
        from finback.layers.linear import ShapeMismatch
        from finback.loader.fp8 import BlockFP8Tensor, scale_shape
        from finback.models.registry import build_model

        cfg = self.config
        fp8_scales = getattr(self, "fp8_scales", {})
        with torch.device("meta"):
            model = build_model(cfg)
        if not getattr(model, "supports_block_fp8", False):
            fp8_scales = {}
        current: list[TensorEntry] = []

        def stream():
            for e in self.entries:
                if e.name == "rope_freqs":  # GGUF rotary frequency factors: one per rotary pair
                    n = 1
                    for d in e.shape:
                        n *= d
                    if n != cfg.head_dim // 2:
                        raise ModelLoadError(e.file, f"tensor {e.file_name!r} has {n} values but head_dim "
                                                     f"{cfg.head_dim} needs {cfg.head_dim // 2}")
                    continue
                current[:] = [e]
                if e.name in fp8_scales:  # as weights(keep_fp8=True) yields it; layers take both forms
                    yield e.name, BlockFP8Tensor(torch.empty(e.shape, dtype=torch.float8_e4m3fn, device="meta"),
                                                 torch.empty(scale_shape(e.shape, cfg.fp8_block_size), device="meta"),
                                                 cfg.fp8_block_size)
                else:
                    yield e.name, torch.empty(e.shape, device="meta")

        try:
            loaded = model.load_weights(stream())
        except ShapeMismatch as exc:
            e = current[0]
            raise ModelLoadError(e.file, f"tensor {e.file_name!r} has shape {e.shape}, which does not match "
                                         f"{self.config_source} ({exc})") from None
        except KeyError:
            e = current[0]
            layer = _layer_of(e.name)
            hint = (f" ({self.config_source} gives {self._layers_key()} = {cfg.num_hidden_layers})"
                    if layer is not None and layer >= cfg.num_hidden_layers else "")
            raise ModelLoadError(e.file, f"unexpected tensor {e.file_name!r}: the {cfg.architecture} model "
                                         f"has no such weight{hint}") from None
        missing = model.expected_weights() - loaded
        if cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            names = []
            for name in missing:
                m = _FUSED.match(name)
                if m and (m.group(2), m.group(4)) in _UNFUSE:
                    name = f"{m.group(1)}.{_UNFUSE[m.group(2), m.group(4)]}.{m.group(3)}"
                names.append(name)
            names.sort(key=lambda n: (_layer_of(n) if _layer_of(n) is not None else -1, n))
            shown = [self._display(n) for n in names[:3]]
            present = {_layer_of(e.name) for e in self.entries} - {None}
            hint = ""
            if len(present) < cfg.num_hidden_layers:
                hint = (f"; {self.config_source} gives {self._layers_key()} = {cfg.num_hidden_layers} but "
                        f"the checkpoint has tensors for {len(present)} layer(s)")
            raise ModelLoadError(self.path, f"checkpoint lacks {len(names)} tensor(s) that {self.config_source} "
                                            f"implies, e.g. {shown}{hint}")


class GGUFCheckpoint(Checkpoint):
    format = "gguf"
    config_source = "the GGUF metadata"

    def __init__(self, path: str):
        from finback.loader.gguf import GGUFModel

        self.path = path
        self.file = GGUFModel(path)
        try:
            self.gguf_metadata = self.file.metadata
            shapes = {name: tuple(info.shape) for name, info in self.file.tensors.items()}
            self.config = ModelConfig.from_gguf(self.file.metadata, shapes, path)
            self.entries = []
            for name, info in self.file.tensors.items():
                hf = gguf_to_hf_name(name)
                if hf is None:
                    raise ModelLoadError(info.path, f"unexpected tensor {name!r} for architecture "
                                                    f"{self.config.architecture}")
                self.entries.append(TensorEntry(hf, tuple(info.shape), info.path, name))
            self._check_against_config()
        except BaseException:
            self.file.close()
            raise

    def _display(self, name: str) -> str:
        return hf_to_gguf_name(name)

    def _layers_key(self) -> str:
        return f"{self.gguf_metadata.get('general.architecture')}.block_count"

    def weights(self, int4: bool = False, gguf_blocks: bool = False):
        """With int4, 2-D linear weights of types Q4_0/Q4_1/Q4_K come as `Int4Tensor` (4-bit groups)
        instead of dense tensors; with gguf_blocks, 2-D linear weights of a type the GGUF kernels
        take come as `GGUFWeight` (the raw blocks, on CPU), and stacked routed experts (deepseek2's
        ffn_*_exps) as `GGUFExperts`. The embedding and the LM head stay dense."""
        from finback.layers.gguf_linear import KERNEL_TYPES, GGUFWeight
        from finback.layers.gguf_moe import GGUFExperts
        from finback.layers.quantized import Int4Tensor
        from finback.loader.quants import INT4_TYPES, int4_groups

        cfg = self.config
        for e in self.entries:
            name = e.file_name
            info = self.file.tensors[name]
            linear = len(info.shape) == 2 and name.startswith("blk.") and name.endswith(".weight")
            if gguf_blocks and linear and info.ggml_type in KERNEL_TYPES and name.split(".")[2] in _BLOCK_LINEAR:
                tensor = GGUFWeight(self.file.raw(name), info.ggml_type, tuple(info.shape))
            elif (gguf_blocks and len(info.shape) == 3 and name.startswith("blk.") and info.ggml_type in KERNEL_TYPES
                  and name.split(".")[2] in _BLOCK_EXPERTS and name.endswith(".weight")):
                tensor = GGUFExperts(self.file.raw(name), info.ggml_type, tuple(info.shape))
            elif int4 and linear and info.ggml_type in INT4_TYPES:
                tensor = Int4Tensor(*int4_groups(self.file.raw(name), info.ggml_type, tuple(info.shape)))
            else:
                tensor = self.file.load(name)
            if cfg.architecture == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight",
                                                              ".attn_q.bias", ".attn_k.bias")):
                heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                if tensor.shape[0] % (2 * heads):
                    raise ModelLoadError(e.file, f"tensor {name} has {tensor.shape[0]} rows, "
                                                 f"not a multiple of 2 x {heads} heads")
                if isinstance(tensor, (Int4Tensor, GGUFWeight)):  # a row permutation: whole block rows
                    rows = torch.arange(tensor.shape[0])
                    tensor = tensor.permute_rows(unpermute_qk(rows, heads))
                else:
                    tensor = unpermute_qk(tensor, heads)
            yield e.name, tensor

    def close(self):
        self.file.close()


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face folder: config.json and model.safetensors, or shards listed by
    model.safetensors.index.json."""

    format = "safetensors"

    def __init__(self, folder: str):
        self.path = folder
        try:
            listing = os.listdir(folder)
        except OSError as exc:
            raise ModelLoadError(folder, f"cannot list the folder: {exc.strerror or exc}") from None
        index = os.path.join(folder, INDEX_NAME)
        weight_map = None
        if INDEX_NAME in listing:
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in listing if f.endswith(".safetensors"))
        if not files:
            also = "" if "config.json" in listing else " and no config.json: not a model folder"
            raise ModelLoadError(folder, f"no .safetensors files in the folder{also}")
        config_path = os.path.join(folder, "config.json")
        self.config_source = config_path
        self.config = ModelConfig.from_json_file(config_path)
        self.files = [os.path.join(folder, f) for f in files]
        headers: dict[str, dict[str, tuple[str, tuple[int, ...], int, int]]] = {}
        holder: dict[str, str] = {}
        self.entries = []
        for rel, path in zip(files, self.files):
            if not os.path.isfile(path):
                raise ModelLoadError(path, f"shard listed in {INDEX_NAME} is missing" if weight_map is not None
                                     else "not a regular file")
            header = _check_safetensors_header(path)
            headers[rel] = header
            for name, (_, shape, _, _) in header.items():
                if name in holder:
                    raise ModelLoadError(path, f"tensor {name!r} is also in {holder[name]}")
                holder[name] = path
                self.entries.append(TensorEntry(name, shape, path, name))
        if weight_map is not None:
            for name, rel in weight_map.items():
                if name not in headers[rel]:
                    where = f" (it is in {os.path.basename(holder[name])})" if name in holder else ""
                    raise ModelLoadError(index, f"lists tensor {name!r} in {rel}, which does not hold it{where}")
        self._pair_fp8(headers, holder)
        self._check_against_config()

    def _pair_fp8(self, headers: dict, holder: dict[str, str]) -> None:
        """Block-FP8 weights travel with their `_scale_inv` tensors (finback/loader/fp8.py): pair them,
        check the scale shapes, and drop the scales from `entries` (weights() dequantizes)."""
        from finback.loader.fp8 import SCALE_SUFFIX, FP8PairError, pair_scales

        shapes = {e.name: e.shape for e in self.entries}
        fp8 = {name for header in headers.values() for name, (dtype, _, _, _) in header.items() if dtype == "F8_E4M3"}
        try:
            self.fp8_scales = pair_scales(shapes, fp8, self.config.fp8_block_size)
        except FP8PairError as exc:
            raise ModelLoadError(holder[exc.tensor], str(exc)) from None
        self.fp8_holder = {scale: holder[scale] for scale in self.fp8_scales.values()}
        self.entries = [e for e in self.entries if not e.name.endswith(SCALE_SUFFIX)]

    def weights(self, int4: bool = False, keep_fp8: bool = False):
        """(name, tensor) of every weight; nothing stays 4-bit (dense formats). A block-FP8 pair comes as
        one tensor: dequantized to float32, or with keep_fp8 a `BlockFP8Tensor` as stored."""
        from safetensors import safe_open

        from finback.loader.fp8 import BlockFP8Tensor, dequantize_block_fp8

        by_file: dict[str, list[str]] = {}
        for e in self.entries:
            by_file.setdefault(e.file, []).append(e.name)
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in by_file.get(path, []):
                        tensor = f.get_tensor(name)
                        scale = self.fp8_scales.get(name)
                        if scale is not None:
                            if self.fp8_holder[scale] == path:
                                scale_inv = f.get_tensor(scale)
                            else:
                                with safe_open(self.fp8_holder[scale], framework="pt") as g:
                                    scale_inv = g.get_tensor(scale)
                            block = self.config.fp8_block_size
                            tensor = (BlockFP8Tensor(tensor, scale_inv, block) if keep_fp8
                                      else dequantize_block_fp8(tensor, scale_inv, block))
                        yield name, tensor
            except ModelLoadError:
                raise
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise ModelLoadError(path, f"cannot read safetensors data: {exc}") from None


def _read_index(path: str) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file), validated."""
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_BYTES:
            raise ModelLoadError(path, f"safetensors index is {size} bytes, more than any real one: corrupt?")
        with open(path, "rb") as f:
            data = json.loads(f.read(), parse_constant=_reject_constant)
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the safetensors index: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(path, f"safetensors index is not valid JSON: {_clip(str(exc))}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, "safetensors index is not a JSON object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(path, f"safetensors index has no weight_map object (got {_show(weight_map)})")
    if not weight_map:
        raise ModelLoadError(path, "safetensors index has an empty weight_map")
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or not shard or os.path.isabs(shard)
                or ".." in shard.replace("\\", "/").split("/")):
            raise ModelLoadError(path, f"weight_map gives tensor {name!r} the shard {_show(shard)}, "
                                       f"not a file name in the folder")
    return weight_map


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


# safetensors dtypes finback loads into its floating-point parameters -> bytes per element
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}  # FP8: block-scaled weights only


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Validate a safetensors header against its file, before any tensor is read, by the rules
    the safetensors library enforces (so reading it cannot fail afterwards) plus the dtypes we
    load. Returns name -> (dtype, shape, begin, end), offsets relative to the data section."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(path, f"file is {size} bytes: too short for a safetensors header "
                                           f"(an 8-byte length, then JSON): truncated?")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ModelLoadError(path, f"safetensors header claims {n} bytes but only {size - 8} follow "
                                           f"the length: truncated, or not a safetensors file")
            if n > SAFETENSORS_MAX_HEADER:
                raise ModelLoadError(path, f"safetensors header claims {n} bytes, beyond the format's limit of "
                                           f"{SAFETENSORS_MAX_HEADER}: corrupt")
            raw = f.read(n)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise ModelLoadError(path, f"safetensors header has the key {_show(exc.args[0])} twice") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(path, f"safetensors header is not valid JSON: {_clip(str(exc))}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(path, f"safetensors header is not a JSON object (it is a {type(header).__name__})")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelLoadError(path, f"safetensors __metadata__ must map names to strings, got {_show(meta)}")
    data_size = size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(_is_size(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
            raise ModelLoadError(path, f"tensor {name!r} has a malformed header entry {_show(info)} (needs a "
                                       f"dtype, a shape of sizes and two data_offsets)")
        if dtype not in _ST_DTYPES:
            raise ModelLoadError(path, f"tensor {name!r} has dtype {_show(dtype)}, which finback does not "
                                       f"load (supported: {', '.join(sorted(_ST_DTYPES))})")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ModelLoadError(path, f"tensor {name!r} needs bytes {begin}..{end} of a {data_size}-byte "
                                       f"data section: truncated or corrupt")
        count = 0 if 0 in shape else 1
        for d in shape:
            count *= d
            if count > data_size:
                break
        if count * _ST_DTYPES[dtype] != end - begin:
            raise ModelLoadError(path, f"tensor {name!r} of shape {_show(shape)} and dtype {dtype} does not "
                                       f"fit its data_offsets {begin}..{end} ({end - begin} bytes)")
        entries[name] = (dtype, tuple(shape), begin, end)
    prev_name, prev_begin, prev_end = None, 0, 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < prev_end:
            raise ModelLoadError(path, f"tensors {prev_name!r} (bytes {prev_begin}..{prev_end}) and {name!r} "
                                       f"(bytes {begin}..{end}) overlap")
        if begin > prev_end:
            raise ModelLoadError(path, f"bytes {prev_end}..{begin} of the data section belong to no tensor "
                                       f"(safetensors allows no gaps): corrupt")
        prev_name, prev_begin, prev_end = name, begin, end
    if prev_end != data_size:
        raise ModelLoadError(path, f"the data section has {data_size} bytes but its tensors end at byte "
                                   f"{prev_end}: corrupt, or bytes appended")
    return entries


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`: a GGUF file (the first shard of a split one), a safetensors
    folder, or a .safetensors file in one. Validated before return (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return SafetensorsCheckpoint(path)
    if not os.path.exists(path):
        raise ModelLoadError(path, "no such file or folder")
    if not os.path.isfile(path):
        raise ModelLoadError(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the file: {exc.strerror or exc}") from None
    if magic == b"GGUF" or magic == b"FUGG":
        return GGUFCheckpoint(path)
    if path.endswith(".safetensors"):
        _check_safetensors_header(path)
        return SafetensorsCheckpoint(os.path.dirname(path) or ".")
    raise ModelLoadError(path, f"not a GGUF file (magic {magic!r}) nor a safetensors folder "
                               f"(give the folder that holds config.json and the .safetensors files)")
