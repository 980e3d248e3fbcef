"""The model store: Ollama's folder layout, so an Ollama models folder and ours are interchangeable.

    <root>/blobs/sha256-<hex>                      content-addressed blobs (blobs.py)
    <root>/blobs/<key>.partial, <key>.partial.lock  downloads in progress (pull.py)
    <root>/manifests/<host>/<namespace>/<model>/<tag>   one JSON manifest per name (manifest.py)
    <root>/views/<key>/                            engine-openable forms of multi-file models (ours)
    <root>/.lock                                   writers hold it shared; garbage collection exclusive

Root: `FINBACK_MODELS`, else `OLLAMA_MODELS`, else `~/.finback/models`.

Names (names.py) map to manifest paths part by part; lookup is case-insensitive (a folder whose name
differs only in case is the same model, and writing such a name overwrites it in its existing
spelling). A name typed without a host is read from `registry.finback.local`, then from Ollama's
`registry.ollama.ai`; it is written to the one where it exists, else to `registry.finback.local`.

What the engine opens (`model_path`):
- a single GGUF: the blob file itself (the engine reads GGUF by its magic, not its extension);
- a split GGUF set (several model layers): `<root>/views/<key>/model-0000i-of-0000N.gguf`, relative
  symlinks (hard links where symlinks fail) to the blobs, named as llama.cpp names shards so that
  `GGUFModel` finds them all; the path of shard 1 is returned;
- a safetensors folder (safetensors layers): `<root>/views/<key>/`, one link per layer named by its
  title (`model-00001-of-000163.safetensors`, `config.json`, ...); the folder is returned.
`<key>` is a hash of the (name, digest) pairs, so models with the same files share a view; views are
built in a temp folder and renamed into place (atomic), and checked (rebuilt if broken) on use. A
read-only store (shared on a cluster) gets its views in `~/.cache/finback/views/` instead.

Writes are atomic: a manifest is written to a temp file beside it, fsynced, then renamed; a blob as
blobs.py says. `delete` removes the manifest, then collects garbage: blobs and views no manifest
references. Garbage collection takes the store lock exclusively *without waiting*; `create` and
`pull` hold it shared from their first blob to their manifest, so a collection never removes the
blobs of a model being written (it is skipped, and the next delete or `prune()` does it). If any
manifest cannot be read, no blob is removed (its references are unknown).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from finback.store import blobs as _blobs
from finback.store.blobs import (DigestMismatch, InvalidDigest, NoSpace, UnsafePath, digest_path, fsync_dir,
                                 is_within, no_space_error, write_blob_bytes, write_blob_from_file)
from finback.store.manifest import (MEDIA_CONFIG, MEDIA_LICENSE, MEDIA_MESSAGES, MEDIA_MODEL, MEDIA_PARAMS,
                                    MEDIA_SAFETENSORS, MEDIA_SYSTEM, MEDIA_TEMPLATE, TITLE, InvalidManifest, Layer,
                                    Manifest, check_title)
from finback.store.names import (DEFAULT_HOST, READ_HOSTS, InvalidModelName, ModelName, ModelNotFound, _fold)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["Store", "ModelInfo", "ModelNotFound", "MissingBlob", "default_root", "Progress",
           "InvalidDigest", "DigestMismatch", "UnsafePath", "NoSpace", "InvalidManifest", "InvalidModelName"]

Progress = Callable[[str, str, int, int], None]  # (status, digest, total, completed)

# llama.cpp's LLAMA_FTYPE values -> the names Ollama shows as quantization_level
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}
_SIDE_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "model.safetensors.index.json", "tokenizer.model", "vocab.json",
               "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "preprocessor_config.json"}
_TEXT_LAYERS = (MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_PARAMS, MEDIA_MESSAGES, MEDIA_LICENSE)
TEMP_MAX_AGE_S = 24 * 3600


class MissingBlob(ValueError):
    """A manifest references a blob that is not in the store."""


def default_root() -> str:
    for var in ("FINBACK_MODELS", "OLLAMA_MODELS"):
        v = os.environ.get(var)
        if v:
            return os.path.abspath(os.path.expanduser(v))
    return os.path.join(os.path.expanduser("~"), ".finback", "models")


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 7615616512 -> '7.6B', 134515008 -> '134.52M'."""
    for unit, div, whole_fmt, frac_fmt in (("B", 1e9, "%.0f", "%.1f"), ("M", 1e6, "%.0f", "%.2f")):
        if n >= div:
            x = n / div
            return (whole_fmt if x == int(x) else frac_fmt) % x + unit
    if n >= 1000:
        return "%.0fK" % (n / 1000)
    return str(n)


