"""What fits where: the memory a model needs per GPU (or in RAM), before anything is loaded.

`plan(model, ...)` answers, for a model and a set of GPUs of one size: does it fit with the context
and concurrency asked (`fits`), the fewest such GPUs that hold it (`min_gpus`), the longest context
each of `concurrency` sequences can have on the GPUs given (`max_context`), and what one GPU holds
(`per_gpu_bytes`, with its parts). The model is a catalogue name (`deepseek-r1:671b-q2_K_XL`, sized
before any download from the architecture table below and the published download size), a GGUF
file (the first shard of a split set) or a safetensors folder (sized from their headers only).

What one GPU holds, for tensor parallel size `tp` and pipeline parallel size `pp`:
- Weights. Every tensor is classed by name: split over the TP group (attention Q/O, MLA's q_b and
  kv_b, dense and shared-expert MLPs, vocabulary-parallel embedding and LM head), routed experts
  (split over the group, by TP or by EP: the same bytes per rank), GQA's K/V projections (split,
  but never below one KV head a rank: replicated when tp > kv_heads) and replicated parts (norms,
  the MoE router, MLA's q_a and kv_a latent projections, which every rank needs whole). Layers are
  cut into `pp` contiguous stages; the first holds the embedding, the last the final norm and the
  LM head; the answer is the fullest GPU. DeepSeek's multi-token-prediction layer (in the FP8
  checkpoint, not in the GGUFs) is not loaded (it serves only speculative decoding), so not counted.
- KV cache per token. GQA: 2 * layers * kv_heads_per_rank * head_dim * bytes (kv_heads_per_rank =
  kv_heads / tp, at least 1). MLA: layers * (kv_lora_rank + qk_rope_head_dim) * bytes, the same on
  every TP rank: each rank's heads are expanded from the whole latent, so the latent is replicated
  (vLLM and SGLang do the same without DP-attention). Sequences are counted at their full context,
  rounded up to whole blocks of 16 tokens.
- Activations: a documented estimate of one forward of the largest step (the engine's default
  token budget, max(2048, concurrency) tokens): per token the residual stream and hidden states
  (4 * hidden), the attention projections' outputs on this rank, and the widest MLP intermediate
  on this rank (gate, up and their product: 3 * width; for MoE the top-k routed plus shared experts),
  at the compute dtype; plus the logits of the sequences in the step (fp32, three copies for
  sampling: logits, probabilities, sorted).
- CUDA graphs: the graph pool keeps the activations of the largest captured decode batch (512
  sequences, or the concurrency if less) plus 128 MiB for the graphs themselves; none on CPU or with
  `enforce_eager`.
- The whole of it must stay under `gpu_memory_utilization` (0.9) of each GPU's memory; the rest
  is for the CUDA context, NCCL's buffers and fragmentation, as in vLLM.

Bytes of weights. Local files: each tensor's bytes in the file (GGUF stays quantized on GPU; FP8
stays FP8). Catalogue names: tensor shapes come from `ARCHITECTURES`; the FP8 checkpoint's dtypes
are known (FP8 matrices with fp32 128x128 block scales, bf16 embeddings and norms); a GGUF's 1-D
tensors are F32 and its matrices share the bits per weight that make the total equal the published
download size (the per-tensor quant mix is not known before download).

CPU (`gpus=0`): weights as the CPU path holds them (docs/ARCHITECTURE.md): dequantized to the
compute dtype, except linear layers whose GGUF parts are all Q4_0/Q4_1/Q4_K, kept as 4-bit groups
(0.625 bytes a weight). For a catalogue q4 quant the parts are guessed from llama.cpp's Q4_K_M
recipe (V and FFN-down in Q6_K on its "more bits" layers). The same 0.9 fraction of RAM applies.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, BinaryIO

GiB = 1 << 30
MiB = 1 << 20
BLOCK_SIZE = 16
GRAPH_CAPTURE_MAX = 512
GRAPH_FIXED_BYTES = 128 * MiB
INT4_BYTES_PER_WEIGHT = 20 / 32  # 16 bytes of nibbles + bf16 scale and zero per group of 32
MAX_SEARCH_GPUS = 128
DEFAULT_GPUS_PER_NODE = 8


class FitError(ValueError):
    """A model or a hardware description the planner cannot size."""


@dataclass(frozen=True)
class Arch:
    """The numbers that size a model (Hugging Face config names where they exist)."""

    family: str  # "gqa" (Llama, Qwen2/3) | "mla" (DeepSeek V2/V3)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    num_experts_per_tok: int = 0
    num_nextn_predict_layers: int = 0


def _gqa(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, ctx: int = 131072,
         bias: bool = False, qk_norm: bool = False, head_dim: int = 128, tie: bool = False) -> Arch:
    return Arch("gqa", vocab, hidden, inter, layers, heads, kv, head_dim, ctx, qkv_bias=bias, qk_norm=qk_norm,
                tie_word_embeddings=tie)


#: The R1 family's configs (their config.json on Hugging Face), by catalogue size tag.
ARCHITECTURES: dict[str, Arch] = {
    "1.5b": _gqa(151936, 1536, 8960, 28, 12, 2, bias=True),
    "7b": _gqa(152064, 3584, 18944, 28, 28, 4, bias=True),
    "8b": _gqa(128256, 4096, 14336, 32, 32, 8),
    "14b": _gqa(152064, 5120, 13824, 48, 40, 8, bias=True),
    "32b": _gqa(152064, 5120, 27648, 64, 40, 8, bias=True),
    "70b": _gqa(128256, 8192, 28672, 80, 64, 8),
    "8b-0528-qwen3": _gqa(151936, 4096, 12288, 36, 32, 8, qk_norm=True),
    "671b": Arch("mla", 129280, 7168, 18432, 61, 128, 128, 192, 163840, q_lora_rank=1536, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                 n_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=3,
                 num_experts_per_tok=8, num_nextn_predict_layers=1),
}


# ------------------------------------------------------------------------------------ tensors

@dataclass(frozen=True)
class Tensor:
    """One weight: `layer` is -1 for the embedding, num_hidden_layers for the final norm and LM
    head; `kind` is split | expert | kv | replicated | mtp (not loaded)."""

    name: str
    nbytes: int
    layer: int
    kind: str
    elements: int = 0
    ggml_type: str = ""


_LAYER = re.compile(r"^(?:model\.layers|blk)\.(\d+)\.(.+)$")
_REPLICATED = re.compile(
    r"(norm|q_a_proj|kv_a_proj_with_mqa|attn_q_a\.|attn_kv_a_mqa|mlp\.gate\.(weight|e_score)|ffn_gate_inp|"
    r"exp_probs_b|e_score_correction_bias|rope_freqs)")
_EXPERT = re.compile(r"(mlp\.experts\.|_exps\.)")
_KV = re.compile(r"(self_attn\.[kv]_proj\.|attn_[kv]\.)")


def classify(name: str, num_layers: int) -> tuple[int, str]:
    """(layer, kind) of a tensor named as Hugging Face or llama.cpp names it."""
    m = _LAYER.match(name)
    if m is None:
        if name.startswith(("model.embed_tokens", "token_embd")):
            return -1, "split"
        if name.startswith(("lm_head", "output.")):
            return num_layers, "split"
        if name.startswith(("model.norm", "output_norm")):
            return num_layers, "replicated"
        return -1, "replicated"  # rope_freqs and anything unknown: whole on every rank
    layer, rest = int(m[1]), m[2]
    if layer >= num_layers or rest.startswith(("nextn.", "eh_proj", "enorm", "hnorm", "shared_head", "embed_tokens")):
        return layer, "mtp"
    if _REPLICATED.search(rest):
        return layer, "replicated"
    if _EXPERT.search(rest):
        return layer, "expert"
    if _KV.search(rest):
        return layer, "kv"
    return layer, "split"


def _arch_shapes(a: Arch, mtp: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of an architecture, with Hugging Face names and shapes."""
    h = a.hidden_size
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (a.vocab_size, h))]
    layers = a.num_hidden_layers + (a.num_nextn_predict_layers if mtp else 0)
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        if a.family == "mla":
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            out += [(p + "self_attn.q_a_proj.weight", (a.q_lora_rank, h)),
                    (p + "self_attn.q_a_layernorm.weight", (a.q_lora_rank,)),
                    (p + "self_attn.q_b_proj.weight", (a.num_attention_heads * qk, a.q_lora_rank)),
                    (p + "self_attn.kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope_head_dim, h)),
                    (p + "self_attn.kv_a_layernorm.weight", (a.kv_lora_rank,)),
                    (p + "self_attn.kv_b_proj.weight",
                     (a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)),
                    (p + "self_attn.o_proj.weight", (h, a.num_attention_heads * a.v_head_dim))]
        else:
            q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
            out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
            if a.qkv_bias:
                out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                        (p + "self_attn.v_proj.bias", (kv,))]
            if a.qk_norm:
                out += [(p + "self_attn.q_norm.weight", (a.head_dim,)), (p + "self_attn.k_norm.weight", (a.head_dim,))]
        if a.n_routed_experts and i >= a.first_k_dense_replace:
            m = a.moe_intermediate_size
            out += [(p + "mlp.gate.weight", (a.n_routed_experts, h)),
                    (p + "mlp.gate.e_score_correction_bias", (a.n_routed_experts,))]
            for e in range(a.n_routed_experts):
                out += [(f"{p}mlp.experts.{e}.gate_proj.weight", (m, h)), (f"{p}mlp.experts.{e}.up_proj.weight", (m, h)),
                        (f"{p}mlp.experts.{e}.down_proj.weight", (h, m))]
            s = m * a.n_shared_experts
            out += [(p + "mlp.shared_experts.gate_proj.weight", (s, h)), (p + "mlp.shared_experts.up_proj.weight", (s, h)),
                    (p + "mlp.shared_experts.down_proj.weight", (h, s))]
        else:
            n = a.intermediate_size
            out += [(p + "mlp.gate_proj.weight", (n, h)), (p + "mlp.up_proj.weight", (n, h)),
                    (p + "mlp.down_proj.weight", (h, n))]
        if i >= a.num_hidden_layers:  # DeepSeek's MTP block: its own embedding, projections and head
            out += [(p + "embed_tokens.weight", (a.vocab_size, h)), (p + "enorm.weight", (h,)),
                    (p + "hnorm.weight", (h,)), (p + "eh_proj.weight", (h, 2 * h)),
                    (p + "shared_head.norm.weight", (h,)), (p + "shared_head.head.weight", (a.vocab_size, h))]
    out.append(("model.norm.weight", (h,)))
    if not a.tie_word_embeddings:
        out.append(("lm_head.weight", (a.vocab_size, h)))
    return out


