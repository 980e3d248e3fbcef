"""IQ GGUF types (IQ1_S ... IQ4_XS): the codebook tables (finback.loader.iq_grids), torch
dequantization bit-equal to gguf-py on valid and adversarial blocks, random valid blocks of every
type (finback.loader.random_blocks), and a tiny Llama whose weights are IQ blocks giving the same
greedy tokens as transformers on the weights gguf-py dequantizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from fbtest import (
    _gguf_name,
    assert_bits_equal,
    assert_greedy_matches,
    dequantized_reference,
    finite_f16_bits,
    greedy_reference,
    ref_dequant,
    tiny_hf_model,
    write_gguf,
)
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from finback import LLM, SamplingParams
from finback.loader import iq_grids, quants
from finback.loader.quants import (
    SUPPORTED_TYPES,
    UnsupportedQuantType,
    dequantize,
    type_nbytes,
)
from finback.loader.random_blocks import random_blocks

IQ_TYPES = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS]
name = lambda t: t.name


def adversarial_blocks(qtype: T, n_blocks: int, seed: int, finite: bool = True) -> np.ndarray:
    """Uniformly random bytes (n_blocks, type_size); with finite=True the fp16 d is made finite."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    if finite:
        bits = finite_f16_bits(rng, n_blocks)
        if qtype == T.IQ1_M:  # d's nibble w is the top nibble of the uint16 scale word at 48 + 2w
            for w in range(4):
                raw[:, 49 + 2 * w] = (raw[:, 49 + 2 * w] & 0x0F) | (((bits >> (4 * w)) & 0xF) << 4).astype(np.uint8)
        else:
            raw[:, 0:2] = bits.view(np.uint8).reshape(-1, 2)
    return raw


def shapes_for(qtype: T, n_blocks: int) -> list[tuple[int, ...]]:
    bs = GGML_QUANT_SIZES[qtype][0]
    n = n_blocks * bs
    return [(n,), (n // (bs * 4), bs * 4), (2, 3, n // (6 * bs), bs)]


# ----------------------------------------------------------------------------- tables


def test_grid_tables():
    # first entries of ggml-common.h's tables, written out by hand
    want = {T.IQ2_XXS: (0x0808080808080808, 0x080808080808082B), T.IQ2_XS: (0x0808080808080808, 0x080808080808082B),
            T.IQ2_S: (0x0808080808080808, 0x080808080808082B), T.IQ3_XXS: (0x04040404, 0x04040414),
            T.IQ3_S: (0x01010101, 0x01010103), T.IQ1_S: (-1, -255), T.IQ1_M: (-1, -255)}
    iq2, iq1 = {8, 25, 43}, {-1, 0, 1}
    values = {T.IQ2_XXS: iq2, T.IQ2_XS: iq2, T.IQ2_S: iq2, T.IQ3_XXS: {4, 12, 20, 28, 36, 44, 52, 62},
              T.IQ3_S: set(range(1, 16, 2)), T.IQ1_S: iq1, T.IQ1_M: iq1}
    for qt, (n, w) in iq_grids.GRID_SHAPES.items():
        g = iq_grids.grid(qt)
        assert g.shape == (n, w) and g.dtype == torch.float32
        assert len(torch.unique(g, dim=0)) == n  # a codebook has no duplicate rows
        packed = iq_grids.packed_grid(int(qt))
        assert packed.shape == (n,) and packed.dtype == (torch.int64 if w == 8 else torch.int32)
        assert packed[:2].tolist() == list(want[qt])
        assert torch.equal(packed.view(torch.int8).view(n, w).float(), g)
        assert torch.equal(iq_grids.grid(qt, dtype=torch.int8).float(), g)
        assert set(g.unique().tolist()) == values[qt]
        assert iq_grids.grid(qt) is g  # cached
    assert iq_grids.GRID_SHAPES[T.IQ1_S] == (2048, 8) and iq_grids.GRID_SHAPES[T.IQ2_S] == (1024, 8)


def test_sign_tables():
    ks = iq_grids.ksigns()
    assert ks.dtype == torch.uint8 and ks.shape == (128,)
    for i, b in enumerate(ks.tolist()):  # the low 7 bits are the index; bit 7 makes the parity even
        assert b & 0x7F == i and b.bit_count() % 2 == 0
    st = iq_grids.sign_table()
    assert st.shape == (128, 8)
    for i in (0, 1, 77, 127):
        assert st[i].tolist() == [-1.0 if (int(ks[i]) >> k) & 1 else 1.0 for k in range(8)]
    kv = iq_grids.kvalues_iq4nl(dtype=torch.int16)
    assert kv.tolist() == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    assert iq_grids.IQ1_DELTA == 0.125


def test_grid_errors():
    for bad in (T.Q4_K, T.IQ4_XS, 9999, "IQ2_XXS"):
        with pytest.raises(ValueError, match="IQ grid|not a GGUF tensor type"):
            iq_grids.grid(bad)


# ----------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=name)
def test_random_valid_blocks_bit_exact(qtype):
    shape = (24, 4 * 256)
    raw = random_blocks(qtype, shape, torch.Generator().manual_seed(int(qtype))).reshape(-1)
    ref = ref_dequant(raw.numpy(), qtype)
    assert torch.isfinite(ref).all()
    for s in shapes_for(qtype, raw.numel() // GGML_QUANT_SIZES[qtype][1]):
        got = dequantize(raw, qtype, s)
        assert got.shape == s
        assert_bits_equal(got, ref)
    assert_bits_equal(dequantize(raw, int(qtype), shape), ref)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=name)
def test_adversarial_blocks_bit_exact(qtype):
    raw = adversarial_blocks(qtype, 1536, seed=100 + int(qtype))
    ref = ref_dequant(raw, qtype)
    assert torch.isfinite(ref).all()
    assert_bits_equal(dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shapes_for(qtype, 1536)[1]), ref)
    # any bytes at all (NaN/inf d): equal wherever the result is not NaN, NaN in the same places
    raw = adversarial_blocks(qtype, 768, seed=200 + int(qtype), finite=False)
    got = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shapes_for(qtype, 768)[0])
    assert_bits_equal(got, ref_dequant(raw, qtype), nan_aware=True)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=name)