def _size_label_ok(label: object) -> bool:
    import re

    return isinstance(label, str) and re.fullmatch(r"\d+(\.\d+)?[KMBT]", label) is not None


# ---------------------------------------------------------------- locks


class FileLock:
    """An flock on `path` (created if needed). `remove=True` unlinks the file on release, safely: a
    waiter that then locks the unlinked file notices (inode check) and retries on the new one."""

    def __init__(self, path: str, shared: bool = False, remove: bool = False):
        self.path = path
        self.shared = shared
        self.remove = remove
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if fcntl is None:
            return True
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning("file system of %s has no flock (%s): running without the lock", self.path, e)
                    return True
                raise
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # the file we locked was removed by its previous holder: lock the new one

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- details from weights


def gguf_details(path: str) -> dict[str, Any]:
    """format/family/parameter_size/quantization_level of the GGUF model at `path` (shard 1 of a split
    set, with its siblings beside it). Validates the file(s): ModelLoadError if they are not a model."""
    from finback.loader.gguf import GGUFModel

    with GGUFModel(path) as g:
        md = g.metadata
        n_params = sum(t.n_elements for t in g.tensors.values())
        types = Counter(t.ggml_type.name for t in g.tensors.values() if len(t.shape) >= 2)
        n_files = len(g.files)
    arch = md.get("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    ft = md.get("general.file_type")
    quant = FILE_TYPES.get(ft) if type(ft) is int else None
    if quant is None:
        quant = types.most_common(1)[0][0] if types else "unknown"
    label = md.get("general.size_label")
    return {
        "format": "gguf", "family": arch, "families": [arch] if arch else [],
        "parameter_size": label if _size_label_ok(label) else human_number(n_params),
        "quantization_level": quant, "parameter_count": n_params, "files": n_files,
    }


def read_safetensors_header(path: str) -> dict[str, Any]:
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{path}: safetensors header of {n} bytes is too large")
        data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        hdr = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(hdr, dict):
        raise ValueError(f"{path}: safetensors header is not an object")
    return hdr


def safetensors_details(files: dict[str, str]) -> dict[str, Any]:
    """Details of a safetensors folder given as {file name: path}."""
    cfg: dict[str, Any] = {}
    if "config.json" in files:
        with open(files["config.json"], "rb") as f:
            cfg = json.load(f)
    n_params = 0
    dtypes: Counter = Counter()
    for fname, path in files.items():
        if not fname.endswith(".safetensors"):
            continue
        for k, v in read_safetensors_header(path).items():
            if k == "__metadata__" or not isinstance(v, dict):
                continue
            n = 1
            for d in v.get("shape", []):
                n *= int(d)
            n_params += n
            dtypes[str(v.get("dtype", "?"))] += n
    family = str(cfg.get("model_type") or "")
    qcfg = cfg.get("quantization_config") or {}
    if isinstance(qcfg, dict) and qcfg.get("quant_method"):
        quant = str(qcfg["quant_method"]).upper()
    elif dtypes:
        quant = {"F8_E4M3": "FP8", "F8_E5M2": "FP8"}.get(dtypes.most_common(1)[0][0], dtypes.most_common(1)[0][0])
    else:
        quant = "unknown"
    return {"format": "safetensors", "family": family, "families": [family] if family else [],
            "parameter_size": human_number(n_params) if n_params else "", "quantization_level": quant,
            "parameter_count": n_params, "files": len(files)}


def _config_blob(details: dict[str, Any], layers: list[Layer], parent: str = "") -> bytes:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    cfg: dict[str, Any] = {
        "model_format": details.get("format", ""),
        "model_family": details.get("family", ""),
        "model_families": details.get("families", []),
        "model_type": details.get("parameter_size", ""),
        "file_type": details.get("quantization_level", ""),
        "architecture": arch,
        "os": platform.system().lower(),
        "rootfs": {"type": "layers", "diff_ids": [l.digest for l in layers]},
    }
    if details.get("parameter_count"):
        cfg["parameter_count"] = int(details["parameter_count"])
    if parent:
        cfg["parent_model"] = parent
    return json.dumps(cfg, separators=(",", ":")).encode()


# ---------------------------------------------------------------- listing


@dataclass
class ModelInfo:
    """One row of `Store.list()`: what Ollama's /api/tags reports."""

    name: str  # shortest display form, e.g. "deepseek-r1:7b"
    full_name: ModelName
    digest: str  # sha256 hex of the manifest file
    size: int  # bytes of config + layers
    modified_at: _dt.datetime
    details: dict[str, Any]
    manifest: Manifest

    @property
    def model(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.details.items() if k in
             ("parent_model", "format", "family", "families", "parameter_size", "quantization_level")}
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at.isoformat(),
                "size": self.size, "digest": self.digest, "details": d}


