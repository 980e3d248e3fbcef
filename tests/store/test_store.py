"""The model store: names, digests, blobs (atomic, concurrent, disk full), manifests, create/list/
show/copy/delete/GC, engine-openable paths for single and split GGUF and safetensors folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from finback.store import blobs
from finback.store.blobs import DigestMismatch, InvalidDigest, NoSpace, UnsafePath
from finback.store.manifest import (MEDIA_CONFIG, MEDIA_MODEL, MEDIA_SAFETENSORS, InvalidManifest, Layer,
                                    Manifest)
from finback.store.names import InvalidModelName, ModelName, ModelNotFound
from finback.store.store import MissingBlob, Store, human_number

HEX = "ab" * 32


# ---------------------------------------------------------------- helpers


def tiny_gguf(path, *, file_type=15, size_label=None, split=None, tensors=("a", "b"), arch="llama"):
    """A small valid GGUF; `split=(no, count, total_tensors)` writes llama.cpp's split keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_key_value("general.file_type", file_type, gguf.GGUFValueType.UINT32)
    if size_label:
        w.add_key_value("general.size_label", size_label, gguf.GGUFValueType.STRING)
    if split:
        no, count, total = split
        w.add_key_value("split.no", no, gguf.GGUFValueType.UINT16)
        w.add_key_value("split.count", count, gguf.GGUFValueType.UINT16)
        w.add_key_value("split.tensors.count", total, gguf.GGUFValueType.INT32)
    for i, name in enumerate(tensors):
        w.add_tensor(f"blk.{i}.{name}.weight", np.full((4, 32), i + 1, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def split_set(folder, prefix="x", count=3):
    paths = []
    for i in range(count):
        p = os.path.join(folder, f"{prefix}-{i + 1:05d}-of-{count:05d}.gguf")
        tiny_gguf(p, split=(i, count, 2 * count), tensors=(f"s{i}a", f"s{i}b"))
        paths.append(p)
    return paths


def files_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


@pytest.fixture
def gguf_file(tmp_path):
    return tiny_gguf(tmp_path / "tiny.gguf")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("text,parts", [
    ("deepseek-r1", ("registry.finback.local", "library", "deepseek-r1", "latest")),
    ("deepseek-r1:7b", ("registry.finback.local", "library", "deepseek-r1", "7b")),
    ("team/model:v1.2", ("registry.finback.local", "team", "model", "v1.2")),
    ("hf.co/unsloth/DeepSeek-R1-GGUF:UD-IQ1_S", ("hf.co", "unsloth", "DeepSeek-R1-GGUF", "UD-IQ1_S")),
    ("localhost:8080/a/b:c", ("localhost:8080", "a", "b", "c")),
    ("https://hf.co/bartowski/x-GGUF", ("hf.co", "bartowski", "x-GGUF", "latest")),
    ("_x", ("registry.finback.local", "library", "_x", "latest")),
])
def test_valid_names(text, parts):
    assert ModelName.parse(text).parts == parts


@pytest.mark.parametrize("text", [
    "", "../x", "/abs", "/abs/path:tag", "a/../../b", "a/..", "..", ".", ".hidden", "-x", "a//b", "a/", "/",
    "a:", ":tag", "a:b:c", "a/b/c/d", "a b", "a\\b", "x:..", "x:.t", "ns/a..b", "a@sha256:" + HEX, "ä",
    "x" * 129, "n" * 81 + "/m", "a:" + "t" * 129, "a/b:c/d", "host:port:1/a/b", "a\n", "\x00",
])
def test_invalid_names(text):
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


def test_names_compare_case_insensitively_and_display_short():
    a = ModelName.parse("DeepSeek-R1:7B")
    assert a == ModelName.parse("deepseek-r1:7b") == "registry.finback.local/library/deepseek-r1:7b"
    assert hash(a) == hash(ModelName.parse("deepseek-r1:7b"))
    assert a.display == "DeepSeek-R1:7B"  # case kept
    assert ModelName.parse("registry.ollama.ai/library/x").display == "x:latest"
    assert ModelName.parse("hf.co/o/r:Q4_K_M").display == "hf.co/o/r:Q4_K_M"
    assert ModelName.parse("team/m").display == "team/m:latest"
    assert human_number(7_615_616_512) == "7.6B" and human_number(134_515_008) == "134.52M"


# ---------------------------------------------------------------- digests and blob paths


BAD_DIGESTS = ["sha256:" + HEX.upper(), "sha256:" + HEX[:-1], "sha256:" + HEX + "0", "sha256-" + HEX,
               "md5:" + HEX, HEX, "sha256:" + HEX + "\n", "sha256:../../etc/passwd", "sha256:" + "g" * 64,
               "", None, 5, "sha256:" + HEX[:32] + "/" + HEX[33:]]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_malformed_digests_rejected_everywhere(store, bad):
    with pytest.raises(InvalidDigest):
        blobs.digest_path(store.root, bad)
    with pytest.raises(InvalidDigest):
        store.has_blob(bad)
    if bad is not None:  # None means "no expected digest"
        with pytest.raises(InvalidDigest):
            blobs.write_blob_bytes(store.root, b"x", expected_digest=bad)
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": MEDIA_CONFIG, "digest": "sha256:" + HEX, "size": 1},
           "layers": [{"mediaType": MEDIA_MODEL, "digest": bad, "size": 1}]}
    with pytest.raises(InvalidDigest):
        Manifest.from_json(json.dumps(doc))


def test_bad_manifest_on_disk_is_rejected_and_blocks_gc(store, gguf_file):
    store.create("good", gguf_file)
    n_blobs = len(blobs.list_blobs(store.root))
    folder = os.path.join(store.manifests_dir, "registry.finback.local", "library", "evil")
    os.makedirs(folder)
    good = json.loads(open(os.path.join(store.manifests_dir, "registry.finback.local", "library", "good",
                                        "latest")).read())
    good["layers"][0]["digest"] = "sha256:" + "A" * 64
    with open(os.path.join(folder, "latest"), "w") as f:
        json.dump(good, f)
    with pytest.raises(InvalidDigest):
        store.get("evil")
    with pytest.raises(InvalidDigest):
        store.model_path("evil")
    assert [i.name for i in store.list()] == ["good:latest"]  # skipped, not fatal
    store.delete("good")  # GC must not run: the bad manifest's references are unknown
    assert len(blobs.list_blobs(store.root)) == n_blobs
    for bad in ({"schemaVersion": 1}, [], "x", {"schemaVersion": 2, "config": {}, "layers": []}):
        with open(os.path.join(folder, "latest"), "w") as f:
            json.dump(bad, f)
        with pytest.raises((InvalidManifest, InvalidDigest)):
            store.get("evil")
    os.unlink(os.path.join(folder, "latest"))
    assert store.prune() is not None
    assert blobs.list_blobs(store.root) == []


def test_symlink_out_of_the_store_is_rejected(store, tmp_path, gguf_file):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    digest = "sha256:" + hashlib.sha256(b"secret").hexdigest()
    os.makedirs(store.blobs_dir)
    os.symlink(outside, os.path.join(store.blobs_dir, "sha256-" + digest[7:]))
    with pytest.raises(UnsafePath):
        blobs.digest_path(store.root, digest)
    with pytest.raises(UnsafePath):
        store.has_blob(digest)
    # a symlink inside the store is fine, and so is a blobs folder that is itself a link elsewhere
    os.unlink(os.path.join(store.blobs_dir, "sha256-" + digest[7:]))
    real = tmp_path / "bigdisk"
    os.rename(store.blobs_dir, real)
    os.symlink(real, store.blobs_dir)
    d, _ = blobs.write_blob_bytes(store.root, b"secret")
    assert d == digest and store.has_blob(digest)
    # a manifest folder linked out of the store is refused too
    store.create("m", gguf_file)
    ns = os.path.join(store.manifests_dir, "registry.finback.local", "evilns")
    ext = tmp_path / "ext" / "x"
    ext.mkdir(parents=True)
    (ext / "latest").write_bytes(open(os.path.join(store.manifests_dir, "registry.finback.local", "library",
                                                   "m", "latest"), "rb").read())
    os.symlink(tmp_path / "ext", ns)
    with pytest.raises(UnsafePath):
        store.get("evilns/x")


# ---------------------------------------------------------------- blob writes


def test_write_blob_verifies_and_cleans_up(store, tmp_path):
    data = os.urandom(3 << 20)
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(DigestMismatch):
        blobs.write_blob_from_stream(store.root, [data], expected_digest="sha256:" + HEX)
    assert files_in(store.blobs_dir) == []

    def broken():
        yield data[:1000]
        raise ConnectionError("cut")

    with pytest.raises(ConnectionError):
        blobs.write_blob_from_stream(store.root, broken())
    assert files_in(store.blobs_dir) == []
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert blobs.write_blob_from_file(store.root, src, expected_digest=good) == (good, len(data))
    assert blobs.write_blob_from_file(store.root, src, link=True) == (good, len(data))
    assert files_in(store.blobs_dir) == ["sha256-" + good[7:]]
    assert open(blobs.digest_path(store.root, good), "rb").read() == data


def test_concurrent_writers_of_one_blob(store):
    data = os.urandom(2 << 20)
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    results, errors = [], []
    start = threading.Barrier(8)

    def writer():
        try:
            start.wait()
            results.append(blobs.write_blob_from_stream(store.root, iter(chunks)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert results == [(digest, len(data))] * 8
    assert files_in(store.blobs_dir) == ["sha256-" + digest[7:]]  # one blob, no temp files left


def test_disk_full_is_a_clean_error(store, tmp_path):
    """A real write failure: the child process runs under RLIMIT_FSIZE = 1 MiB (SIGXFSZ ignored, so
    write(2) fails with EFBIG exactly as a full disk fails with ENOSPC)."""
    kept, _ = blobs.write_blob_bytes(store.root, b"already here")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(4 << 20))
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from finback.store import blobs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            blobs.write_blob_from_file({str(store.root)!r}, {str(src)!r})
        except blobs.NoSpace as e:
            print("NoSpace", e.errno, e)
            sys.exit(0)
        print("no error")
        sys.exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("NoSpace 27") and "no space left" in r.stdout
    assert files_in(store.blobs_dir) == ["sha256-" + kept[7:]]  # temp removed, store unchanged
    assert issubclass(NoSpace, OSError)


# ---------------------------------------------------------------- manifests and the store


def test_create_from_gguf_list_show_copy_delete_gc(store, gguf_file):
    events = []
    m = store.create("Tiny:1", gguf_file, template="{{ .Prompt }}", system="be brief",
                     params={"temperature": 0.5, "stop": ["<x>"]}, messages=[{"role": "user", "content": "hi"}],
                     license="MIT", progress=lambda *a: events.append(a))
    assert events[0][0] == "parsing model" and events[-1][0] == "success"
    assert [e[0] for e in events[-2:]] == ["writing manifest", "success"]
    assert [l.media_type.rsplit(".", 1)[1] for l in m.layers] == ["model", "template", "system", "params",
                                                                  "messages", "license"]
    path = store.model_path("tiny:1")
    assert path == store.blob_path(m.model_layers[0].digest)
    assert open(path, "rb").read() == open(gguf_file, "rb").read()
    d = store.details("TINY:1")
    assert d["format"] == "gguf" and d["family"] == "llama" and d["quantization_level"] == "Q4_K_M"
    assert d["parameter_size"] == human_number(2 * 4 * 32) == "256"  # no size_label: counted from tensors
    info = store.list()
    assert [i.name for i in info] == ["Tiny:1"]
    raw = open(os.path.join(store.manifests_dir, "registry.finback.local", "library", "Tiny", "1"), "rb").read()
    assert info[0].digest == hashlib.sha256(raw).hexdigest() == store.manifest_digest("tiny:1")
    assert info[0].size == m.total_size and info[0].to_dict()["details"]["quantization_level"] == "Q4_K_M"
    show = store.show("tiny:1")
    assert show["system"] == "be brief" and show["template"] == "{{ .Prompt }}"
    assert show["parameters"] == {"temperature": 0.5, "stop": ["<x>"]} and show["license"] == ["MIT"]
    assert show["messages"] == [{"role": "user", "content": "hi"}]
    assert show["model_info"]["general.architecture"] == "llama"

    # derived model: inherits layers, merges params, records its parent
    m2 = store.create("derived", "tiny:1", params={"top_k": 4}, system="other")
    assert store.show("derived")["parameters"] == {"temperature": 0.5, "stop": ["<x>"], "top_k": 4}
    assert store.details("derived")["parent_model"] == "Tiny:1"
    assert m2.model_layers == m.model_layers
    store.copy("derived", "team/copy:v2")
    assert store.get("team/copy:v2").to_json() == m2.to_json()

    all_blobs = set(blobs.list_blobs(store.root))
    store.delete("tiny:1")
    assert set(blobs.list_blobs(store.root)) < all_blobs  # the old system/params blobs went
    assert store.has_blob(m.model_layers[0].digest)  # still used by derived and the copy
    with pytest.raises(ModelNotFound):
        store.get("tiny:1")
    store.delete("derived")
    store.delete("Team/Copy:V2")
    assert blobs.list_blobs(store.root) == [] and store.list() == []
    assert files_in(store.manifests_dir) == []  # empty folders pruned


def test_put_is_atomic_and_checks_blobs(store, gguf_file):
    m = store.create("a", gguf_file)
    ghost = Manifest(m.config, [Layer(MEDIA_MODEL, "sha256:" + HEX, 5)])
    with pytest.raises(MissingBlob):
        store.put("b", ghost)
    assert not store.exists("b")
    variants = [store.create(f"v{i}", gguf_file, system="s" * i) for i in range(4)]
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            try:
                store.get("target")
            except ModelNotFound:
                pass
            except Exception as e:  # a torn read would show up here
                bad.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for _ in range(10):
        for v in variants:
            store.put("target", v)
    stop.set()
    for t in readers:
        t.join()
    assert not bad
    folder = os.path.join(store.manifests_dir, "registry.finback.local", "library", "target")
    assert files_in(folder) == ["latest"]  # no temp files left


def test_case_insensitive_lookup_and_ollama_host(store, gguf_file):
    store.create("MixedCase:Tag", gguf_file)
    assert store.exists("mixedcase:tag") and store.exists("MIXEDCASE:TAG")
    store.create("mixedcase:TAG", gguf_file, system="x")  # same model: overwritten in its spelling
    assert [i.name for i in store.list()] == ["MixedCase:Tag"]
    assert store.show("mixedcase:tag")["system"] == "x"
    # a model that Ollama pulled (registry.ollama.ai) is found by its short name
    store.copy("mixedcase:tag", "registry.ollama.ai/library/fromollama:7b")
    assert store.resolve_name("fromollama:7b").host == "registry.ollama.ai"
    assert store.model_path("fromollama:7b") == store.model_path("mixedcase:tag")
    for bad in ("../x", "/abs", "a/../../b"):
        with pytest.raises(InvalidModelName):
            store.get(bad)
        with pytest.raises(InvalidModelName):
            store.create(bad, gguf_file)


def test_create_from_split_set_gives_engine_openable_view(store, tmp_path):
    from finback.loader.gguf import GGUFModel

    src = tmp_path / "split"
    src.mkdir()
    paths = split_set(src, "DeepSeek-R1-UD-IQ1_S", 3)
    m = store.create("r1:split", paths[1])  # any shard brings the whole set, in order
    assert len(m.model_layers) == 3
    assert [l.digest for l in m.model_layers] == [
        "sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    path = store.model_path("r1:split")
    assert os.path.basename(path) == "model-00001-of-00003.gguf"
    assert is_inside(path, store.views_dir)
    assert sorted(os.listdir(os.path.dirname(path))) == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFModel(path) as g:
        assert len(g.files) == 3 and len(g.tensors) == 6
        assert float(g.load("blk.1.s2b.weight")[0, 0]) == 2.0
    assert store.details("r1:split")["parameter_size"] == human_number(6 * 128)
    # a broken view is rebuilt; after delete the view is collected
    os.unlink(os.path.join(os.path.dirname(path), "model-00002-of-00003.gguf"))
    assert store.model_path("r1:split") == path and os.path.exists(path.replace("00001-of", "00002-of"))
    store.delete("r1:split")
    assert files_in(store.views_dir) == [] and blobs.list_blobs(store.root) == []


def is_inside(path, folder):
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def test_create_from_safetensors_folder(store, tmp_path):
    import struct

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes.md").write_text("ignored")
    for i in (1, 2):
        hdr = json.dumps({"w": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]}}).encode()
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(64))
    m = store.create("st-model", str(folder))
    assert m.format == "safetensors"
    assert sorted(l.title for l in m.layers_of(MEDIA_SAFETENSORS)) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]
    path = store.model_path("st-model")
    assert os.path.isdir(path) and sorted(os.listdir(path)) == sorted(l.title for l in m.layers)
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "qwen2"
    d = store.details("st-model")
    assert (d["format"], d["family"], d["quantization_level"], d["parameter_size"]) == ("safetensors", "qwen2",
                                                                                       "BF16", "64")


def test_gc_waits_for_writers(store, gguf_file):
    store.create("a", gguf_file)
    with store.writing():  # a pull or create in progress elsewhere
        store.delete("a")
        assert blobs.list_blobs(store.root)  # collection skipped, nothing removed under the writer
    assert store.prune() == {"blobs": 2, "views": 0, "temp": 0}


def test_create_from_the_embedded_model(store, smollm2_path):
    store.create("smol", smollm2_path, link=True)
    d = store.details("smol")
    assert (d["family"], d["parameter_size"], d["quantization_level"]) == ("llama", "135M", "Q4_1")
    assert open(store.model_path("smol"), "rb").read(4) == b"GGUF"
    with pytest.raises(ModelNotFound):
        store.create("x", "not-there:7b")
    with pytest.raises(FileNotFoundError):
        store.create("x", "./missing.gguf")
