"""Content-addressed blobs: `<root>/blobs/sha256-<64 hex>`, Ollama's layout.

Every function takes the store root (the folder that holds `blobs/` and `manifests/`).

- `digest_path(root, digest)`: the only way from a digest to a path. The digest must be exactly
  `sha256:` + 64 lower-case hex digits (anything else: `InvalidDigest`), and the path, once every
  symlink is resolved, must lie inside the store's blobs folder (else `UnsafePath`): a blob that is a
  symlink pointing outside the store is refused.
- `write_blob_from_stream` / `write_blob_from_file` / `write_blob_bytes`: hash while writing into a
  temp file of the blobs folder (`.tmp-<random>`, unique per writer), fsync, then publish it
  atomically. With `expected_digest`, a mismatch raises `DigestMismatch` and nothing is published.
  Publishing uses `os.link(temp, final)`, which fails if the blob is already there: the existing
  (verified) blob is kept and the temp removed, so any number of writers of one blob, threads or
  processes, are safe and readers never see a half-written blob. (Where hard links are not
  supported, `os.replace` of identical verified content is used.)
- A full disk (ENOSPC, EDQUOT, or EFBIG from a file-size limit) raises `NoSpace` (an OSError with
  that errno); the temp file is removed and the store is unchanged. Any other failure also removes
  the temp file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid
from typing import BinaryIO, Callable, Iterable

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
BLOB_FILE_RE = re.compile(r"sha256-([0-9a-f]{64})\Z")
TEMP_PREFIX = ".tmp-"
CHUNK = 1 << 20
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


class InvalidDigest(ValueError):
    def __init__(self, digest: object, where: str | None = None):
        self.digest = digest
        super().__init__(f"invalid digest {digest!r}{' in ' + where if where else ''}: "
                         "expected 'sha256:' and 64 lower-case hex digits")


class DigestMismatch(ValueError):
    def __init__(self, expected: str, actual: str, what: str = "blob"):
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: sha256 mismatch: expected {expected}, got {actual}")


class UnsafePath(ValueError):
    """A store path that resolves (through a symlink) outside the store."""


class NoSpace(OSError):
    """The disk (or a quota, or a file-size limit) is full; nothing was left behind."""


def check_digest(digest: object, where: str | None = None) -> str:
    """`digest` itself if it is `sha256:<64 lower-case hex>`, else InvalidDigest."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidDigest(digest, where)
    return digest


def digest_hex(digest: str) -> str:
    return check_digest(digest)[7:]


def blobs_dir(root: str | os.PathLike) -> str:
    return os.path.join(os.fspath(root), "blobs")


def is_within(path: str, folder: str) -> bool:
    """True if `path`, all symlinks resolved, is `folder` (resolved) or inside it."""
    real = os.path.realpath(path)
    base = os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def digest_path(root: str | os.PathLike, digest: str) -> str:
    """The path of blob `digest` (which need not exist yet). InvalidDigest / UnsafePath."""
    hexd = digest_hex(digest)
    folder = blobs_dir(root)
    path = os.path.join(folder, f"sha256-{hexd}")
    if os.path.lexists(path) and not is_within(path, folder):
        raise UnsafePath(f"blob {digest} at {path} resolves to {os.path.realpath(path)}, outside the store")
    return path


def has_blob(root: str | os.PathLike, digest: str, size: int | None = None) -> bool:
    path = digest_path(root, digest)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return size is None or st.st_size == size


def sha256_file(path: str | os.PathLike, upto: int | None = None) -> "hashlib._Hash":
    """A sha256 object fed with the file's bytes (the first `upto` bytes if given)."""
    h = hashlib.sha256()
    left = upto
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h


def no_space_error(e: OSError, where: str) -> OSError:
    """A NoSpace for a full-disk errno, else `e` itself."""
    if isinstance(e, NoSpace) or e.errno not in _NO_SPACE_ERRNOS:
        return e
    return NoSpace(e.errno, f"no space left writing {where}: {os.strerror(e.errno)}")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(folder: str, hint: str = "") -> str:
    return os.path.join(folder, f"{TEMP_PREFIX}{hint}{uuid.uuid4().hex}")


