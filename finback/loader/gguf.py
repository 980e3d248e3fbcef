"""GGUF files: a validating reader of our own (v2 and v3, little-endian), split-aware.

Every problem with a file is a `ModelLoadError` naming the file: the parser checks every count and
length against the bytes left in the file before it allocates or loops, so a corrupt or truncated
file fails fast and never reads out of bounds.

- `read_gguf_metadata(path)`: only the key/value section, as plain Python values; works on a file
  whose tensor data is cut off.
- `GGUFFile(path)`: one file, fully validated (metadata, tensor infos, data layout).
- `GGUFModel(path)`: the model behind a path, opening every shard of a split model
  (`PREFIX-00001-of-00003.gguf`); `raw(name)` and `load(name)` read tensors.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from finback.loader.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
GGUF_MAGIC_BE = b"FUGG"  # gguf-py writes the magic as a uint32 in the file's byte order
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_DEPTH = 8

_V = GGUFValueType
_STRING, _ARRAY, _BOOL = int(_V.STRING), int(_V.ARRAY), int(_V.BOOL)
# value type id -> struct format (little-endian); the numpy dtype and size follow from it.
_SCALAR_FORMATS: dict[int, str] = {
    int(_V.UINT8): "<B", int(_V.INT8): "<b", int(_V.UINT16): "<H", int(_V.INT16): "<h",
    int(_V.UINT32): "<I", int(_V.INT32): "<i", int(_V.FLOAT32): "<f", int(_V.BOOL): "<B",
    int(_V.UINT64): "<Q", int(_V.INT64): "<q", int(_V.FLOAT64): "<d",
}
_SCALAR_DTYPES: dict[int, np.dtype] = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_SCALAR_SIZES: dict[int, int] = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Parser:
    """Reads little-endian GGUF fields from a buffer, checking every length against its end."""

    def __init__(self, path: str, buf: Any, size: int):
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos} but the file has {self.size} bytes: truncated?"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def string(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise self.fail(f"unknown value type {vtype} for {what}")
        size = _SCALAR_SIZES[vtype]
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return bool(v) if vtype == _BOOL else v

    def array(self, what: str, depth: int) -> list:
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested more than {_MAX_ARRAY_DEPTH} deep")
        etype = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        remaining = self.size - self.pos
        if etype == _STRING:
            if count > remaining // 8:
                raise self.fail(f"{what}: {count} strings cannot fit in the {remaining} bytes left in the file")
            return self._string_array(count, what)
        if etype == _ARRAY:
            if count > remaining // 12:
                raise self.fail(f"{what}: {count} arrays cannot fit in the {remaining} bytes left in the file")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = _SCALAR_DTYPES.get(etype)
        if dtype is None:
            raise self.fail(f"unknown array element type {etype} for {what}")
        if count > remaining // dtype.itemsize:
            raise self.fail(
                f"{what}: {count} elements of {dtype.itemsize} bytes cannot fit in the {remaining} bytes "
                "left in the file: truncated?"
            )
        n = count * dtype.itemsize
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += n
        if etype == _BOOL:
            return (arr != 0).tolist()
        return arr.tolist()

    def _string_array(self, count: int, what: str) -> list[str]:
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for i in range(count):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"length of {what}[{i}]")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > size - pos:
                    self.pos = pos
                    self.need(n, f"{what}[{i}]")
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise self.fail(f"{what}[{len(out)}] is not valid UTF-8") from None
        self.pos = pos
        return out

    # --- file sections ---

    def header(self) -> tuple[int, int, int]:
        """Magic and version; returns (version, n_tensors, n_kv)."""
        if self.size < 4:
            raise self.fail(f"not a GGUF file: only {self.size} bytes")
        magic = bytes(self.buf[0:4])
        if magic == GGUF_MAGIC_BE:
            raise self.fail("big-endian GGUF not supported")
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r})")
        self.pos = 4
        version = self.u32("GGUF version")
        if version not in SUPPORTED_VERSIONS and version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise self.fail("big-endian GGUF not supported")
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(f"GGUF version {version} not supported (only 2 and 3)")
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata key/value count")
        return version, n_tensors, n_kv

    def metadata(self, n_kv: int) -> dict[str, Any]:
        remaining = self.size - self.pos
        if n_kv > remaining // 13:  # key length (8) + type (4) + at least one byte of value
            raise self.fail(f"{n_kv} metadata keys cannot fit in the {remaining} bytes left in the file")
        md: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}")
            if key in md:
                raise self.fail(f"duplicate metadata key {key!r}")
            vtype = self.u32(f"value type of metadata key {key!r}")
            md[key] = self.value(vtype, f"metadata value {key!r}")
        return md

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        """(name, ggml dims, type id, offset relative to the data section) per tensor."""
        remaining = self.size - self.pos
        # name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8)
        if n_tensors > remaining // 32:
            raise self.fail(f"{n_tensors} tensor infos cannot fit in the {remaining} bytes left in the file")
        infos = []
        for i in range(n_tensors):
            name = self.string(f"name of tensor #{i}")
            n_dims = self.u32(f"number of dimensions of tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1 to 4)")
            self.need(8 * n_dims, f"dimensions of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
            self.pos += 8 * n_dims
            if any(d == 0 for d in dims):
                raise self.fail(f"tensor {name!r} has a zero dimension: {list(dims)}")
            type_id = self.u32(f"type of tensor {name!r}")
            offset = self.u64(f"data offset of tensor {name!r}")
            infos.append((name, dims, type_id, offset))
        return infos


class _OpenBuffer:
    """The bytes of a file, memory-mapped read-only (an empty file is an empty bytes object)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except OSError as e:
            raise ModelLoadError(path, f"cannot open: {e.strerror or e}") from None
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            self.buf: Any = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        except (OSError, ValueError) as e:
            self._f.close()
            raise ModelLoadError(path, f"cannot map the file: {e}") from None

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            try:
                self.buf.close()
            except BufferError:  # a view is still alive somewhere; the map goes with it
                pass
        self._f.close()

    def __enter__(self) -> "_OpenBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as plain Python values (arrays are lists).

    Reads only the header, so it works on a file whose tensor data is cut off.
    Raises ModelLoadError for anything that is not a readable GGUF v2/v3 header.
    """
    path = os.fspath(path)
    with _OpenBuffer(path) as f:
        p = _Parser(path, f.buf, f.size)
        _, _, n_kv = p.header()
        return p.metadata(n_kv)


def is_gguf(path: str | os.PathLike) -> bool:
    """True if the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives: `shape` is in torch order (ggml's dims reversed), `offset` is the
    absolute byte offset of its data in `path`, `nbytes` its size there."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int
    path: str

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """One GGUF file, parsed and validated by the constructor (ModelLoadError on any problem).

    Attributes: `path`, `version`, `alignment`, `metadata` (dict of plain values), `tensors`
    (name -> GGUFTensorInfo, in file order), `data_offset` (start of the data section), `size`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with _OpenBuffer(self.path) as f:
            self.size = f.size
            p = _Parser(self.path, f.buf, f.size)
            self.version, n_tensors, n_kv = p.header()
            self.metadata: dict[str, Any] = p.metadata(n_kv)
            raw_infos = p.tensor_infos(n_tensors)
            infos_end = p.pos
        self.alignment = self._alignment()
        self.data_offset = -(-infos_end // self.alignment) * self.alignment
        if raw_infos and self.data_offset > self.size:
            raise self._fail(
                f"the data section starts at byte {self.data_offset} but the file has {self.size} bytes: truncated?"
            )
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, rel_offset in raw_infos:
            if name in self.tensors:
                raise self._fail(f"duplicate tensor name {name!r}")
            self.tensors[name] = self._tensor_info(name, dims, type_id, rel_offset)
        self._check_overlaps()

    def _fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, problem)

    def _alignment(self) -> int:
        a = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(a) is not int or a <= 0 or a & (a - 1):
            raise self._fail(f"general.alignment must be a positive power of two, got {a!r}")
        return a

    def _tensor_info(self, name: str, dims: tuple[int, ...], type_id: int, rel_offset: int) -> GGUFTensorInfo:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise self._fail(f"unknown tensor type {type_id} for tensor {name!r}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise self._fail(f"tensor type {qtype.name} of tensor {name!r} has no known block size")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise self._fail(
                f"tensor {name!r} of type {qtype.name} has rows of {dims[0]} elements, "
                f"not a multiple of the block size {block_size}"
            )
        if rel_offset % self.alignment:
            raise self._fail(
                f"tensor {name!r} has data offset {rel_offset}, not a multiple of the alignment {self.alignment}"
            )
        n_elements = 1
        for d in dims:
            n_elements *= d
        nbytes = n_elements // block_size * type_size
        start = self.data_offset + rel_offset
        end = start + nbytes
        if end > self.size:
            raise self._fail(f"tensor {name!r} needs bytes {start}..{end} but the file has {self.size} bytes: truncated?")
        return GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes, self.path)

    def _check_overlaps(self) -> None:
        prev: GGUFTensorInfo | None = None
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if prev is not None and info.offset < prev.offset + prev.nbytes:
                raise self._fail(
                    f"tensors {prev.name!r} (bytes {prev.offset}..{prev.offset + prev.nbytes}) and "
                    f"{info.name!r} (bytes {info.offset}..{info.offset + info.nbytes}) overlap"
                )
            prev = info

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, version={self.version}, {len(self.tensors)} tensors)"


_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SPLIT_NO, _SPLIT_COUNT, _SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


def shard_paths(path: str | os.PathLike) -> list[str] | None:
    """For a path named like llama.cpp's shards (`PREFIX-00002-of-00003.gguf`), the paths of all
    its shards in order; None for any other name."""
    path = os.fspath(path)
    m = _SHARD_NAME.match(os.path.basename(path))
    if m is None:
        return None
    count = int(m["count"])
    folder = os.path.dirname(path)
    return [os.path.join(folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _int_key(f: GGUFFile, key: str) -> int | None:
    v = f.metadata.get(key)
    if v is None:
        return None
    if type(v) is not int:
        raise ModelLoadError(f.path, f"{key} must be an integer, got {v!r}")
    return v


class GGUFModel:
    """The model behind a GGUF path, a single file or every shard of a split model.

    `metadata` comes from the first shard (without the `split.*` keys); `tensors` is the union of
    all shards' tensors. `raw(name)` returns a tensor's bytes, `load(name)` its dequantized values.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.path.abspath(os.fspath(path))
        first = GGUFFile(path)
        names = shard_paths(path)
        count = _int_key(first, _SPLIT_COUNT)
        if names is not None and len(names) > 1 and count is None:
            raise ModelLoadError(path, f"is named as a shard of {len(names)} but has no {_SPLIT_COUNT} metadata")
        if count is not None and count < 1:
            raise ModelLoadError(path, f"{_SPLIT_COUNT} is {count}")
        if count is not None and count > 1 and names is None:
            raise ModelLoadError(
                path, f"{_SPLIT_COUNT} is {count} but the file name is not PREFIX-00001-of-{count:05d}.gguf, "
                "so the other shards cannot be found"
            )
        if names is not None and count is not None and len(names) != count:
            raise ModelLoadError(path, f"the file name says {len(names)} shards but {_SPLIT_COUNT} is {count}")
        if names is None or len(names) == 1:
            files = [first]
        else:
            files = []
            for i, shard in enumerate(names):
                if shard == path:
                    files.append(first)
                    continue
                if not os.path.isfile(shard):
                    raise ModelLoadError(shard, f"missing shard {i + 1} of {len(names)} of the model at {path}")
                files.append(GGUFFile(shard))
        if len(files) > 1 or count is not None:
            for i, f in enumerate(files):
                no, c = _int_key(f, _SPLIT_NO), _int_key(f, _SPLIT_COUNT)
                if no != i or c != len(files):
                    raise ModelLoadError(
                        f.path, f"should be shard {i + 1} of {len(files)} but has {_SPLIT_NO}={no}, {_SPLIT_COUNT}={c}"
                    )
        self.path = files[0].path
        self.files = files
        self.metadata: dict[str, Any] = {k: v for k, v in files[0].metadata.items() if not k.startswith("split.")}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise ModelLoadError(
                        f.path, f"tensor {name!r} is also in {self.tensors[name].path}"
                    )
                self.tensors[name] = info
        total = _int_key(files[0], _SPLIT_TENSORS)
        if total is not None and len(files) > 1 and total != len(self.tensors):
            raise ModelLoadError(
                self.path, f"{_SPLIT_TENSORS} is {total} but the {len(files)} shards hold {len(self.tensors)} tensors"
            )
        self._maps: dict[str, np.memmap] | None = {}

    def _map(self, path: str) -> np.memmap:
        if self._maps is None:
            raise ValueError(f"GGUFModel({self.path!r}) is closed")
        mm = self._maps.get(path)
        if mm is None:
            try:
                mm = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise ModelLoadError(path, f"cannot map the file: {e}") from None
            if mm.shape[0] < max((t.offset + t.nbytes for t in self.tensors.values() if t.path == path), default=0):
                raise ModelLoadError(path, "the file shrank after it was opened")
            self._maps[path] = mm
        return mm

    def raw(self, name: str) -> torch.Tensor:
        """The bytes of tensor `name` as a 1-D uint8 tensor (a copy: safe to keep after close())."""
        info = self.tensors[name]
        mm = self._map(info.path)
        return torch.from_numpy(np.array(mm[info.offset:info.offset + info.nbytes], dtype=np.uint8, copy=True))

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` dequantized, of shape `tensors[name].shape`, converted to `dtype`."""
        from finback.loader.quants import UnsupportedQuantType, dequantize

        info = self.tensors[name]
        data = self.raw(name)
        try:
            out = dequantize(data, info.ggml_type, info.shape)
        except UnsupportedQuantType as e:
            raise ModelLoadError(info.path, f"tensor {name!r}: {e}") from None
        out = out.reshape(info.shape)
        return out if out.dtype == dtype else out.to(dtype)

    def close(self) -> None:
        self._maps = None

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({self.path!r}, {len(self.files)} file(s), {len(self.tensors)} tensors)"