def parameter_count(a: Arch, mtp: bool = False) -> int:
    return sum(math.prod(s) for _, s in _arch_shapes(a, mtp))


def _fp8_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor in DeepSeek's FP8 checkpoint: FP8 linear weights with an fp32 scale per
    128x128 block, bf16 embeddings, heads, norms and router, fp32 router bias."""
    n = math.prod(shape)
    if len(shape) == 1:
        return n * (4 if "e_score_correction_bias" in name else 2)
    if "embed_tokens" in name or "head" in name or name.endswith("mlp.gate.weight"):
        return n * 2
    return n + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128) * 4


def _more_bits(layer: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down Q4_K_M raises to Q6_K."""
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def catalogue_tensors(entry: Any, arch: Arch) -> list[Tensor]:
    """The tensors of a catalogue entry, with bytes as described in the module docstring."""
    n_layers = arch.num_hidden_layers
    fp8 = entry.format == "safetensors"
    shapes = _arch_shapes(arch, mtp=fp8 and arch.num_nextn_predict_layers > 0)
    out = []
    if fp8:
        for name, shape in shapes:
            layer, kind = classify(name, n_layers)
            out.append(Tensor(name, _fp8_bytes(name, shape), layer, kind, math.prod(shape), "FP8"))
        return out
    vectors = sum(math.prod(s) for _, s in shapes if len(s) == 1)
    matrices = sum(math.prod(s) for _, s in shapes if len(s) > 1)
    rate = (entry.size_bytes - 4 * vectors) / matrices
    if rate <= 0:
        raise FitError(f"{entry.name}: published size {entry.size_bytes} is smaller than its F32 tensors")
    for name, shape in shapes:
        layer, kind = classify(name, n_layers)
        n = math.prod(shape)
        qtype = "F32" if len(shape) == 1 else _guess_type(entry.quant, name, layer, n_layers)
        out.append(Tensor(name, n * 4 if len(shape) == 1 else round(n * rate), layer, kind, n, qtype))
    return out


