"""Shared test support: tiny random models written as safetensors and GGUF, and the greedy
comparison against transformers (fp32 on CPU) with the top-2 tie rule."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TIE = 1e-4  # a divergence is accepted only where the reference's top-2 logits are this close


def tiny_hf_model(arch: str, seed: int = 0, vocab: int = 1024, hidden: int = 256):
    """A random-weight transformers model of a tiny shape: Qwen2 (QKV bias) or Llama 3 (rope scaling).

    Weights get a larger spread than the default init so that greedy choices are clear."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=10000.0, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0, **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5 * 1.5)
    return model


def tiny_deepseek_v3_config(**over) -> dict:
    """transformers DeepseekV3Config fields of a tiny DeepSeek-V3 with the real head sizes (qk_nope 128,
    qk_rope 64, v 128, kv_lora 512), 32 experts in 4 groups (4 used), first layer dense, YaRN; `over`
    replaces any of them."""
    return {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
            "n_routed_experts": 32, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 64,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 4, "topk_group": 2,
            "num_experts_per_tok": 4, "first_k_dense_replace": 1, "norm_topk_prob": True,
            "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 1.0}} | over


def tiny_deepseek_v3(seed: int = 0, spread: float = 1.5, bias_spread: float = 0.1, **over):
    """transformers' DeepseekV3ForCausalLM of tiny_deepseek_v3_config(**over) with random weights of a
    wide spread (spread / sqrt(fan_in): clear greedy choices) and routing biases of std `bias_spread`
    (0: left at transformers' zeros)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**tiny_deepseek_v3_config(**over)))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * spread)
        if bias_spread:
            for layer in model.model.layers[model.config.first_k_dense_replace:]:
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(bias_spread * torch.randn_like(bias))
    return model


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite fp16 bit patterns (every exponent, subnormals and zero included)."""
    bits = rng.integers(0, 0x7C00, size=n, dtype=np.uint16)
    return bits | (rng.integers(0, 2, size=n, dtype=np.uint16) << 15)


def ref_dequant(raw: np.ndarray, qtype) -> torch.Tensor:
    """gguf-py's dequantization of raw GGUF data of `qtype` (the reference), flat float32."""
    import gguf

    with np.errstate(all="ignore"):
        return torch.from_numpy(np.array(gguf.quants.dequantize(raw.reshape(-1), qtype), dtype=np.float32).reshape(-1))


def assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, nan_aware: bool = False) -> None:
    """Bit-for-bit float32 equality. nan_aware: NaN payloads and signs produced by arithmetic (NaN*q,
    inf*0) depend on the instruction used, so only the NaN positions must agree."""
    got, ref = got.reshape(-1).cpu(), ref.reshape(-1)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    if nan_aware:
        gn, rn = torch.isnan(got), torch.isnan(ref)
        assert torch.equal(gn, rn), f"NaN positions differ at {torch.nonzero(gn != rn)[:5].tolist()}"
        got, ref = got[~gn], ref[~rn]
    gi, ri = got.view(torch.int32), ref.view(torch.int32)
    if not torch.equal(gi, ri):
        bad = torch.nonzero(gi != ri)[:5].reshape(-1)
        raise AssertionError(f"{int((gi != ri).sum())} values differ; first at {bad.tolist()}: "
                             f"got {got[bad].tolist()} want {ref[bad].tolist()}")


def tokenizer_metadata(gguf_path: str) -> dict:
    """The tokenizer.* keys of a GGUF (works on the cut-off R1 part)."""
    from finback.loader.gguf import read_gguf_metadata

    return {k: v for k, v in read_gguf_metadata(gguf_path).items() if k.startswith("tokenizer.")}


def save_safetensors(model, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter: HF halves layout -> interleaved rotary pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


_HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}


def _gguf_name(name: str) -> str:
    """llama.cpp's name of a transformers Llama/Qwen2 parameter (written here, not finback's)."""
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    parts = name.split(".")
    return f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(model, path: str, qtype: str | Callable[[str], Any], tokenizer_metadata: dict | None = None,
               encode: Callable[[str, np.ndarray, Any], np.ndarray] | None = None) -> str:
    """Write a transformers Llama/Qwen2 model as a GGUF the way llama.cpp's converter lays it out:
    norms and biases F32, Llama Q/K permuted, 2-D weights in `qtype`: a type name (F16, Q8_0, Q4_K,
    ...) or a function giving a tensor's type from its llama.cpp name. They are quantized by finback's
    quantizer unless `encode(name, weight, type)` gives their raw blocks (e.g. random IQ blocks)."""
    import gguf

    from finback.loader.quantize import quantize

    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    type_of = qtype if callable(qtype) else lambda name: qtype
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    for key, value in (tokenizer_metadata or {}).items():
        _add_kv(w, key, value)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        from finback.layers.rotary import rope_inv_freq
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        base = rope_inv_freq(head_dim, float(rope["rope_theta"]), None)
        scaled = rope_inv_freq(head_dim, float(rope["rope_theta"]), rope)
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    for name, arr in sd.items():
        gname = _gguf_name(name)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            arr = _permute_qk(arr, heads)
        if arr.ndim == 1:
            w.add_tensor(gname, arr.astype(np.float32))
            continue
        qt = type_of(gname)
        qt = gguf.GGMLQuantizationType[qt] if isinstance(qt, str) else qt
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        w.add_tensor(gname, encode(gname, arr, qt) if encode else quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_kv(w, key, value):
    import gguf

    if key.startswith("general.architecture"):
        return
    if isinstance(value, list):
        first = value[0] if value else ""
        sub = (gguf.GGUFValueType.STRING if isinstance(first, str) else
               gguf.GGUFValueType.FLOAT32 if isinstance(first, float) else gguf.GGUFValueType.INT32)
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
    elif isinstance(value, bool):
        w.add_key_value(key, value, gguf.GGUFValueType.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32)
    elif isinstance(value, float):
        w.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)
    else:
        w.add_key_value(key, str(value), gguf.GGUFValueType.STRING)