def publish(root: str | os.PathLike, src: str, digest: str) -> str:
    """Move the verified file `src` (inside the blobs folder) to blob `digest`.

    If the blob already exists it is kept and `src` is removed. Returns the blob path."""
    dst = digest_path(root, digest)
    try:
        os.link(src, dst)
    except FileExistsError:
        pass  # another writer won: its blob is verified content with the same digest
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                           errno.ENOSYS):
            _remove(src)
            raise
        os.replace(src, dst)  # no hard links here: identical verified content, still atomic
        fsync_dir(os.path.dirname(dst))
        return dst
    _remove(src)
    fsync_dir(os.path.dirname(dst))
    return dst


def _chunks(stream: BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    read = getattr(stream, "read", None)
    if read is None:
        yield from stream  # type: ignore[misc]
        return
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return
        yield chunk


def write_blob_from_stream(root: str | os.PathLike, stream: BinaryIO | Iterable[bytes],
                           expected_digest: str | None = None, expected_size: int | None = None,
                           progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Write the bytes of `stream` (a binary file object or an iterable of bytes) as a blob.

    Returns (digest, size). DigestMismatch / ValueError (size) / NoSpace; the temp file is always
    removed on failure."""
    if expected_digest is not None:
        check_digest(expected_digest)
        if has_blob(root, expected_digest, expected_size):
            return expected_digest, os.path.getsize(digest_path(root, expected_digest))
    folder = blobs_dir(root)
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(folder)
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "xb") as f:
            for chunk in _chunks(stream):
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(size)
            f.flush()
            os.fsync(f.fileno())
        digest = "sha256:" + h.hexdigest()
        if expected_size is not None and size != expected_size:
            raise ValueError(f"blob size mismatch: expected {expected_size} bytes, got {size}")
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(expected_digest, digest)
        publish(root, tmp, digest)
        return digest, size
    except OSError as e:
        _remove(tmp)
        raise no_space_error(e, f"a blob in {folder}") from e
    except BaseException:
        _remove(tmp)
        raise


def write_blob_bytes(root: str | os.PathLike, data: bytes, expected_digest: str | None = None) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if expected_digest is not None and check_digest(expected_digest) != digest:
        raise DigestMismatch(expected_digest, digest)
    if has_blob(root, digest, len(data)):
        return digest, len(data)
    return write_blob_from_stream(root, [data], digest, len(data))


def write_blob_from_file(root: str | os.PathLike, path: str | os.PathLike, expected_digest: str | None = None,
                         link: bool = False, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy the file at `path` into the store as a blob (hashing it). Returns (digest, size).

    With `link=True` a hard link to the file is tried first (no copy; the file is still hashed);
    where that fails (another file system, no permission) the file is copied."""
    path = os.fspath(path)
    if link:
        folder = blobs_dir(root)
        os.makedirs(folder, exist_ok=True)
        tmp = temp_path(folder)
        try:
            os.link(path, tmp)
        except OSError:
            pass
        else:
            try:
                h = sha256_file(tmp)
                digest = "sha256:" + h.hexdigest()
                size = os.path.getsize(tmp)
                if expected_digest is not None and check_digest(expected_digest) != digest:
                    raise DigestMismatch(expected_digest, digest)
                publish(root, tmp, digest)
                if progress is not None:
                    progress(size)
                return digest, size
            except BaseException:
                _remove(tmp)
                raise
    with open(path, "rb") as f:
        return write_blob_from_stream(root, f, expected_digest, progress=progress)


def list_blobs(root: str | os.PathLike) -> list[str]:
    """Digests of every blob file (temp and partial files are not blobs)."""
    try:
        names = os.listdir(blobs_dir(root))
    except FileNotFoundError:
        return []
    return sorted("sha256:" + m.group(1) for m in map(BLOB_FILE_RE.match, names) if m)


def remove_blob(root: str | os.PathLike, digest: str) -> bool:
    path = os.path.join(blobs_dir(root), f"sha256-{digest_hex(digest)}")  # no realpath: unlink the entry
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