def _guess_type(quant: str, name: str, layer: int, n_layers: int) -> str:
    """The GGUF type a catalogue quant gives a matrix, as far as the CPU size needs it: for Q4_K_M,
    Q4_K except V and FFN-down on the "more bits" layers and the LM head (Q6_K)."""
    if quant != "Q4_K_M":
        return quant
    if name.startswith("lm_head") or (0 <= layer < n_layers and _more_bits(layer, n_layers)
                                      and (".v_proj." in name or "down_proj" in name)):
        return "Q6_K"
    return "Q4_K"


# ------------------------------------------------------------------------------------ local files

def _gguf_arch(md: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: str) -> Arch:
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise FitError(f"{path}: GGUF has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer lists (head_count_kv): the largest sizes the cache
            v = max(v) if v else default
        return v

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    layers = get("block_count")
    if not all(isinstance(v, int) and v > 0 for v in (heads, hidden, layers)):
        raise FitError(f"{path}: GGUF metadata lacks {arch}.block_count / embedding_length / attention.head_count")
    embd = shapes.get("token_embd.weight")
    vocab = embd[0] if embd else get("vocab_size", 0)
    kv_lora = get("attention.kv_lora_rank", 0)
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    common: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": get("feed_forward_length", 4 * hidden),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 4096), "tie_word_embeddings": "output.weight" not in shapes}
    if kv_lora:
        rope = get("rope.dimension_count", 64)
        return Arch("mla", **common, q_lora_rank=get("attention.q_lora_rank", 0), kv_lora_rank=kv_lora,
                    qk_nope_head_dim=head_dim - rope, qk_rope_head_dim=rope,
                    v_head_dim=get("attention.value_length", 128), n_routed_experts=get("expert_count", 0),
                    n_shared_experts=get("expert_shared_count", 0),
                    moe_intermediate_size=get("expert_feed_forward_length", 0),
                    first_k_dense_replace=get("leading_dense_block_count", 0),
                    num_experts_per_tok=get("expert_used_count", 0))
    return Arch("gqa", **common, n_routed_experts=get("expert_count", 0),
                moe_intermediate_size=get("expert_feed_forward_length", 0), num_experts_per_tok=get("expert_used_count", 0))


def gguf_tensors(path: str) -> tuple[Arch, list[Tensor]]:
    """Architecture and tensors of a GGUF (every shard of a split set), from the headers only."""
    from finback.loader.gguf import GGUFModel

    with GGUFModel(path) as g:
        shapes = {n: t.shape for n, t in g.tensors.items()}
        arch = _gguf_arch(g.metadata, shapes, path)
        out = []
        for name, t in g.tensors.items():
            layer, kind = classify(name, arch.num_hidden_layers)
            out.append(Tensor(name, t.nbytes, layer, kind, t.n_elements, t.ggml_type.name))
    return arch, out


_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _json_object(path: str, what: str, read: Callable[[BinaryIO], bytes]) -> dict[str, Any]:
    """The JSON object `read` takes from the file at `path` (`what` names it in errors)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(read(f))
    except FitError:
        raise
    except OSError as e:
        raise FitError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise FitError(f"{path}: {what}not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FitError(f"{path}: {what}not a JSON object")
    return obj


def _safetensors_header(path: str) -> dict[str, Any]:
    def read(f: BinaryIO) -> bytes:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(os.path.getsize(path) - 8, 100 << 20):
            raise FitError(f"{path}: not a safetensors file (header length {n})")
        return f.read(n)

    return _json_object(path, "safetensors header is ", read)


def _config_arch(cfg: dict[str, Any], path: str) -> Arch:
    try:
        heads, hidden, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_hidden_layers"]
    except KeyError as e:
        raise FitError(f"{path}: config.json lacks {e.args[0]!r}") from None
    kv_lora = cfg.get("kv_lora_rank") or 0
    common: dict[str, Any] = {
        "vocab_size": cfg.get("vocab_size", 0), "hidden_size": hidden,
        "intermediate_size": cfg.get("intermediate_size", 4 * hidden), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    if kv_lora:
        nope, rope = cfg.get("qk_nope_head_dim", 128), cfg.get("qk_rope_head_dim", 64)
        return Arch("mla", **common, head_dim=nope + rope, q_lora_rank=cfg.get("q_lora_rank") or 0,
                    kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                    v_head_dim=cfg.get("v_head_dim", 128), n_routed_experts=cfg.get("n_routed_experts") or 0,
                    n_shared_experts=cfg.get("n_shared_experts") or 0,
                    moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
                    first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
                    num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
                    num_nextn_predict_layers=cfg.get("num_nextn_predict_layers") or 0)
    return Arch("gqa", **common, head_dim=cfg.get("head_dim") or hidden // heads)


def safetensors_tensors(folder: str) -> tuple[Arch, list[Tensor]]:
    """Architecture (config.json) and tensors (every shard's header) of a safetensors folder."""
    cfg_path = os.path.join(folder, "config.json")
    arch = _config_arch(_json_object(cfg_path, "", lambda f: f.read()), cfg_path)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FitError(f"{folder}: no .safetensors files")
    out = []
    for fname in files:
        path = os.path.join(folder, fname)
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            try:
                begin, end = info["data_offsets"]
                n = math.prod(info["shape"])
                dtype = info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise FitError(f"{path}: malformed header entry for {name!r}") from None
            layer, kind = classify(name, arch.num_hidden_layers)
            out.append(Tensor(name, end - begin, layer, kind, n, dtype))
    return arch, out


def model_tensors(model: str) -> tuple[str, str, Arch, list[Tensor]]:
    """(display name, source, architecture, tensors) of a catalogue name, a GGUF, a safetensors
    folder (a file inside one counts as the folder) or a model of the local store."""
    if os.path.isdir(model):
        return model, "safetensors", *safetensors_tensors(model)
    if os.path.isfile(model):
        from finback.loader.gguf import is_gguf

        if is_gguf(model):
            return model, "gguf", *gguf_tensors(model)
        if model.endswith(".safetensors"):
            folder = os.path.dirname(os.path.abspath(model))
            return folder, "safetensors", *safetensors_tensors(folder)
        raise FitError(f"{model}: neither a GGUF file nor a safetensors folder")
    from finback.store.catalog import UnknownModel, lookup

    try:
        entry = lookup(model)
    except UnknownModel:  # a model of the local store (created, copied), else the closest names
        from finback.store.store import Store

        store = Store()
        if store.exists(model):
            return model_tensors(store.model_path(model))
        raise
    arch = ARCHITECTURES.get(entry.size_tag)
    if arch is None:
        raise FitError(f"{entry.name}: no architecture numbers for size {entry.size_tag!r}")
    return entry.name, "catalogue", arch, catalogue_tensors(entry, arch)


# ------------------------------------------------------------------------------------ sizes

def parse_bytes(text: str | float) -> int:
    """'80GiB', '96GB', '81920MiB', '24G' (G = GiB), or a plain number of GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    if m is None:
        raise FitError(f"cannot read {text!r} as a size: write e.g. 80GiB, 96GB, 24G")
    value, unit = float(m[1]), m[2].lower()
    if not unit:
        return int(value * GiB)
    powers = {"k": 1, "m": 2, "g": 3, "t": 4}
    if unit == "b":
        return int(value)
    p = powers[unit[0]]
    decimal = unit.endswith("b") and "i" not in unit
    return int(value * (1000 ** p if decimal else 1024 ** p))


def _stages(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of `pp` stages, the remainder spread over the first stages."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def _kv_heads_per_rank(a: Arch, tp: int) -> int:
    return max(1, a.num_key_value_heads // tp)


def valid_tp(a: Arch, tp: int) -> bool:
    """TP splits whole attention heads, and KV heads evenly (or replicates them when tp > kv_heads)."""
    if a.num_attention_heads % tp:
        return False
    if a.family == "gqa":
        kv = a.num_key_value_heads
        return kv % tp == 0 or tp % kv == 0
    return True


def kv_bytes_per_token(a: Arch, layers: int, tp: int, kv_bytes: int) -> int:
    """KV cache bytes one token takes on one rank holding `layers` layers (see the module docstring)."""
    if a.family == "mla":
        return layers * (a.kv_lora_rank + a.qk_rope_head_dim) * kv_bytes
    return 2 * layers * _kv_heads_per_rank(a, tp) * a.head_dim * kv_bytes


def activation_bytes(a: Arch, tokens: int, seqs: int, tp: int, act_bytes: int) -> int:
    """The estimate of one forward's peak activations on one rank (see the module docstring)."""
    h = a.hidden_size
    heads = max(1, a.num_attention_heads // tp)
    if a.family == "mla":
        attn = (heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) + a.kv_lora_rank + a.qk_rope_head_dim
                + heads * (a.qk_nope_head_dim + a.v_head_dim) + heads * a.v_head_dim)
    else:
        attn = (heads + 2 * _kv_heads_per_rank(a, tp)) * a.head_dim + heads * a.head_dim
    mlp = 3 * a.intermediate_size // tp
    if a.n_routed_experts:
        mlp = max(mlp, 3 * (a.num_experts_per_tok + a.n_shared_experts) * a.moe_intermediate_size // tp)
    return tokens * act_bytes * (4 * h + attn + mlp) + 3 * seqs * a.vocab_size * 4


def _cpu_bytes(tensors: list[Tensor], a: Arch, dtype_bytes: int, keep_int4: bool) -> int:
    """Weights as the CPU path holds them: fused linears (qkv, gate_up) stay 4-bit only when all
    their parts are 4-bit GGUF types; everything else at the compute dtype."""
    four = {"Q4_0", "Q4_1", "Q4_K"}
    groups: dict[tuple[int, str], list[Tensor]] = {}
    total = 0
    for t in tensors:
        if t.kind == "mtp":
            continue
        linear = (t.layer >= 0 and t.layer < a.num_hidden_layers and t.ggml_type and "norm" not in t.name
                  and not t.name.endswith("bias") and t.ggml_type != "F32")
        if not linear:
            total += t.elements * dtype_bytes
            continue
        fused = re.sub(r"(q_proj|k_proj|v_proj|attn_q|attn_k|attn_v)(?=\.)", "qkv", t.name)
        fused = re.sub(r"(gate_proj|up_proj|ffn_gate|ffn_up)(?=\.|_)", "gate_up", fused)
        groups.setdefault((t.layer, fused), []).append(t)
    for parts in groups.values():
        int4 = keep_int4 and dtype_bytes == 2 and all(p.ggml_type in four for p in parts)
        rate = INT4_BYTES_PER_WEIGHT if int4 else dtype_bytes
        total += sum(math.ceil(p.elements * rate) for p in parts)
    return total


# ------------------------------------------------------------------------------------ the plan

@dataclass
class Layout:
    tp: int
    pp: int
    weights: int            # bytes of weights on the fullest GPU
    kv_per_token: int       # bytes of KV cache per token on that GPU
    activations: int
    graphs: int
    budget: int             # gpu_memory * gpu_memory_utilization (RAM * it on CPU)

    @property
    def free_for_kv(self) -> int:
        return self.budget - self.weights - self.activations - self.graphs

    def kv_bytes(self, context: int, concurrency: int) -> int:
        return concurrency * -(-context // BLOCK_SIZE) * BLOCK_SIZE * self.kv_per_token

    def per_gpu_bytes(self, context: int, concurrency: int) -> int:
        return self.weights + self.activations + self.graphs + self.kv_bytes(context, concurrency)

    def max_context(self, concurrency: int, cap: int) -> int:
        free = self.free_for_kv
        if free <= 0:
            return 0
        tokens = free // (concurrency * self.kv_per_token) // BLOCK_SIZE * BLOCK_SIZE if self.kv_per_token else cap
        return int(min(tokens, cap))


@dataclass
class FitReport:
    model: str
    source: str              # catalogue | gguf | safetensors
    device: str              # "gpu" | "cpu"
    gpus: int                # 0 on CPU
    gpu_memory: int          # bytes per GPU (RAM on CPU)
    gpu_memory_utilization: float
    context: int
    concurrency: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    weight_bytes: int        # all loaded weights (file bytes on GPU; the CPU path's bytes on CPU)
    weights_per_gpu: int
    kv_bytes_per_token: int  # on the fullest GPU
    kv_cache_bytes: int      # for context x concurrency on that GPU
    activation_bytes: int
    cuda_graph_bytes: int
    per_gpu_bytes: int       # the sum of the four above
    budget_per_gpu: int
    fits: bool
    max_context: int         # for `concurrency` sequences on these GPUs (0: the weights do not fit)
    model_max_context: int
    min_gpus: int | None     # fewest GPUs of this size for context x concurrency (None: > search limit)
    min_gpus_layout: dict[str, int] | None
    family: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _grouped(tensors: list[Tensor]) -> dict[tuple[int, str], int]:
    """Bytes by (layer, kind), loaded tensors only: what the layouts split."""
    out: dict[tuple[int, str], int] = {}
    for t in tensors:
        if t.kind != "mtp":
            out[t.layer, t.kind] = out.get((t.layer, t.kind), 0) + t.nbytes
    return out


def _layout(a: Arch, grouped: dict[tuple[int, str], int], tp: int, pp: int, budget: int, *,
            cpu_weights: int | None, concurrency: int, kv_bytes: int, act_bytes: int, batched: int,
            graphs: bool) -> Layout:
    stages = _stages(a.num_hidden_layers, pp)
    per_stage = [0] * pp
    stage_of = {layer: s for s, r in enumerate(stages) for layer in r}
    for (layer, kind), nbytes in grouped.items():
        s = 0 if layer < 0 else pp - 1 if layer >= a.num_hidden_layers else stage_of[layer]
        if kind == "replicated":
            share = nbytes
        elif kind == "kv" and a.num_key_value_heads < tp:
            share = -(-nbytes // a.num_key_value_heads)
        else:
            share = -(-nbytes // tp)
        per_stage[s] += share
    worst = max(range(pp), key=lambda s: (per_stage[s], len(stages[s])))
    weights = cpu_weights if cpu_weights is not None else per_stage[worst]
    layers = max(len(r) for r in stages)
    seqs = min(concurrency, batched)
    act = activation_bytes(a, batched, seqs, tp, act_bytes)
    graph = (GRAPH_FIXED_BYTES + activation_bytes(a, min(concurrency, GRAPH_CAPTURE_MAX),
                                                  min(concurrency, GRAPH_CAPTURE_MAX), tp, act_bytes)) if graphs else 0
    return Layout(tp, pp, weights, kv_bytes_per_token(a, layers, tp, kv_bytes), act, graph, budget)


def layouts(a: Arch, gpus: int, tp: int | None = None, pp: int | None = None,
            gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> list[tuple[int, int]]:
    """The (tp, pp) splits of `gpus` GPUs this model allows: TP within a node, whole heads a rank,
    at most one stage a layer."""
    out = []
    for t in range(1, gpus + 1):
        if gpus % t or (tp is not None and t != tp) or t > gpus_per_node or not valid_tp(a, t):
            continue
        p = gpus // t
        if (pp is not None and p != pp) or p > a.num_hidden_layers:
            continue
        out.append((t, p))
    return out


def plan(model: str, *, gpus: int | None = None, gpu_memory: int | str | None = None, context: int = 32768,
         concurrency: int = 1, tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None,
         gpu_memory_utilization: float = 0.9, kv_cache_dtype: str = "auto", dtype: str = "auto",
         max_num_batched_tokens: int | None = None, enforce_eager: bool = False, keep_int4: bool = True,
         gpus_per_node: int = DEFAULT_GPUS_PER_NODE, max_search_gpus: int = MAX_SEARCH_GPUS) -> FitReport:
    """Size `model` on `gpus` GPUs of `gpu_memory` bytes each (detected with torch.cuda when None);
    `gpus=0` sizes it in RAM (`gpu_memory` then means RAM; detected when None)."""
    if context < 1 or concurrency < 1:
        raise FitError("context and concurrency must be at least 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise FitError("gpu_memory_utilization must be in (0, 1]")
    name, source, arch, tensors = model_tensors(model)
    if gpus is None or gpu_memory is None:
        found, mem = detect_gpus()
        gpus = found if gpus is None else gpus
        if gpu_memory is None:
            gpu_memory = mem if gpus > 0 and found else detect_ram() if gpus == 0 else None
        if gpu_memory is None:
            raise FitError("no GPU detected: give --gpu-memory (e.g. 80GiB), or --gpus 0 for RAM")
    mem = parse_bytes(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    if gpus < 0 or mem <= 0:
        raise FitError("gpus must be >= 0 and gpu memory > 0")
    cpu = gpus == 0
    act_bytes = {"float32": 4}.get(dtype, 2)
    kv_bytes = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float32": 4}.get(kv_cache_dtype, act_bytes)
    batched = max_num_batched_tokens or max(2048, concurrency)
    batched = min(batched, context * concurrency)
    budget = int(mem * gpu_memory_utilization)
    cap = arch.max_position_embeddings
    notes = []
    if context > cap:
        notes.append(f"context {context} is beyond the model's {cap} tokens")
        cap = context
    common = {"concurrency": concurrency, "kv_bytes": kv_bytes, "act_bytes": act_bytes, "batched": batched}
    grouped = _grouped(tensors)

    def best(n: int, tp: int | None, pp: int | None) -> Layout | None:
        options = [_layout(arch, grouped, t, p, budget, cpu_weights=None, graphs=not enforce_eager, **common)
                   for t, p in layouts(arch, n, tp, pp, gpus_per_node)]
        # a layout that fits, the widest TP among those (the usual deployment: TP inside a node,
        # PP across nodes); else the one with the most room
        return max(options, key=lambda l: (l.per_gpu_bytes(context, concurrency) <= l.budget, l.tp,
                                           l.free_for_kv), default=None)

    if cpu:
        if (tensor_parallel_size or 1) > 1 or (pipeline_parallel_size or 1) > 1:
            raise FitError("tensor/pipeline parallelism needs GPUs (--gpus 0 sizes one process in RAM)")
        weights = _cpu_bytes(tensors, arch, act_bytes, keep_int4)
        chosen = _layout(arch, grouped, 1, 1, budget, cpu_weights=weights, graphs=False, **common)
        min_gpus, min_layout = None, None
    else:
        if tensor_parallel_size and gpus % tensor_parallel_size:
            raise FitError(f"{gpus} GPUs cannot be split into tensor parallel groups of {tensor_parallel_size}")
        chosen = best(gpus, tensor_parallel_size, pipeline_parallel_size)
        if chosen is None:
            raise FitError(f"{name}: no way to split it over {gpus} GPU(s) with tensor parallel size "
                           f"{tensor_parallel_size or 'any'} (TP must divide {arch.num_attention_heads} heads "
                           f"and stay within {gpus_per_node} GPUs a node)")
        min_gpus = min_layout = None
        for n in range(1, max_search_gpus + 1):
            if tensor_parallel_size and n % tensor_parallel_size:
                continue
            lay = best(n, tensor_parallel_size, None)
            if lay is not None and lay.per_gpu_bytes(context, concurrency) <= lay.budget:
                min_gpus, min_layout = n, {"tensor_parallel_size": lay.tp, "pipeline_parallel_size": lay.pp}
                break
        if arch.family == "mla" and chosen.tp > 1:
            notes.append("MLA's latent KV cache is replicated on every TP rank")
    weight_total = sum(grouped.values()) if not cpu else chosen.weights
    need = chosen.per_gpu_bytes(context, concurrency)
    return FitReport(
        model=name, source=source, device="cpu" if cpu else "gpu", gpus=gpus, gpu_memory=mem,
        gpu_memory_utilization=gpu_memory_utilization, context=context, concurrency=concurrency,
        tensor_parallel_size=chosen.tp, pipeline_parallel_size=chosen.pp, weight_bytes=weight_total,
        weights_per_gpu=chosen.weights, kv_bytes_per_token=chosen.kv_per_token,
        kv_cache_bytes=chosen.kv_bytes(context, concurrency), activation_bytes=chosen.activations,
        cuda_graph_bytes=chosen.graphs, per_gpu_bytes=need, budget_per_gpu=chosen.budget, fits=need <= chosen.budget,
        max_context=chosen.max_context(concurrency, cap), model_max_context=arch.max_position_embeddings,
        min_gpus=min_gpus, min_gpus_layout=min_layout, family=arch.family, notes=notes)


# ------------------------------------------------------------------------------------ hardware

def detect_gpus() -> tuple[int, int | None]:
    """(number of CUDA GPUs, the smallest one's memory in bytes) via torch; (0, None) without CUDA."""
    try:
        import torch
    except ImportError:
        return 0, None
    if not torch.cuda.is_available():
        return 0, None
    n = torch.cuda.device_count()
    return n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n))


def detect_ram() -> int:
    """Physical memory of this machine, in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------------------------ printing

def human(b: float) -> str:
    """Binary units, one decimal: '79.1 GiB'."""
    for unit, div in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def report_rows(r: FitReport) -> list[tuple[str, str]]:
    """The report as (what, value) rows, for a table or an error message."""
    where = (f"CPU, {human(r.gpu_memory)} RAM" if r.device == "cpu"
             else f"{r.gpus} GPU(s) x {human(r.gpu_memory)}, TP {r.tensor_parallel_size} x PP {r.pipeline_parallel_size}")
    one = "RAM" if r.device == "cpu" else "per GPU"
    rows = [("model", f"{r.model} ({r.source}, {r.family.upper()})"), ("hardware", where),
            ("context x concurrency", f"{r.context} x {r.concurrency}"),
            ("weights, all", human(r.weight_bytes)), (f"weights {one}", human(r.weights_per_gpu)),
            ("KV cache per token", human(r.kv_bytes_per_token)), (f"KV cache {one}", human(r.kv_cache_bytes)),
            ("activations (estimate)", human(r.activation_bytes))]
    if r.device == "gpu":
        rows.append(("CUDA graphs (estimate)", human(r.cuda_graph_bytes)))
    rows += [(f"total {one}", human(r.per_gpu_bytes)),
             (f"budget {one}", f"{human(r.budget_per_gpu)} ({r.gpu_memory_utilization:g} of {human(r.gpu_memory)})"),
             ("fits", "yes" if r.fits else "NO"),
             ("max context", f"{r.max_context} tokens x {r.concurrency} (model: {r.model_max_context})")]
    if r.device == "gpu":
        lay = r.min_gpus_layout or {}
        rows.append(("min GPUs of this size", "more than the search limit" if r.min_gpus is None else
                     f"{r.min_gpus} (TP {lay.get('tensor_parallel_size')} x PP {lay.get('pipeline_parallel_size')})"))
    rows += [("note", n) for n in r.notes]
    return rows


def report_text(r: FitReport) -> str:
    rows = report_rows(r)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------ the engine's check

class ModelDoesNotFit(ValueError):
    """The model cannot fit the memory the engine would run it in; the message holds the table."""

    def __init__(self, report: FitReport):
        self.report = report
        what = "RAM" if report.device == "cpu" else f"{report.gpus} GPU(s)"
        super().__init__(f"model {report.model} does not fit {what}: it needs {human(report.per_gpu_bytes)} "
                         f"{'' if report.device == 'cpu' else 'per GPU '}of {human(report.budget_per_gpu)}\n"
                         + report_text(report))


def check_engine_fits(path: str, engine_kwargs: dict[str, Any]) -> FitReport | None:
    """Refuse up front (ModelDoesNotFit) a model that cannot fit where the engine would load it:
    on GPUs, weights + activations + graphs + the KV cache of max_model_len (one block when unset)
    against gpu_memory_utilization of the smallest GPU used; on CPU, the CPU path's weights + the KV
    cache space (kv_cache_space_gb, default 4 GiB) + activations against the machine's RAM.
    A model the planner cannot read is left to the engine (None), which reports its own error."""
    kw = engine_kwargs
    if kw.get("load_format") == "dummy":
        return None
    import torch

    device = str(kw.get("device") or "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    tp, pp = int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1)
    common = {"dtype": str(kw.get("dtype") or "auto"), "keep_int4": bool(kw.get("keep_int4", True)),
              "max_num_batched_tokens": kw.get("max_num_batched_tokens"),
              "enforce_eager": bool(kw.get("enforce_eager", False))}
    try:
        if on_gpu:
            n, mem = detect_gpus()
            if not n or mem is None:
                return None
            r = plan(path, gpus=tp * pp, gpu_memory=mem, context=int(kw.get("max_model_len") or BLOCK_SIZE),
                     concurrency=1, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                     gpu_memory_utilization=float(kw.get("gpu_memory_utilization") or 0.9), **common)
        else:
            space = float(kw.get("kv_cache_space_gb") or 4.0) * GiB
            r = plan(path, gpus=0, gpu_memory=detect_ram(), context=BLOCK_SIZE, concurrency=1,
                     gpu_memory_utilization=1.0, **common)
            r = replace(r, kv_cache_bytes=int(space), per_gpu_bytes=r.per_gpu_bytes - r.kv_cache_bytes + int(space))
            r.fits = r.per_gpu_bytes <= r.budget_per_gpu
    except (ValueError, OSError, KeyError):  # FitError, ModelLoadError, an unknown name: the engine's to report
        return None
    if not r.fits:
        raise ModelDoesNotFit(r)
    return r