def test_chunks_and_unaligned(qtype, monkeypatch):
    """Tiny chunks (many work units, a ragged last one, several threads where torch has them) and
    data starting at an odd address decode the same."""
    raw = adversarial_blocks(qtype, 24 * 37, seed=300 + int(qtype))
    ref = ref_dequant(raw, qtype)
    buf = torch.zeros(raw.size + 3, dtype=torch.uint8)
    buf[1 : 1 + raw.size] = torch.from_numpy(raw.reshape(-1))
    shape = shapes_for(qtype, 24 * 37)[2]
    assert_bits_equal(dequantize(buf[1 : 1 + raw.size], qtype, shape), ref)
    monkeypatch.setattr(quants, "_SUB_ELEMS", 256 * 3)
    monkeypatch.setattr(quants, "_SUPER", 3)
    out = torch.full(shape, float("nan"))
    assert dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shape, out=out) is out
    assert_bits_equal(out, ref)


def test_known_values():
    """Hand-built blocks whose values follow from the format (independent of gguf-py)."""
    one = np.array([1.0], np.float16).view(np.uint8)
    # IQ2_XXS, d = 1, everything else 0: grid row 0 (all 8), scale (0.5 + 0) * 0.25, no signs -> 1.0
    blk = np.concatenate([one, np.zeros(64, np.uint8)])
    assert dequantize(torch.from_numpy(blk), T.IQ2_XXS, (256,)).tolist() == [1.0] * 256
    # ... and sign index 1 on the first row of group 0 (ksigns[1] = 0b10000001): values 0 and 7 negated
    blk[2 + 4] = 1
    got = dequantize(torch.from_numpy(blk), T.IQ2_XXS, (256,))
    assert got[:8].tolist() == [-1, 1, 1, 1, 1, 1, 1, -1] and got[8:].tolist() == [1.0] * 248
    # IQ1_S, d = 1, zeros: grid row 0 is all -1, scale 2*0+1, delta +1/8 -> -0.875
    blk = np.concatenate([one, np.zeros(48, np.uint8)])
    assert dequantize(torch.from_numpy(blk), T.IQ1_S, (256,)).tolist() == [-0.875] * 256
    # IQ4_NL, d = 2: byte k holds nibbles (k, 15 - k)
    qs = np.array([k | ((15 - k) << 4) for k in range(16)], np.uint8)
    blk = np.concatenate([np.array([2.0], np.float16).view(np.uint8), qs])
    kv = iq_grids.kvalues_iq4nl().tolist()
    assert dequantize(torch.from_numpy(blk), T.IQ4_NL, (32,)).tolist() == [2 * kv[k] for k in range(16)] + [
        2 * kv[15 - k] for k in range(16)]
    # IQ1_M, d = 1 (0x3C00: nibbles 0, 0, C, 3 in scale words 0..3), zeros elsewhere -> -0.875
    blk = np.zeros(56, np.uint8)
    blk[53], blk[55] = 0xC0, 0x30
    assert dequantize(torch.from_numpy(blk), T.IQ1_M, (256,)).tolist() == [-0.875] * 256


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=name)
def test_wrong_sizes_raise(qtype):
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = torch.from_numpy(adversarial_blocks(qtype, 4, seed=5).reshape(-1))
    shape = (4, bs)
    assert type_nbytes(qtype, shape) == 4 * ts
    with pytest.raises(ValueError, match=f"needs {4 * ts} bytes, got {4 * ts - 1}"):
        dequantize(raw[:-1], qtype, shape)
    with pytest.raises(ValueError, match=f"needs {4 * ts} bytes, got {3 * ts}"):
        dequantize(raw[:-ts], qtype, shape)
    with pytest.raises(ValueError, match="not a multiple of its block size"):
        dequantize(raw, qtype, (8, bs // 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=name)
def test_cuda_bit_exact(qtype):
    raw = adversarial_blocks(qtype, 4096, seed=400 + int(qtype))
    got = dequantize(torch.from_numpy(raw.reshape(-1)).cuda(), qtype, shapes_for(qtype, 4096)[1])
    assert got.is_cuda
    assert_bits_equal(got, ref_dequant(raw, qtype))


# ----------------------------------------------------------------------------- random_blocks


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=name)
def test_random_blocks_every_type(qtype):
    bs, ts = GGML_QUANT_SIZES[qtype]
    shape = (3, 5, 2 * max(bs, 256))
    for scale in (0.02, 3.0):
        g = torch.Generator().manual_seed(7)
        raw = random_blocks(qtype, shape, g, scale=scale)
        assert raw.dtype == torch.uint8 and raw.shape == (15, type_nbytes(qtype, shape[-1:]))
        w = dequantize(raw.reshape(-1), qtype, shape)
        assert torch.isfinite(w).all()
        std = float(w.double().std())
        assert scale / 1.5 < std < scale * 1.5, (qtype.name, scale, std)
        assert abs(float(w.double().mean())) < 0.5 * scale
        assert torch.equal(random_blocks(qtype, shape, torch.Generator().manual_seed(7), scale=scale), raw)
    assert not torch.equal(random_blocks(qtype, shape, torch.Generator().manual_seed(8)), raw)
    assert random_blocks(qtype, (0, bs)).shape == (0, ts)


def test_random_blocks_large_tensor_uses_every_codebook_row():
    """A DeepSeek-V3-shaped IQ1_S expert slice: valid, right std, and the indices cover the grid."""
    shape = (512, 7168)
    raw = random_blocks(T.IQ1_S, shape, torch.Generator().manual_seed(1), scale=0.01)
    w = dequantize(raw.reshape(-1), T.IQ1_S, shape)
    assert abs(float(w.std()) / 0.01 - 1) < 0.05
    blocks = raw.reshape(-1, 50)
    idx = blocks[:, 2:34].long().view(-1, 8, 4) | (((blocks[:, 34:50].clone().view(torch.int16).long() & 0xFFFF)
                                                      .unsqueeze(2) >> torch.tensor([0, 3, 6, 9])) & 7) << 8
    assert len(torch.unique(idx)) == 2048


def test_random_blocks_errors():
    with pytest.raises(UnsupportedQuantType):
        random_blocks(T.TQ1_0, (256,))
    with pytest.raises(ValueError, match="multiple"):
        random_blocks(T.IQ2_XXS, (4, 128))
    with pytest.raises(ValueError, match="scale"):
        random_blocks(T.IQ2_XXS, (256,), scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        random_blocks(T.Q4_K, (256,), scale=float("nan"))
    with pytest.raises(ValueError, match="dimension"):
        random_blocks(T.Q4_K, ())


# ----------------------------------------------------------------------------- a model in IQ types


def _write_raw_gguf(model, path: str, types: dict[str, T], seed: int) -> str:
    """The tiny Llama's GGUF (fbtest.write_gguf) whose 2-D weights are random valid blocks of the type
    `types` gives for their GGUF name (std 1.5/sqrt(row), like the model's init)."""
    g = torch.Generator().manual_seed(seed)
    return write_gguf(model, path, types.__getitem__,
                      encode=lambda name, arr, qt: random_blocks(qt, arr.shape, g, scale=1.5 / arr.shape[1] ** 0.5).numpy())


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_hf_model("llama", seed=5)


@pytest.mark.parametrize("mix", ["all", "IQ1_S", "IQ2_XXS"])
def test_tiny_llama_in_iq_types_matches_transformers(tiny_llama, tmp_path, mix):
    names = [_gguf_name(n) for n, p in tiny_llama.state_dict().items() if p.dim() == 2]
    if mix == "all":  # every IQ type, each on several kinds of tensor
        types = {n: IQ_TYPES[i % len(IQ_TYPES)] for i, n in enumerate(names)}
    else:  # one type for the linear weights (Unsloth-style), IQ4_XS embedding and head
        types = {n: T[mix] for n in names} | {"token_embd.weight": T.IQ4_XS, "output.weight": T.IQ4_XS}
    assert set(types.values()) >= (set(IQ_TYPES) if mix == "all" else {T[mix]})
    path = _write_raw_gguf(tiny_llama, str(tmp_path / f"{mix}.gguf"), types, seed=len(mix))
    reference = dequantized_reference(tiny_llama, path)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 1024) for _ in range(n)] for n in (1, 9, 40)]
    n_new = 12
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_space_gb=0.1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    compared = 0
    for p, out in zip(prompts, outs):
        compared += assert_greedy_matches(out.outputs[0].token_ids, greedy_reference(reference, p, n_new), mix)
    assert compared >= 0.8 * len(prompts) * n_new
