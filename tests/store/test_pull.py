"""Pulls against a local HTTP server that imitates Hugging Face's and ModelScope's URL layouts:
HF's tree API (paged by Link headers), model-info siblings, `resolve` redirects carrying
X-Linked-Etag to a CDN host, Range requests; ModelScope's file list and repo download URL.
The server serves files the tests made and can cut a body half-way or serve corrupt bytes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from finback.store import blobs
from finback.store.blobs import DigestMismatch
from finback.store.names import ModelNotFound
from finback.store.pull import DownloadInterrupted, pull
from finback.store.store import Store


def tiny_gguf(path, *, file_type=15, split=None, tensors=("a", "b")):
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_key_value("general.file_type", file_type, gguf.GGUFValueType.UINT32)
    if split:
        no, count, total = split
        w.add_key_value("split.no", no, gguf.GGUFValueType.UINT16)
        w.add_key_value("split.count", count, gguf.GGUFValueType.UINT16)
        w.add_key_value("split.tensors.count", total, gguf.GGUFValueType.INT32)
    for i, name in enumerate(tensors):
        w.add_tensor(f"blk.{i}.{name}.weight", np.random.default_rng(i).random((8, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open(path, "rb").read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".gguf", ".safetensors"))


class FakeHub:
    """One server, both hubs. `repos[repo][path] = bytes`."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.cut: dict[str, int] = {}  # file path -> bytes to send before dropping the connection (once)
        self.corrupt: set[str] = set()  # file paths served with one byte flipped
        self.page_size = 2
        self.tree_404 = False
        self.siblings_lfs = True  # the model info's siblings carry lfs.sha256
        self.ms_sha = True  # ModelScope lists Sha256
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                with hub.lock:
                    hub.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                try:
                    hub.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, path: str, data: bytes):
        self.repos.setdefault(repo, {})[path] = data

    def paths(self, prefix):
        return [p for p, _ in self.requests if p.startswith(prefix)]

    # --- responses ---

    def json(self, h, obj, status=200, headers=()):
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def error(self, h, status, msg="not found"):
        self.json(h, {"error": msg}, status)

    def serve_file(self, h, path, data, etag=None):
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = h.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes")
        if etag:
            h.send_header("ETag", f'"{etag}"')
        h.end_headers()
        body = data[start:]
        with self.lock:
            cut = self.cut.pop(path, None)
        if cut is not None:  # drop the connection half-way through the body
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)

    def route(self, h):
        u = urllib.parse.urlsplit(h.path)
        q = urllib.parse.parse_qs(u.query)
        parts = [urllib.parse.unquote(p) for p in u.path.strip("/").split("/")]
        # ModelScope
        if parts[:3] == ["api", "v1", "models"]:
            repo = "/".join(parts[3:5])
            files = self.repos.get(repo)
            if files is None:
                return self.error(h, 404)
            if parts[5:] == ["repo", "files"]:
                assert q.get("Revision") == ["master"] and q.get("Recursive") == ["true"]
                return self.json(h, {"Code": 200, "Success": True, "Data": {"Files": [
                    {"Name": p.rsplit("/", 1)[-1], "Path": p, "Size": len(d), "Type": "blob",
                     "Sha256": sha(d) if self.ms_sha else ""} for p, d in sorted(files.items())]}})
            if parts[5:] == ["repo"]:
                path = q["FilePath"][0]
                if path not in files:
                    return self.error(h, 404)
                return self.serve_file(h, path, files[path])
            return self.error(h, 404)
        # Hugging Face API
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            files = self.repos.get(repo)
            if files is None:
                return self.error(h, 404, "Repository not found")
            if parts[4:5] == ["tree"]:
                if self.tree_404:
                    return self.error(h, 404)
                assert parts[5] == "main" and q.get("recursive") == ["true"]
                items = []
                for p in sorted({p.rsplit("/", 1)[0] for p in files if "/" in p}):
                    items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
                for p, d in sorted(files.items()):
                    it = {"type": "file", "oid": hashlib.sha1(d).hexdigest(), "size": len(d), "path": p}
                    if is_lfs(p):
                        it["lfs"] = {"oid": sha(d), "size": len(d), "pointerSize": 134}
                    items.append(it)
                cursor = int(q.get("cursor", ["0"])[0])
                page = items[cursor:cursor + self.page_size]
                headers = []
                if cursor + self.page_size < len(items):
                    nxt = f"/api/models/{repo}/tree/main?recursive=true&cursor={cursor + self.page_size}"
                    headers.append(("Link", f'<{self.url}{nxt}>; rel="next"'))
                return self.json(h, page, headers=headers)
            if len(parts) == 4:
                sib = [{"rfilename": p, **({"lfs": {"sha256": sha(d), "size": len(d)}, "size": len(d)}
                                           if is_lfs(p) and self.siblings_lfs else {})}
                       for p, d in sorted(files.items())]
                return self.json(h, {"id": repo, "siblings": sib})
            return self.error(h, 404)
        # CDN (another host name: localhost instead of 127.0.0.1)
        if parts[0] == "cdn":
            repo, path = "/".join(parts[1:3]), "/".join(parts[3:])
            return self.serve_file(h, path, self.repos[repo][path])
        # Hugging Face resolve
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, path = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.repos.get(repo, {})
            if path not in files:
                return self.error(h, 404, "Entry not found")
            d = files[path]
            if is_lfs(path):
                h.send_response(302)
                h.send_header("Location", f"http://localhost:{self.port}/cdn/{repo}/{urllib.parse.quote(path)}")
                h.send_header("X-Linked-Etag", f'"{sha(d)}"')
                h.send_header("X-Linked-Size", str(len(d)))
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            return self.serve_file(h, path, d, etag=hashlib.sha1(d).hexdigest())  # git sha1: not a sha256
        return self.error(h, 404)


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", h.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.delenv("FINBACK_SOURCE", raising=False)
    yield h
    h.close()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