def dequantized_reference(model, gguf_path: str):
    """A copy of `model` whose weights are what the GGUF file holds, dequantized by gguf-py
    (independent of finback's code), in Hugging Face layout."""
    import copy

    import gguf

    reader = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    ref = copy.deepcopy(model)
    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    with torch.no_grad():
        for name, p in ref.named_parameters():
            gname = _gguf_name(name)
            t = by_name[gname]
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
                # invert the converter's permutation with numpy (not finback's code)
                n = arr.shape[0]
                arr = arr.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr)))
    return ref


@dataclass
class Reference:
    tokens: list[int]
    logits: list[torch.Tensor]  # per generated step, [V]


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], max_new: int) -> Reference:
    """Greedy decoding with transformers (fp32, KV cache), recording each step's logits."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    pkv = out.past_key_values
    logits = out.logits[0, -1].float()
    tokens, steps = [], []
    for _ in range(max_new):
        steps.append(logits)
        t = int(torch.argmax(logits))
        tokens.append(t)
        out = model(torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        logits = out.logits[0, -1].float()
    return Reference(tokens, steps)


def assert_greedy_matches(ours: list[int], ref: Reference, label: str = "") -> int:
    """Token-for-token equality. A divergence is accepted only where the reference's top-2 logits
    at that step are within TIE (an fp32 tie); comparison stops there. Returns the number of
    tokens compared."""
    assert len(ours) == len(ref.tokens), f"{label}: {len(ours)} tokens vs reference {len(ref.tokens)}"
    for i, (a, b) in enumerate(zip(ours, ref.tokens)):
        if a != b:
            margin = float(ref.logits[i].max() - ref.logits[i][a])
            assert margin < TIE, (f"{label}: token {i} differs: ours {a}, reference {b}; the reference "
                                  f"puts ours {margin:.3g} below its choice: not a tie")
            return i
    return len(ours)


def fit_r1_tiny(r1_part: str, path: str, question: str, reasoning: str, answer: str) -> str:
    """A tiny Qwen2 over the real DeepSeek-R1 vocabulary and chat template (the tokenizer metadata of
    the GGUF `r1_part`), fitted to answer `question` R1-style, "<think>\n{reasoning}\n</think>\n\n{answer}"
    (a random model never writes <think>), written to `path` as an F32 GGUF with that metadata."""
    from finback.prompt.template import ChatTemplate
    from finback.tokenizer import Tokenizer

    meta = tokenizer_metadata(r1_part)
    tok = Tokenizer.from_gguf(meta)
    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    prompt_ids = tok.encode(template.render([{"role": "user", "content": question}]))
    answer_ids = tok.encode(f"<think>\n{reasoning}\n</think>\n\n{answer}") + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = -100
    model = tiny_hf_model("qwen2", seed=7, vocab=len(meta["tokenizer.ggml.tokens"]), hidden=64).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    return write_gguf(model.eval(), path, "F32", tokenizer_metadata=meta)


def runner_greedy(runner, prompt: list[int], n_new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding straight through a ModelRunner (the whole sequence recomputed each step, blocks
    0, 1, ... of 16): the new tokens and each step's logits [n_new, V]."""
    ids = list(prompt)
    logits = []
    for _ in range(n_new):
        hidden = runner.hidden_states(ids, list(range(-(-len(ids) // 16))))
        logits.append(runner.model.compute_logits(hidden[-1:])[0].float())
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], torch.stack(logits)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class live_server:
    """`finback serve` as a subprocess on a free loopback port with its own store folder; a context
    manager giving (url, log_path). `env` adds environment variables (None values are removed)."""

    def __init__(self, store, env: dict | None = None, args: tuple = ("--kv-cache-space-gb", "0.3")):
        self.store, self.extra, self.args = store, env or {}, args

    def __enter__(self):
        import subprocess
        import sys
        import time
        import urllib.request

        port = free_port()
        env = dict(os.environ, FINBACK_MODELS=str(self.store), FINBACK_HOST=f"127.0.0.1:{port}")
        for k, v in self.extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        os.makedirs(str(self.store), exist_ok=True)
        self.log_path = os.path.join(str(self.store), "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "finback.cli.main", "serve", *self.args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        for _ in range(300):
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as r:
                    if r.read() == b"Ollama is running":
                        return self
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("server did not start: " + open(self.log_path).read())

    def __exit__(self, *exc):
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def deadline(seconds: float, what: str):
    """A context manager that raises TimeoutError in the main thread after `seconds` (SIGALRM)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def _cm():
        def on_alarm(signum, frame):
            raise TimeoutError(f"{what} took more than {seconds} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return _cm()