# ---------------------------------------------------------------- the store


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        self.manifests_dir = os.path.join(self.root, "manifests")
        self.blobs_dir = os.path.join(self.root, "blobs")
        self.views_dir = os.path.join(self.root, "views")
        self.lock_path = os.path.join(self.root, ".lock")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # --- blobs ---

    def blob_path(self, digest: str) -> str:
        return digest_path(self.root, digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        return _blobs.has_blob(self.root, digest, size)

    def _ensure_dirs(self) -> None:
        os.makedirs(self.blobs_dir, exist_ok=True)
        os.makedirs(self.manifests_dir, exist_ok=True)

    def writing(self) -> FileLock:
        """Context manager held (shared) while blobs are written that no manifest references yet."""
        self._ensure_dirs()
        return FileLock(self.lock_path, shared=True)

    # --- manifest paths ---

    def _walk(self, parts: tuple[str, ...], create: bool = False) -> str | None:
        """The path of `parts` under manifests/, matching each existing folder case-insensitively.

        With create=True, missing folders are made (in the case given) and the file path is returned
        whether the file exists or not."""
        cur = self.manifests_dir
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            cand = os.path.join(cur, part)
            if not os.path.lexists(cand):
                try:
                    entries = os.listdir(cur)
                except (FileNotFoundError, NotADirectoryError):
                    entries = []
                match = sorted(e for e in entries if _fold(e) == _fold(part) and not e.startswith("."))
                if match:
                    cand = os.path.join(cur, match[0])
                elif not create:
                    return None
                elif not last:
                    os.makedirs(cand, exist_ok=True)
            cur = cand
        if not is_within(cur, self.manifests_dir):
            raise UnsafePath(f"manifest path {cur} resolves outside {self.manifests_dir}")
        if not create and not os.path.isfile(cur):
            return None
        return cur

    def _find(self, name: ModelName) -> tuple[str, ModelName] | None:
        hosts = (name.host,) if name.host_given else READ_HOSTS
        for host in hosts:
            parts = (host, name.namespace, name.model, name.tag)
            path = self._walk(parts)
            if path is not None:
                rel = os.path.relpath(path, self.manifests_dir).split(os.sep)
                return path, ModelName(*rel, host_given=True)
        return None

    def _path_for_write(self, name: ModelName) -> str:
        found = self._find(name)
        if found is not None:
            return found[0]
        host = name.host if name.host_given else DEFAULT_HOST
        self._ensure_dirs()
        path = self._walk((host, name.namespace, name.model, name.tag), create=True)
        assert path is not None
        return path

    def _not_found(self, name: ModelName) -> ModelNotFound:
        return ModelNotFound(f"model {name.display!r} not found in {self.root}; pull it with `finback pull "
                             f"{name.display}`")

    # --- read ---

    def exists(self, name: str | ModelName) -> bool:
        return self._find(ModelName.parse(name)) is not None

    def _read(self, name: str | ModelName) -> tuple[str, bytes, Manifest, ModelName]:
        n = ModelName.parse(name)
        found = self._find(n)
        if found is None:
            raise self._not_found(n)
        path, full = found
        with open(path, "rb") as f:
            data = f.read(_MAX_READ)
        return path, data, Manifest.from_json(data, path), full

    def get(self, name: str | ModelName) -> Manifest:
        return self._read(name)[2]

    def resolve_name(self, name: str | ModelName) -> ModelName:
        """The full name (with the host and spelling found on disk) of a stored model."""
        return self._read(name)[3]

    def manifest_digest(self, name: str | ModelName) -> str:
        return hashlib.sha256(self._read(name)[1]).hexdigest()

    def _iter_manifest_paths(self) -> Iterator[tuple[str, tuple[str, str, str, str]]]:
        def subdirs(p: str) -> list[str]:
            try:
                return sorted(e for e in os.listdir(p) if not e.startswith("."))
            except (FileNotFoundError, NotADirectoryError):
                return []

        for h in subdirs(self.manifests_dir):
            for ns in subdirs(os.path.join(self.manifests_dir, h)):
                for m in subdirs(os.path.join(self.manifests_dir, h, ns)):
                    folder = os.path.join(self.manifests_dir, h, ns, m)
                    for t in subdirs(folder):
                        p = os.path.join(folder, t)
                        if os.path.isfile(p):
                            yield p, (h, ns, m, t)

    def list(self) -> list[ModelInfo]:
        """Every stored model, newest first (as `ollama list`). Unreadable manifests are skipped with a
        warning."""
        out: list[ModelInfo] = []
        shown: set[str] = set()
        for path, parts in self._iter_manifest_paths():
            try:
                name = ModelName(*parts, host_given=True)
                ModelName.parse(str(name))  # validate what is on disk
                with open(path, "rb") as f:
                    data = f.read(_MAX_READ)
                m = Manifest.from_json(data, path)
                st = os.stat(path)
                details = self._details(m)
            except (InvalidModelName, ValueError, OSError) as e:
                log.warning("skipping manifest %s: %s", path, e)
                continue
            display = name.display
            if _fold(display) in shown:
                display = str(name)
            shown.add(_fold(display))
            out.append(ModelInfo(display, name, hashlib.sha256(data).hexdigest(), m.total_size,
                                 _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).astimezone(),
                                 details, m))
        out.sort(key=lambda i: i.modified_at, reverse=True)
        return out

    # --- write ---

    def put(self, name: str | ModelName, manifest: Manifest) -> str:
        """Write `manifest` under `name` atomically. Every blob it references must be in the store
        (MissingBlob). Returns the manifest's digest (hex)."""
        n = ModelName.parse(name)
        with self.writing():  # no garbage collection between the blob check and the write
            return self._put(n, manifest)

    def _put(self, n: ModelName, manifest: Manifest) -> str:
        for l in [manifest.config, *manifest.layers]:
            if not self.has_blob(l.digest, l.size):
                raise MissingBlob(f"cannot write {n.display!r}: blob {l.digest} ({l.size} bytes) is not in the store")
        data = manifest.to_json()
        path = self._path_for_write(n)
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            raise no_space_error(e, f"manifest {path}") from e
        except BaseException:
            _unlink(tmp)
            raise
        fsync_dir(folder)
        return hashlib.sha256(data).hexdigest()

    def copy(self, src: str | ModelName, dst: str | ModelName) -> None:
        """Make `dst` name the same model as `src` (the manifest is copied; blobs are shared)."""
        m = self.get(src)
        self.put(dst, m)

    def delete(self, name: str | ModelName, prune: bool = True) -> None:
        n = ModelName.parse(name)
        found = self._find(n)
        if found is None:
            raise self._not_found(n)
        path = found[0]
        os.unlink(path)
        folder = os.path.dirname(path)
        while folder != self.manifests_dir and is_within(folder, self.manifests_dir):
            try:
                os.rmdir(folder)
            except OSError:
                break
            folder = os.path.dirname(folder)
        if prune:
            self.prune()

    def prune(self, partials: bool = False) -> dict[str, int] | None:
        """Remove blobs and views no manifest references, and stale temp files (older than a day; with
        `partials=True` also every unfinished download). Returns counts, or None when skipped because
        a create/pull is in progress or some manifest is unreadable."""
        if not os.path.isdir(self.root):
            return {"blobs": 0, "views": 0, "temp": 0}
        lock = FileLock(self.lock_path)
        if not lock.acquire(blocking=False):
            log.info("store %s is being written; garbage collection skipped", self.root)
            return None
        try:
            keep: set[str] = set()
            view_keys: set[str] = set()
            for path, _ in self._iter_manifest_paths():
                try:
                    with open(path, "rb") as f:
                        m = Manifest.from_json(f.read(_MAX_READ), path)
                except (ValueError, OSError) as e:
                    log.warning("not collecting garbage: manifest %s is unreadable (%s)", path, e)
                    return None
                keep |= m.digests()
                k = self._view_entries(m)
                if k is not None:
                    view_keys.add(_view_key(k))
            removed = {"blobs": 0, "views": 0, "temp": 0}
            for d in _blobs.list_blobs(self.root):
                if d not in keep and _blobs.remove_blob(self.root, d):
                    removed["blobs"] += 1
            now = _now()
            try:
                entries = os.listdir(self.blobs_dir)
            except FileNotFoundError:
                entries = []
            for e in entries:
                p = os.path.join(self.blobs_dir, e)
                stale_temp = e.startswith(_blobs.TEMP_PREFIX) and now - _mtime(p) > TEMP_MAX_AGE_S
                partial = partials and (e.endswith(".partial") or e.endswith(".partial.lock"))
                if stale_temp or partial:
                    _unlink(p)
                    removed["temp"] += 1
            try:
                views = os.listdir(self.views_dir)
            except FileNotFoundError:
                views = []
            for v in views:
                if v.startswith(".") and now - _mtime(os.path.join(self.views_dir, v)) <= TEMP_MAX_AGE_S:
                    continue
                if v not in view_keys:
                    shutil.rmtree(os.path.join(self.views_dir, v), ignore_errors=True)
                    removed["views"] += 1
            return removed
        finally:
            lock.release()

    # --- create ---

    def create(self, name: str | ModelName, from_: str | os.PathLike | ModelName, *, template: str | None = None,
               system: str | None = None, params: dict[str, Any] | None = None,
               messages: list[dict[str, Any]] | None = None, license: str | list[str] | None = None,
               link: bool = False, progress: Progress | None = None) -> Manifest:
        """Create model `name`, as Ollama's `create` does with a Modelfile.

        `from_` is a GGUF file (a shard of a split set brings every shard), a safetensors folder, or
        the name of a stored model (its layers are reused). `template`, `system`, `params`,
        `messages`, `license` replace the base model's layers of that kind (`params` is merged over
        the base's, key by key). Files are hashed and copied into the blobs (`link=True`: hard-linked
        where possible). Returns the manifest written."""
        n = ModelName.parse(name)
        report = progress or (lambda *a: None)
        report("parsing model", "", 0, 0)
        with self.writing():
            base_layers, details, parent = self._import_base(from_, link, report)
            by_type = {mt: [l for l in base_layers if l.media_type == mt] for mt in _TEXT_LAYERS}
            weights = [l for l in base_layers if l.media_type not in _TEXT_LAYERS]

            def text_layer(media: str, data: bytes) -> Layer:
                digest, size = write_blob_bytes(self.root, data)
                report(f"creating new layer {digest}", digest, size, size)
                return Layer(media, digest, size)

            if template is not None:
                by_type[MEDIA_TEMPLATE] = [text_layer(MEDIA_TEMPLATE, _text(template, "template"))]
            if system is not None:
                by_type[MEDIA_SYSTEM] = [text_layer(MEDIA_SYSTEM, _text(system, "system"))]
            if params is not None:
                merged = {}
                if by_type[MEDIA_PARAMS]:
                    merged = self._read_json_blob(by_type[MEDIA_PARAMS][0].digest, dict) or {}
                merged.update(_check_params(params))
                by_type[MEDIA_PARAMS] = [text_layer(MEDIA_PARAMS, json.dumps(merged).encode())]
            if messages is not None:
                by_type[MEDIA_MESSAGES] = [text_layer(MEDIA_MESSAGES, json.dumps(_check_messages(messages)).encode())]
            if license is not None:
                texts = [license] if isinstance(license, str) else list(license)
                by_type[MEDIA_LICENSE] = [text_layer(MEDIA_LICENSE, _text(t, "license")) for t in texts]
            layers = weights + [l for mt in _TEXT_LAYERS for l in by_type[mt]]
            manifest = self._assemble(layers, details, parent)
            report("writing manifest", "", 0, 0)
            self.put(n, manifest)
        report("success", "", 0, 0)
        return manifest

    def _assemble(self, layers: list[Layer], details: dict[str, Any], parent: str = "") -> Manifest:
        cfg = _config_blob(details, layers, parent)
        digest, size = write_blob_bytes(self.root, cfg)
        return Manifest(Layer(MEDIA_CONFIG, digest, size), list(layers))

    def _import_base(self, from_: Any, link: bool, report: Progress) -> tuple[list[Layer], dict[str, Any], str]:
        if isinstance(from_, os.PathLike) or (isinstance(from_, str) and os.path.exists(from_)):
            path = os.path.abspath(os.fspath(from_))
            if os.path.isdir(path):
                return self._import_safetensors(path, link, report)
            return self._import_gguf(path, link, report)
        if isinstance(from_, str) and (os.sep in from_ or from_.lower().endswith((".gguf", ".safetensors"))):
            if not from_.lower().startswith(("hf.co/", "huggingface.co/", "modelscope.cn/")):
                raise FileNotFoundError(f"{from_}: no such file or folder")
        _, _, m, full = self._read(ModelName.parse(from_))
        for l in [m.config, *m.layers]:
            report(f"using existing layer {l.digest}", l.digest, l.size, l.size)
        details = self._details(m)
        return list(m.layers), details, full.display

    def _import_file(self, path: str, link: bool, report: Progress) -> tuple[str, int]:
        total = os.path.getsize(path)
        status = f"copying file {os.path.basename(path)}"
        report(status, "", total, 0)
        tick = Throttle()
        digest, size = write_blob_from_file(
            self.root, path, link=link,
            progress=lambda done: tick(done >= total) and report(status, "", total, done))
        report(f"copying file {digest}", digest, size, size)
        return digest, size

    def _import_gguf(self, path: str, link: bool, report: Progress) -> tuple[list[Layer], dict[str, Any], str]:
        from finback.loader.gguf import GGUFModel, is_gguf

        if not is_gguf(path):
            raise ValueError(f"{path}: not a GGUF file (and not a safetensors folder)")
        details = gguf_details(path)  # validates the file, or every shard of a split set
        with GGUFModel(path) as g:
            files = [f.path for f in g.files]
        layers = []
        for f in files:
            digest, size = self._import_file(f, link, report)
            layers.append(Layer(MEDIA_MODEL, digest, size))
        return layers, details, ""

    def _import_safetensors(self, folder: str, link: bool,
                            report: Progress) -> tuple[list[Layer], dict[str, Any], str]:
        files = {}
        for e in sorted(os.listdir(folder)):
            p = os.path.join(folder, e)
            if not os.path.isfile(p) or e.startswith("."):
                continue
            if e.endswith(".safetensors") or e in _SIDE_FILES:
                files[check_title(e)] = p
        if not any(f.endswith(".safetensors") for f in files) or "config.json" not in files:
            raise ValueError(f"{folder}: not a model folder (needs config.json and *.safetensors)")
        details = safetensors_details(files)
        layers = []
        for title, p in files.items():
            digest, size = self._import_file(p, link, report)
            layers.append(Layer(MEDIA_SAFETENSORS, digest, size, annotations={TITLE: title}))
        return layers, details, ""

    # --- what the engine opens ---

    def model_path(self, name: str | ModelName) -> str:
        """A path the engine can open for stored model `name` (see the module docstring)."""
        m = self.get(name)
        return self._weights_path(m, name)

    def _weights_path(self, m: Manifest, name: Any = "") -> str:
        entries = self._view_entries(m)
        if m.format is None:
            raise ModelNotFound(f"model {str(name)!r} has no weights (no model or safetensors layer)")
        for l in (m.model_layers or m.layers_of(MEDIA_SAFETENSORS)):
            if not self.has_blob(l.digest, l.size):
                raise MissingBlob(f"model {str(name)!r}: blob {l.digest} is missing or truncated; pull it again")
        if entries is None:  # a single GGUF file
            return self.blob_path(m.model_layers[0].digest)
        folder = self._ensure_view(entries)
        if m.format == "gguf":
            return os.path.join(folder, entries[0][0])
        return folder

    @staticmethod
    def _view_entries(m: Manifest) -> list[tuple[str, str]] | None:
        """[(file name, digest)] of the view a manifest needs, None if it needs none."""
        ml = m.model_layers
        if len(ml) > 1:
            return [(f"model-{i + 1:05d}-of-{len(ml):05d}.gguf", l.digest) for i, l in enumerate(ml)]
        if not ml:
            st = m.layers_of(MEDIA_SAFETENSORS)
            if st:
                return [(l.title or "", l.digest) for l in st]
        return None

    def _ensure_view(self, entries: list[tuple[str, str]]) -> str:
        try:
            return self._build_view(self.views_dir, entries)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a read-only store (shared on a cluster): build the links in the user's cache instead
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            return self._build_view(os.path.join(cache, "finback", "views"), entries)

    def _build_view(self, views_dir: str, entries: list[tuple[str, str]]) -> str:
        key = _view_key(entries)
        final = os.path.join(views_dir, key)
        if self._view_ok(final, entries):
            return final
        os.makedirs(views_dir, exist_ok=True)
        tmp = os.path.join(views_dir, f".tmp-{uuid.uuid4().hex}")
        os.mkdir(tmp)
        try:
            for fname, digest in entries:
                check_title(fname)
                target = self.blob_path(digest)
                dst = os.path.join(tmp, fname)
                try:
                    os.symlink(os.path.relpath(target, final), dst)
                except OSError:
                    os.link(target, dst)
            for _ in range(3):
                try:
                    os.rename(tmp, final)
                    return final
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    if self._view_ok(final, entries):  # another process built it meanwhile
                        return final
                    shutil.rmtree(final, ignore_errors=True)
            raise OSError(f"cannot create view {final}")
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _view_ok(self, folder: str, entries: list[tuple[str, str]]) -> bool:
        try:
            present = set(os.listdir(folder))
        except OSError:
            return False
        if present != {f for f, _ in entries}:
            return False
        for fname, digest in entries:
            p = os.path.join(folder, fname)
            blob = self.blob_path(digest)
            try:
                if not os.path.samefile(p, blob):
                    return False
            except OSError:
                return False
        return True

    # --- details / show ---

    def _read_json_blob(self, digest: str, kind: type) -> Any:
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                v = json.loads(f.read(_MAX_READ))
        except (OSError, ValueError):
            return None
        return v if isinstance(v, kind) else None

    def _read_text_blob(self, digest: str) -> str:
        with open(self.blob_path(digest), "rb") as f:
            return f.read(_MAX_READ).decode("utf-8", errors="replace")

    def _details(self, m: Manifest) -> dict[str, Any]:
        cfg = self._read_json_blob(m.config.digest, dict) or {}
        d = {
            "parent_model": str(cfg.get("parent_model", "")),
            "format": str(cfg.get("model_format") or m.format or ""),
            "family": str(cfg.get("model_family", "")),
            "families": [str(x) for x in cfg.get("model_families") or []] or None,
            "parameter_size": str(cfg.get("model_type", "")),
            "quantization_level": str(cfg.get("file_type", "")),
        }
        if cfg.get("parameter_count"):
            d["parameter_count"] = cfg["parameter_count"]
        return d

    def details(self, name: str | ModelName) -> dict[str, Any]:
        """Ollama's `details`: parent_model, format, family, families, parameter_size,
        quantization_level (from the config blob; read from the weights if the config lacks them)."""
        m = self.get(name)
        d = self._details(m)
        if m.format and (not d["family"] or not d["quantization_level"]):
            try:
                fresh = self.weights_details(m)
            except (ValueError, OSError) as e:
                log.warning("cannot read the weights of %s: %s", name, e)
                fresh = {}
            for k, v in fresh.items():
                if not d.get(k):
                    d[k] = v
        return d

    def weights_details(self, m: Manifest) -> dict[str, Any]:
        path = self._weights_path(m)
        if m.format == "gguf":
            return gguf_details(path)
        files = {e: os.path.join(path, e) for e in os.listdir(path)}
        return safetensors_details(files)

    def show(self, name: str | ModelName, verbose: bool = False) -> dict[str, Any]:
        """What Ollama's /api/show reports: template, system, parameters (dict), messages, license
        (list), details, model_info (GGUF metadata / config.json; long arrays only with verbose)."""
        path, data, m, full = self._read(name)
        out: dict[str, Any] = {"name": full.display, "digest": hashlib.sha256(data).hexdigest(),
                               "modified_at": _dt.datetime.fromtimestamp(os.stat(path).st_mtime,
                                                                         _dt.timezone.utc).astimezone(),
                               "details": self.details(full)}
        t = m.first(MEDIA_TEMPLATE)
        s = m.first(MEDIA_SYSTEM)
        p = m.first(MEDIA_PARAMS)
        msg = m.first(MEDIA_MESSAGES)
        out["template"] = self._read_text_blob(t.digest) if t else ""
        out["system"] = self._read_text_blob(s.digest) if s else ""
        out["parameters"] = (self._read_json_blob(p.digest, dict) or {}) if p else {}
        out["messages"] = (self._read_json_blob(msg.digest, list) or []) if msg else []
        out["license"] = [self._read_text_blob(l.digest) for l in m.layers_of(MEDIA_LICENSE)]
        info: dict[str, Any] = {}
        try:
            wpath = self._weights_path(m, name)
            if m.format == "gguf":
                from finback.loader.gguf import read_gguf_metadata

                md = read_gguf_metadata(wpath)
                info = {k: (v if verbose or not isinstance(v, list) or len(v) <= 16 else None)
                        for k, v in md.items()}
            elif m.format == "safetensors":
                cfgp = os.path.join(wpath, "config.json")
                if os.path.isfile(cfgp):
                    with open(cfgp, "rb") as f:
                        info = json.load(f)
        except (ValueError, OSError) as e:
            info = {"error": str(e)}
        out["model_info"] = info
        return out


_MAX_READ = 64 << 20


class Throttle:
    """`tick(force)` is True at most every `every` seconds (and always when forced)."""

    def __init__(self, every: float = 0.1):
        import time

        self._clock = time.monotonic
        self.every = every
        self.last = -1e9

    def __call__(self, force: bool = False) -> bool:
        now = self._clock()
        if force or now - self.last >= self.every:
            self.last = now
            return True
        return False


def _view_key(entries: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for fname, digest in entries:
        h.update(f"{fname}\t{digest}\n".encode())
    return h.hexdigest()[:32]


def _text(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise TypeError(f"{what} must be a string")
    return v.encode("utf-8")


def _check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise TypeError("params must be a dict with string keys")
    json.dumps(params)  # must be JSON
    return dict(params)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise TypeError("messages must be a list of {role, content}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise TypeError(f"messages[{i}] must be {{'role': str, 'content': str}}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _mtime(p: str) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return _now()


def _now() -> float:
    import time

    return time.time()
