"""Corrupt GGUF files: every truncation, flipped byte and absurd count either loads or raises
ModelLoadError, and fails fast (no hang, no huge allocation, no other exception type)."""

from __future__ import annotations

import random
import time

import gguf
import numpy as np
import pytest

from fbtest import deadline as _deadline
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import quantize as gguf_quantize

from finback.loader.errors import ModelLoadError
from finback.loader.gguf import GGUFFile, GGUFModel

SEED = 20250125
PER_CASE_S = 3.0
TOTAL_S = 60.0


def _q4_k_bytes(rng: np.random.Generator, rows: int, blocks_per_row: int) -> np.ndarray:
    """Random Q4_K blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of scales, 128 of nibbles) with
    sane fp16 scale fields."""
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, 144), dtype=np.uint8)
    d = rng.uniform(0.001, 0.1, size=(rows * blocks_per_row, 2)).astype(np.float16)
    blocks[:, 0:4] = d.view(np.uint8).reshape(-1, 4)
    return blocks.reshape(rows, blocks_per_row * 144)


def _write_base(path) -> None:
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_string("general.name", "fuzz")
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "ab", "ü", "日本"])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1, 1])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    w.add_tensor("f32", rng.standard_normal((4, 16)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((3, 32)).astype(np.float16))
    w.add_tensor("q8_0", gguf_quantize(rng.standard_normal((2, 64)).astype(np.float32), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("q4_k", _q4_k_bytes(rng, 2, 1), raw_dtype=QT.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _int_fields(path) -> list[tuple[int, int, str]]:
    """(byte offset, size, description) of every integer field of the header (counts, lengths,
    types, dims, offsets), found with gguf-py's reader."""
    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = [(4, 4, "version"), (8, 8, "tensor count"), (16, 8, "kv count")]
    groups = [(n, f.parts) for n, f in r.fields.items() if not n.startswith("GGUF.")]
    groups += [("tensor " + t.name, t.field.parts) for t in r.tensors]
    for name, parts in groups:
        for i, p in enumerate(parts):
            if p.dtype.itemsize in (4, 8) and p.dtype.kind in "ui":
                start = p.__array_interface__["data"][0] - base
                for j in range(p.size):
                    out.append((start + j * p.dtype.itemsize, p.dtype.itemsize, f"{name} part {i}[{j}]"))
    return out




def _cases(base: bytes, data_offset: int, info_start: int, fields) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    n = len(base)
    cases: list[tuple[str, bytes]] = []
    # truncations inside each region: header, KV section, tensor infos, data
    regions = {"header": (0, 24), "kv": (24, info_start), "infos": (info_start, data_offset), "data": (data_offset, n)}
    for region, (lo, hi) in regions.items():
        for cut in sorted({lo, hi - 1, *(rng.randrange(lo, hi) for _ in range(18))}):
            cases.append((f"truncate at {cut} ({region})", base[:cut]))
    # random flips of 1-8 bytes, 3 in 4 inside the header (KV + tensor infos)
    for i in range(150):
        buf = bytearray(base)
        k = rng.randint(1, 8)
        positions = [rng.randrange(0, data_offset) if rng.random() < 0.75 else rng.randrange(0, n) for _ in range(k)]
        for pos in positions:
            buf[pos] ^= rng.randint(1, 255)
        cases.append((f"flip bytes {positions}", bytes(buf)))
    # every count/length/type/dim/offset field set to absurd values
    for off, size, what in fields:
        top = 2 ** (8 * size)
        old = int.from_bytes(base[off:off + size], "little")
        for value in (top - 1, top // 2, 2**31 - 1 if size == 8 else 2**16, n, old + 1, max(old - 1, 0)):
            buf = bytearray(base)
            buf[off:off + size] = (value % top).to_bytes(size, "little")
            cases.append((f"{what} at {off} = {value}", bytes(buf)))
    return cases


def _open_and_load(path) -> str:
    try:
        with GGUFModel(path) as model:
            for name, info in model.tensors.items():
                t = model.load(name)
                assert t.dtype == torch.float32 and tuple(t.shape) == info.shape, name
        return "ok"
    except ModelLoadError as e:
        assert e.path == str(path), e
        return "error"


def test_fuzz_corrupt_files(tmp_path):
    base_path = tmp_path / "base.gguf"
    _write_base(base_path)
    base = base_path.read_bytes()
    good = GGUFFile(base_path)
    assert list(good.tensors) == ["f32", "f16", "q8_0", "q4_k"]
    assert good.metadata["tokenizer.ggml.tokens"][-1] == "日本"
    assert _open_and_load(base_path) == "ok"
    first_info = base.index((3).to_bytes(8, "little") + b"f32")
    fields = _int_fields(base_path)
    cases = _cases(base, good.data_offset, first_info, fields)
    assert len(cases) >= 200

    path = tmp_path / "case.gguf"
    outcomes = {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    for what, data in cases:
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            with _deadline(PER_CASE_S, what):
                outcomes[_open_and_load(path)] += 1
        except Exception as e:  # anything but ModelLoadError is a bug: say which case
            pytest.fail(f"case '{what}': {type(e).__name__}: {e}")
        assert time.perf_counter() - start < PER_CASE_S, what
    elapsed = time.perf_counter() - t0
    assert elapsed < TOTAL_S, elapsed
    # the mutations must actually exercise both paths
    assert outcomes["error"] > len(cases) // 2, outcomes
    assert outcomes["ok"] > 0, outcomes
    print(f"{len(cases)} cases in {elapsed:.2f} s: {outcomes}")


def test_every_truncation_of_the_header(tmp_path):
    """Cut the file at every byte of its header: always a ModelLoadError, never anything else."""
    base_path = tmp_path / "base.gguf"
    _write_base(base_path)
    base = base_path.read_bytes()
    data_offset = GGUFFile(base_path).data_offset
    path = tmp_path / "cut.gguf"
    t0 = time.perf_counter()
    for cut in range(data_offset):
        path.write_bytes(base[:cut])
        with pytest.raises(ModelLoadError):
            GGUFModel(path)
    assert time.perf_counter() - t0 < 20