@pytest.fixture(scope="module")
def distill(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {"Q4_K_M": tiny_gguf(d / "q4.gguf", file_type=15, tensors=tuple("abcdefgh")),
            "Q8_0": tiny_gguf(d / "q8.gguf", file_type=7), "Q4_K_S": tiny_gguf(d / "q4s.gguf", file_type=14)}


REPO_1_5B = "unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF"


def add_distill(hub, distill):
    for q, data in distill.items():
        hub.add(REPO_1_5B, f"DeepSeek-R1-Distill-Qwen-1.5B-{q}.gguf", data)
    hub.add(REPO_1_5B, "README.md", b"# readme")
    hub.add(REPO_1_5B, "config.json", b"{}")


def test_full_pull_from_hf_with_progress(hub, store, distill):
    add_distill(hub, distill)
    events = []
    m = pull(store, "deepseek-r1:1.5b", lambda *a: events.append(a))
    data = distill["Q4_K_M"]
    digest = "sha256:" + sha(data)
    assert [l.digest for l in m.model_layers] == [digest]
    assert [l.media_type.rsplit(".", 1)[1] for l in m.layers] == ["model", "params", "license"]
    assert open(store.model_path("deepseek-r1:1.5b"), "rb").read() == data
    d = store.details("deepseek-r1:1.5b")
    assert (d["format"], d["family"], d["quantization_level"]) == ("gguf", "qwen2", "Q4_K_M")
    assert store.show("deepseek-r1:1.5b")["parameters"]["temperature"] == 0.6
    # Ollama's /api/pull shape
    statuses = [e[0] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    pulling = [e for e in events if e[0].startswith("pulling ") and e[0] != "pulling manifest"]
    assert pulling and all(e[0] == f"pulling {digest[7:19]}" and e[1] == digest for e in pulling)
    assert all(e[2] == len(data) for e in pulling)
    done = [e[3] for e in pulling]
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(data)
    # listing paged through Link headers; the token went to the hub but not to the CDN host
    assert len(hub.paths("/api/models/")) >= 3
    resolve = [hd for p, hd in hub.requests if "/resolve/" in p]
    cdn = [hd for p, hd in hub.requests if p.startswith("/cdn/")]
    assert resolve[0]["authorization"] == "Bearer hf_secret" and "authorization" not in cdn[0]
    # a second pull downloads nothing
    n_cdn = len(hub.paths("/cdn/"))
    pull(store, "deepseek-r1:1.5b-qwen-distill-q4_K_M")
    assert len(hub.paths("/cdn/")) == n_cdn
    assert not [f for f in os.listdir(store.blobs_dir) if not blobs.BLOB_FILE_RE.match(f)]


def test_pull_cut_half_way_then_resumed(hub, store, distill):
    add_distill(hub, distill)
    data = distill["Q4_K_M"]
    path = "DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf"
    hub.cut[path] = len(data) // 2
    with pytest.raises(DownloadInterrupted, match="pull again to resume"):
        pull(store, "deepseek-r1:1.5b", retries=0)
    partial = os.path.join(store.blobs_dir, f"sha256-{sha(data)}.partial")
    assert os.path.getsize(partial) == len(data) // 2
    assert not store.exists("deepseek-r1:1.5b") and blobs.list_blobs(store.root) == []
    n = len(hub.requests)
    events = []
    pull(store, "deepseek-r1:1.5b", lambda *a: events.append(a))
    gets = [(p, hd) for p, hd in hub.requests[n:] if p.startswith("/cdn/")]
    assert len(gets) == 1 and gets[0][1]["range"] == f"bytes={len(data) // 2}-"
    assert open(store.model_path("deepseek-r1:1.5b"), "rb").read() == data
    assert not os.path.exists(partial)
    first = next(e for e in events if e[0].startswith("pulling sha") or e[0].startswith(f"pulling {sha(data)[:12]}"))
    assert first[3] == len(data) // 2  # progress starts from what was already there


def test_broken_connection_is_retried_within_one_pull(hub, store, distill):
    add_distill(hub, distill)
    data = distill["Q4_K_M"]
    hub.cut["DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf"] = 1000
    pull(store, "deepseek-r1:1.5b", retries=2, retry_wait=0)
    ranges = [hd.get("range") for p, hd in hub.requests if p.startswith("/cdn/")]
    assert ranges == [None, "bytes=1000-"]
    assert store.has_blob("sha256:" + sha(data))


def test_hash_mismatch_installs_nothing(hub, store, distill):
    add_distill(hub, distill)
    hub.corrupt.add("DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf")
    with pytest.raises(DigestMismatch):
        pull(store, "deepseek-r1:1.5b")
    assert not store.exists("deepseek-r1:1.5b")
    assert os.listdir(store.blobs_dir) == []  # no blob, no partial, no lock


def test_split_set_from_a_folder(hub, store, tmp_path):
    from finback.loader.gguf import GGUFModel

    repo = "unsloth/DeepSeek-R1-GGUF"
    shards = []
    for folder, count in (("DeepSeek-R1-UD-IQ1_S", 3), ("DeepSeek-R1-UD-IQ1_M", 2)):
        for i in range(count):
            name = f"{folder}/{folder}-{i + 1:05d}-of-{count:05d}.gguf"
            data = tiny_gguf(tmp_path / f"s{i}.gguf", file_type=24, split=(i, count, 2 * count),
                             tensors=(f"x{i}", f"y{i}"))
            hub.add(repo, name, data)
            if folder.endswith("IQ1_S"):
                shards.append(data)
    hub.add(repo, "README.md", b"r1")
    m = pull(store, "deepseek-r1:671b-iq1_s")
    assert [l.digest for l in m.model_layers] == ["sha256:" + sha(d) for d in shards]
    path = store.model_path("deepseek-r1:671b-iq1_s")
    with GGUFModel(path) as g:
        assert len(g.files) == 3 and len(g.tensors) == 6
    assert store.details("deepseek-r1:671b-iq1_s")["quantization_level"] == "IQ1_S"
    assert not any("IQ1_M" in p for p in hub.paths("/cdn/"))


def test_modelscope_source(hub, store, distill):
    add_distill(hub, distill)
    m = pull(store, "deepseek-r1:1.5b-q8_0", source="modelscope")
    assert m.model_layers[0].digest == "sha256:" + sha(distill["Q8_0"])
    assert hub.paths(f"/api/v1/models/{REPO_1_5B}/repo/files?Revision=master&Recursive=true")
    dl = hub.paths(f"/api/v1/models/{REPO_1_5B}/repo?Revision=master&FilePath=")
    assert dl and "Q8_0" in dl[0]
    assert not hub.paths("/api/models/")


def test_hf_co_name_with_siblings_fallback(hub, store, distill):
    repo = "someone/R1-Distill-GGUF"
    for q, data in distill.items():
        hub.add(repo, f"R1-Distill-{q}.gguf", data)
    hub.tree_404 = True
    m = pull(store, "hf.co/someone/R1-Distill-GGUF:q4_k_s")
    assert m.model_layers[0].digest == "sha256:" + sha(distill["Q4_K_S"])
    assert store.exists("hf.co/someone/r1-distill-gguf:Q4_K_S")
    assert [i.name for i in store.list()] == ["hf.co/someone/R1-Distill-GGUF:q4_k_s"]
    pull(store, "hf.co/someone/R1-Distill-GGUF")  # :latest takes Q4_K_M
    assert store.get("hf.co/someone/R1-Distill-GGUF").model_layers[0].digest == "sha256:" + sha(distill["Q4_K_M"])
    with pytest.raises(ModelNotFound, match="Q2_K"):
        pull(store, "hf.co/someone/R1-Distill-GGUF:Q2_K")
    with pytest.raises(ModelNotFound):
        pull(store, "hf.co/nobody/missing:Q4_K_M")


def test_fp8_safetensors_and_files_without_hub_hash(hub, store):
    repo = "deepseek-ai/DeepSeek-R1"
    cfg = json.dumps({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}).encode()
    hub.add(repo, "config.json", cfg)
    hub.add(repo, "tokenizer.json", b'{"model": {}}')
    hub.add(repo, "modeling_deepseek.py", b"# not needed")
    for i in (1, 2):
        hdr = json.dumps({f"w{i}": {"dtype": "F8_E4M3", "shape": [16, 16], "data_offsets": [0, 256]}}).encode()
        hub.add(repo, f"model-0000{i}-of-00002.safetensors", struct.pack("<Q", len(hdr)) + hdr + os.urandom(256))
    m = pull(store, "deepseek-r1:671b-fp8")
    assert m.format == "safetensors"
    folder = store.model_path("deepseek-r1:671b-fp8")
    assert sorted(os.listdir(folder)) == ["config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "tokenizer.json"]
    assert open(os.path.join(folder, "config.json"), "rb").read() == cfg  # hash computed: the hub gave none
    d = store.details("deepseek-r1:671b-fp8")
    assert (d["format"], d["family"], d["quantization_level"], d["parameter_size"]) == (
        "safetensors", "deepseek_v3", "FP8", "512")


def test_two_concurrent_pulls_of_one_blob(hub, store, distill):
    add_distill(hub, distill)
    errors = []

    def go():
        try:
            pull(store, "deepseek-r1:1.5b")
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(hub.paths("/cdn/")) == 1  # the second waited on the lock and found the blob
    assert open(store.model_path("deepseek-r1:1.5b"), "rb").read() == distill["Q4_K_M"]


def test_embedded_model_pulls_from_its_package(store, smollm2_path):
    events = []
    m = pull(store, "smollm2:135m", lambda *a: events.append(a))
    assert open(store.model_path("smollm2:135m"), "rb").read(4) == b"GGUF"
    assert os.path.getsize(store.model_path("smollm2:135m")) == os.path.getsize(smollm2_path)
    assert m.model_layers[0].size == os.path.getsize(smollm2_path)
    assert [e[0] for e in events][-2:] == ["writing manifest", "success"]


def test_unknown_name_and_unreachable_hub(store, monkeypatch):
    from finback.store.catalog import UnknownModel
    from finback.store.pull import PullError

    with pytest.raises(UnknownModel, match="deepseek-r1:7b"):
        pull(store, "deepseek-r1:7bb")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(PullError, match="cannot reach"):
        pull(store, "deepseek-r1:7b", retries=0)


def test_hash_from_x_linked_etag_when_the_listing_has_none(hub, store, distill):
    repo = "someone/Bare-GGUF"
    hub.add(repo, "Bare-Q8_0.gguf", distill["Q8_0"])
    hub.tree_404 = True
    hub.siblings_lfs = False  # no hash, no size in the listing: only the redirect's X-Linked-Etag
    hub.corrupt.add("Bare-Q8_0.gguf")
    with pytest.raises(DigestMismatch, match=sha(distill["Q8_0"])):
        pull(store, "hf.co/someone/Bare-GGUF:Q8_0")
    assert not store.exists("hf.co/someone/Bare-GGUF:Q8_0") and blobs.list_blobs(store.root) == []
    hub.corrupt.clear()
    m = pull(store, "hf.co/someone/Bare-GGUF:Q8_0")
    assert m.model_layers[0].digest == "sha256:" + sha(distill["Q8_0"])


def test_disk_full_during_download_keeps_the_partial_for_resume(hub, store, distill, tmp_path):
    """The child pulls under RLIMIT_FSIZE = 16 KiB (SIGXFSZ ignored: write(2) fails with EFBIG as
    on a full disk); then the parent pulls again and resumes from what the child kept."""
    import subprocess
    import sys
    import textwrap

    add_distill(hub, distill)
    data = distill["Q4_K_M"]
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from finback.store.blobs import NoSpace
        from finback.store.pull import pull
        from finback.store.store import Store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            pull(Store({str(store.root)!r}), "deepseek-r1:1.5b")
        except NoSpace as e:
            print("NoSpace", e.errno)
            sys.exit(0)
        sys.exit(1)
    """)
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("NoSpace 27"), r.stdout + r.stderr
    partial = os.path.join(store.blobs_dir, f"sha256-{sha(data)}.partial")
    kept = os.path.getsize(partial)
    assert 0 < kept <= 16384 and not store.exists("deepseek-r1:1.5b")
    n = len(hub.requests)
    pull(store, "deepseek-r1:1.5b")
    assert [hd.get("range") for p, hd in hub.requests[n:] if p.startswith("/cdn/")] == [f"bytes={kept}-"]
    assert open(store.model_path("deepseek-r1:1.5b"), "rb").read() == data
