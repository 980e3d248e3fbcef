"""Bad checkpoints: every truncated or corrupt safetensors file, bad config.json, checkpoint that
disagrees with its config, inconsistent GGUF and wrong path is exactly one ModelLoadError that
names the file and the problem -- from open_checkpoint and from finback.LLM alike, fast, without a
huge allocation, never another exception type. Sharded safetensors folders load the same weights
and give the same greedy output as the single file."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import shutil
import struct
import time

import gguf
import numpy as np
import pytest

from fbtest import deadline as _deadline
import torch
from safetensors.torch import load_file, save_file

from fbtest import _HF_TO_GGUF, save_safetensors, tiny_hf_model, write_gguf

from finback import LLM, SamplingParams
from finback.loader.checkpoint import open_checkpoint
from finback.loader.errors import ModelLoadError

SEED = 20250607
PER_CASE_S = 5.0
FUZZ_CASES = 150
FUZZ_TOTAL_S = 30.0
ST = "model.safetensors"
INDEX = "model.safetensors.index.json"


# -- helpers ---------------------------------------------------------------------------------



def _llm(path):
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", num_kv_blocks=32, block_size=16)


def _check_error(err: BaseException, file, words) -> None:
    """One ModelLoadError, not wrapped or chained, whose str is '<file>: <problem>' and whose
    problem mentions every word."""
    file = os.fspath(file)
    assert type(err) is ModelLoadError, f"{type(err).__name__}: {err}"
    assert err.path == file, f"names {err.path!r}, expected {file!r}: {err}"
    assert str(err) == f"{file}: {err.problem}"
    assert not err.problem.startswith(file), f"path given twice: {err}"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
        f"chained to {err.__context__!r}"
    for w in words:
        assert w.lower() in err.problem.lower(), f"{w!r} not in {err.problem!r}"


def _expect(path, file, *words, via_llm: bool = True) -> ModelLoadError:
    """open_checkpoint(path) and LLM(path) both raise one ModelLoadError naming `file` and `words`."""
    with _deadline(PER_CASE_S, f"open_checkpoint({path})"):
        with pytest.raises(Exception) as info:
            open_checkpoint(path)
    _check_error(info.value, file, words)
    if via_llm:
        with _deadline(PER_CASE_S, f"LLM({path})"):
            with pytest.raises(Exception) as info2:
                _llm(path)
        _check_error(info2.value, file, words)
        assert str(info2.value) == str(info.value)
    return info.value


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Qwen2 model (vocab 128) saved as one model.safetensors + config.json."""
    model = tiny_hf_model("qwen2", seed=3, vocab=128)
    root = tmp_path_factory.mktemp("checkpoints")
    folder = save_safetensors(model, str(root / "single"))
    with open(os.path.join(folder, ST), "rb") as f:
        blob = f.read()
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return {"model": model, "root": root, "folder": folder, "blob": blob, "config": config,
            "counter": iter(range(10 ** 6))}


def _variant(base, st: bytes | None = None, config=None) -> str:
    """A new folder like the base one, with model.safetensors (None: the base one) and config.json
    (a dict or raw bytes; None: the base one; False: none) replaced."""
    folder = os.path.join(base["root"], f"v{next(base['counter'])}")
    os.makedirs(folder)
    if st is None:
        os.link(os.path.join(base["folder"], ST), os.path.join(folder, ST))
    else:
        with open(os.path.join(folder, ST), "wb") as f:
            f.write(st)
    config = base["config"] if config is None else config
    if config is not False:
        with open(os.path.join(folder, "config.json"), "wb") as f:
            f.write(config if isinstance(config, bytes) else json.dumps(config).encode())
    return folder


_DROP = object()


def _cfg(base, **changes):
    cfg = copy.deepcopy(base["config"])
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg



# -- the good paths ----------------------------------------------------------------------------

def test_base_loads(base):
    ckpt = open_checkpoint(base["folder"])
    assert ckpt.config.hidden_size == 256 and len(ckpt.entries) == len(base["model"].state_dict())
    out = _llm(base["folder"]).generate({"prompt_token_ids": [5, 6, 7]},
                                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_sharded_folder_matches_single_file(base):
    folder = os.path.join(base["root"], "sharded")
    base["model"].save_pretrained(folder, safe_serialization=True, max_shard_size="1MB")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and os.path.isfile(os.path.join(folder, INDEX))
    ckpt = open_checkpoint(folder)
    assert len({e.file for e in ckpt.entries}) == len(shards)
    single, sharded = _llm(base["folder"]), _llm(folder)
    a = single.engine.runner.model.state_dict()
    b = sharded.engine.runner.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rng = random.Random(SEED)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 128) for _ in range(n)]} for n in (1, 7, 20)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in sharded.generate(prompts, params)]
    ref = [o.outputs[0].token_ids for o in single.generate(prompts, params)]
    assert ours == ref and all(len(t) == 12 for t in ours)
    assert len({tuple(t) for t in ours}) > 1


# -- safetensors files -------------------------------------------------------------------------

def test_truncated_safetensors(base):
    blob = base["blob"]
    n = struct.unpack("<Q", blob[:8])[0]
    data = len(blob) - 8 - n
    cuts = [0, 1, 4, 7,                                   # inside the 8-byte length
            8, 9, 8 + n // 3, 8 + n // 2, 8 + n - 1,      # inside the JSON header
            8 + n, 8 + n + 1, 8 + n + data // 3, 8 + n + data // 2, len(blob) - 4, len(blob) - 1]
    for cut in cuts:
        folder = _variant(base, st=blob[:cut])
        _expect(folder, os.path.join(folder, ST), "truncated")


def _tensor(header, suffix):
    return next(k for k in header if k.endswith(suffix))


def _header_cases():
    """(id, function(header dict, data, raw header bytes) -> file bytes, words)"""
    def edit(fn):
        def make(h, d, raw):
            h = copy.deepcopy(h)
            fn(h, d)
            return _join(h, d)
        return make

    def set_(suffix, key, value):
        return edit(lambda h, d: h[_tensor(h, suffix)].__setitem__(key, value))

    def overlap(h, d):  # k_proj and v_proj weights have the same size: point v at k's bytes
        k, v = _tensor(h, "layers.0.self_attn.k_proj.weight"), _tensor(h, "layers.0.self_attn.v_proj.weight")
        h[v]["data_offsets"] = list(h[k]["data_offsets"])

    def past_end(h, d):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 8, e + 8]

    def same_size(raw, new):
        return new + b" " * (len(raw) - len(new))

    return [
        ("length-past-eof", lambda h, d, raw: struct.pack("<Q", len(raw) + len(d) + 1) + raw + d, ["claims"]),
        ("length-2^63", lambda h, d, raw: struct.pack("<Q", 1 << 63) + raw + d, ["claims"]),
        ("not-json", lambda h, d, raw: _join(same_size(raw, b"this is not json"), d), ["not valid JSON"]),
        ("not-utf8", lambda h, d, raw: _join(b"\xff\xfe" + raw[2:], d), ["not valid JSON"]),
        ("json-array", lambda h, d, raw: _join(same_size(raw, b"[1, 2, 3]"), d), ["not a JSON object"]),
        ("json-string", lambda h, d, raw: _join(same_size(raw, b'"hello"'), d), ["not a JSON object"]),
        ("json-nan", lambda h, d, raw: _join(raw.replace(b'"pt"', b'NaN', 1), d), ["not valid JSON"]),
        ("deep-nesting", lambda h, d, raw: _join(b"[" * 200_000 + b"]" * 200_000, d), ["not valid JSON"]),
        ("duplicate-key", lambda h, d, raw: _join(raw.rstrip()[:-1] + b', "__metadata__": {}}', d), ["twice"]),
        ("metadata-not-strings", edit(lambda h, d: h.__setitem__("__metadata__", {"format": 1})), ["__metadata__"]),
        ("offsets-past-data", edit(past_end), ["data section"]),
        ("offsets-reversed", set_("model.norm.weight", "data_offsets", [8, 4]), ["needs bytes 8..4"]),
        ("offsets-vs-shape", set_("model.norm.weight", "shape", [255]), ["does not fit"]),
        ("offsets-vs-dtype", set_("model.norm.weight", "dtype", "F16"), ["does not fit"]),
        ("unsupported-dtype-I32", set_("model.norm.weight", "dtype", "I32"), ["dtype", "I32"]),
        ("unsupported-dtype-F8", set_("model.norm.weight", "dtype", "F8_E4M3"), ["dtype", "F8_E4M3"]),
        ("unknown-dtype", set_("model.norm.weight", "dtype", "Q4_K"), ["dtype", "Q4_K"]),
        ("overlapping-tensors", edit(overlap), ["overlap"]),
        ("gap", edit(lambda h, d: h.pop(_tensor(h, "layers.0.self_attn.v_proj.weight"))), ["no tensor"]),
        ("bytes-appended", lambda h, d, raw: _join(raw, d + b"\0" * 16), ["appended"]),
        ("float-shape", set_("model.norm.weight", "shape", [256.0]), ["malformed"]),
        ("negative-dim", set_("model.norm.weight", "shape", [-256]), ["malformed"]),
        ("string-offsets", set_("model.norm.weight", "data_offsets", ["0", "1024"]), ["malformed"]),
        ("three-offsets", set_("model.norm.weight", "data_offsets", [0, 1, 2]), ["malformed"]),
        ("entry-not-object", edit(lambda h, d: h.__setitem__(_tensor(h, "model.norm.weight"), "F32")), ["malformed"]),
        ("no-dtype", edit(lambda h, d: h[_tensor(h, "model.norm.weight")].pop("dtype")), ["malformed"]),
        ("huge-shape", set_("model.norm.weight", "shape", [1 << 40, 1 << 40, 1 << 40]), ["does not fit"]),
    ]


@pytest.mark.parametrize("case", _header_cases(), ids=lambda c: c[0])
def test_bad_safetensors_header(base, case):
    _, make, words = case
    header, data = _split(base["blob"])
    n = struct.unpack("<Q", base["blob"][:8])[0]
    raw = base["blob"][8:8 + n]
    folder = _variant(base, st=make(header, data, raw))
    _expect(folder, os.path.join(folder, ST), *words)


def test_header_length_past_format_limit(base):
    folder = _variant(base, st=b"")
    path = os.path.join(folder, ST)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{}")
        f.truncate(8 + 100_000_001)  # sparse
    _expect(folder, path, "limit")


def test_header_checked_before_tensor_data(base, tmp_path):
    """A header that describes 4 GiB of data (a sparse file: nothing on disk) for a tensor the
    config does not want fails at open, at once, without reading or allocating that data."""
    header, _ = _split(base["blob"])
    name = _tensor(header, "embed_tokens.weight")
    rows = 1 << 22
    # rebuild the layout with the embedding grown to [4M, 256] fp32 (4 GiB), placed last
    entries = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    out, offset, chunks = {"__metadata__": header.get("__metadata__", {})}, 0, []
    data = _split(base["blob"])[1]
    for k in entries:
        if k == name:
            continue
        b, e = header[k]["data_offsets"]
        out[k] = dict(header[k], data_offsets=[offset, offset + e - b])
        chunks.append(data[b:e])
        offset += e - b
    out[name] = {"dtype": "F32", "shape": [rows, 256], "data_offsets": [offset, offset + rows * 256 * 4]}
    folder = _variant(base, st=b"")
    path = os.path.join(folder, ST)
    with open(path, "wb") as f:
        f.write(_join(out, b"".join(chunks)))
        f.truncate(f.tell() + rows * 256 * 4)  # sparse
    assert os.path.getsize(path) > 4 << 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _expect(folder, path, "embed_tokens", "shape", "config.json")
    assert time.perf_counter() - t0 < 2 * PER_CASE_S
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mib < 512, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_safetensors_header_fuzz(base):
    """Random byte flips in the 8-byte length and the JSON header: each case either loads or is one
    ModelLoadError naming the file (or, for a renamed tensor, the folder) raised when the checkpoint
    is opened, before any tensor data is read, and the same from LLM; none hangs."""
    rng = random.Random(SEED)
    blob = base["blob"]
    n = struct.unpack("<Q", blob[:8])[0]
    folder = _variant(base, st=blob)
    path = os.path.join(folder, ST)
    outcomes = {"loaded": 0, "error": 0, "kinds": set()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for case in range(FUZZ_CASES):
        mutated = bytearray(blob[:8 + n])
        for _ in range(rng.choice((1, 1, 2, 3))):
            pos = rng.randrange(8 + n) if rng.random() < 0.9 else rng.randrange(8)
            if rng.random() < 0.5:
                mutated[pos] ^= rng.randrange(1, 256)  # any flip: mostly breaks UTF-8 or JSON
            else:  # a flip that keeps the header printable JSON-ish text, to reach the structural checks
                mutated[pos] = rng.choice(b'0123456789"{}[],:-.eE FBIU_ax')
        with open(path, "wb") as f:
            f.write(bytes(mutated) + blob[8 + n:])
        try:
            with _deadline(PER_CASE_S, f"fuzz case {case}"):
                try:
                    open_checkpoint(folder).close()
                except ModelLoadError as err:
                    _check_error(err, err.path, [])
                    assert err.path in (path, folder), f"case {case}: {err}"
                    with pytest.raises(ModelLoadError) as info:  # LLM says the same
                        _llm(folder)
                    assert str(info.value) == str(err)
                    outcomes["error"] += 1
                    outcomes["kinds"].add(" ".join(w for w in err.problem.split()[:4] if w[0] not in "'0123456789"))
                else:  # what passes validation at open must load: no error surfaces later
                    _llm(folder)
                    outcomes["loaded"] += 1
        except Exception as err:  # anything else is a bug: say which case
            raise AssertionError(f"fuzz case {case}: {type(err).__name__}: {err}") from err
    elapsed = time.perf_counter() - t0
    assert elapsed < FUZZ_TOTAL_S, f"{FUZZ_CASES} cases took {elapsed:.1f} s"
    assert outcomes["error"] >= FUZZ_CASES // 2 and len(outcomes["kinds"]) >= 5, outcomes
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mib < 512, f"peak RSS grew by {grown_mib:.0f} MiB"


# -- config.json --------------------------------------------------------------------------------

_CONFIG_CASES = [
    ("not-json", b"{\"hidden_size\": 256,", ["not valid JSON"]),
    ("not-utf8", b"\xff\xfe{}", ["not valid JSON"]),
    ("empty", b"", ["not valid JSON"]),
    ("json-list", b"[1, 2]", ["not a JSON object"]),
    ("no-vocab_size", {"vocab_size": _DROP}, ["lacks", "vocab_size"]),
    ("no-hidden_size", {"hidden_size": _DROP}, ["lacks", "hidden_size"]),
    ("no-num_hidden_layers", {"num_hidden_layers": _DROP}, ["lacks", "num_hidden_layers"]),
    ("null-intermediate_size", {"intermediate_size": None}, ["lacks", "intermediate_size"]),
    ("hidden_size-big", {"hidden_size": "big"}, ["hidden_size", "integer", "'big'"]),
    ("hidden_size-float", {"hidden_size": 256.5}, ["hidden_size", "integer"]),
    ("layers-bool", {"num_hidden_layers": True}, ["num_hidden_layers", "integer"]),
    ("heads-list", {"num_attention_heads": [4]}, ["num_attention_heads", "integer"]),
    ("eps-string", {"rms_norm_eps": "tiny"}, ["rms_norm_eps", "number"]),
    ("tie-string", {"tie_word_embeddings": "no"}, ["tie_word_embeddings", "true or false"]),
    ("hidden_size-0", {"hidden_size": 0}, ["hidden_size", "at least 1"]),
    ("heads-0", {"num_attention_heads": 0}, ["num_attention_heads", "at least 1"]),
    ("kv-heads-0", {"num_key_value_heads": 0}, ["num_key_value_heads", "at least 1"]),
    ("intermediate-negative", {"intermediate_size": -512}, ["intermediate_size", "at least 1"]),
    ("vocab-negative", {"vocab_size": -1}, ["vocab_size"]),
    ("eps-negative", {"rms_norm_eps": -1e-6}, ["rms_norm_eps", "positive"]),
    ("kv-heads-not-dividing", {"num_key_value_heads": 3}, ["num_attention_heads 4", "num_key_value_heads 3"]),
    ("hidden-not-dividing", {"hidden_size": 250}, ["hidden_size 250", "num_attention_heads 4"]),
    ("head_dim-odd", {"head_dim": 63}, ["head_dim 63", "even"]),
    ("unsupported-arch", {"architectures": ["BertModel"], "model_type": "bert"},
     ["unsupported architecture", "BertModel"]),
    ("unsupported-model_type", {"architectures": _DROP, "model_type": "gpt2"}, ["unsupported architecture", "gpt2"]),
    ("no-arch-at-all", {"architectures": _DROP, "model_type": _DROP}, ["unsupported architecture"]),
    ("architectures-int", {"architectures": 5}, ["architectures"]),
    ("architectures-nested", {"architectures": [["Qwen2ForCausalLM"]]}, ["architectures"]),
    ("model_type-list", {"architectures": _DROP, "model_type": ["qwen2"]}, ["model_type"]),
    ("hidden_act-gelu", {"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ("rope-yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     ["rope scaling", "yarn"]),
    ("rope-llama3-incomplete", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     ["llama3", "low_freq_factor"]),
    ("rope-not-object", {"rope_parameters": [1]}, ["rope_parameters"]),
    ("rope-theta-0", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, ["rope_theta", "positive"]),
    ("eos-string", {"eos_token_id": "</s>"}, ["eos_token_id"]),
    # sizes that would be a huge allocation are refused before anything is built
    ("vocab-2^40", {"vocab_size": 1 << 40}, ["vocab_size", "limit"]),
    ("hidden-2^30", {"hidden_size": 1 << 30}, ["hidden_size", "limit"]),
    ("max-positions-10^12", {"max_position_embeddings": 10 ** 12}, ["max_position_embeddings", "limit"]),
    ("rotary-tables-too-big", {"max_position_embeddings": 1 << 22, "head_dim": 1024, "num_key_value_heads": 1,
                               "num_attention_heads": 1}, ["rotary", "GiB"]),
]


@pytest.mark.parametrize("case", _CONFIG_CASES, ids=lambda c: c[0])
def test_bad_config(base, case):
    _, change, words = case
    config = change if isinstance(change, bytes) else _cfg(base, **change)
    folder = _variant(base, config=config)
    _expect(folder, os.path.join(folder, "config.json"), *words)


def test_config_missing_or_not_a_file(base):
    folder = _variant(base, config=False)
    _expect(folder, os.path.join(folder, "config.json"), "not found")
    os.mkdir(os.path.join(folder, "config.json"))
    _expect(folder, os.path.join(folder, "config.json"), "folder")


# -- checkpoint vs config ------------------------------------------------------------------------

def _state(base) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(os.path.join(base["folder"], ST)).items()}


def _st_bytes(tensors: dict[str, torch.Tensor], tmp_path) -> bytes:
    path = os.path.join(tmp_path, "scratch.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        return f.read()


def test_config_hidden_differs_from_weights(base):
    folder = _variant(base, config=_cfg(base, hidden_size=128))  # weights are 256 wide
    _expect(folder, os.path.join(folder, ST), "shape", "(128, 256)", "config.json")


def test_config_vocab_differs_from_weights(base):
    folder = _variant(base, config=_cfg(base, vocab_size=256))
    _expect(folder, os.path.join(folder, ST), "shape", "(128, 256)", "config.json")


def test_config_more_layers_than_weights(base):
    folder = _variant(base, config=_cfg(base, num_hidden_layers=3))
    _expect(folder, folder, "lacks", "model.layers.2.", "num_hidden_layers = 3", "tensors for 2 layer")


def test_config_fewer_layers_than_weights(base):
    folder = _variant(base, config=_cfg(base, num_hidden_layers=1))
    _expect(folder, os.path.join(folder, ST), "unexpected tensor", "model.layers.1.", "num_hidden_layers = 1")


def test_missing_tensor(base, tmp_path):
    state = _state(base)
    del state["model.layers.1.self_attn.k_proj.weight"]
    folder = _variant(base, st=_st_bytes(state, tmp_path))
    _expect(folder, folder, "lacks 1 tensor", "model.layers.1.self_attn.k_proj.weight")


def test_unexpected_tensor(base, tmp_path):
    state = _state(base)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    folder = _variant(base, st=_st_bytes(state, tmp_path))
    _expect(folder, os.path.join(folder, ST), "unexpected tensor", "model.layers.0.self_attn.q_norm.weight")


def test_tensor_wrong_shape(base, tmp_path):
    state = _state(base)
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(256, 256)
    folder = _variant(base, st=_st_bytes(state, tmp_path))
    _expect(folder, os.path.join(folder, ST), "model.layers.1.mlp.down_proj.weight", "(256, 256)")


@pytest.fixture(scope="module")
def sharded(base):
    folder = os.path.join(base["root"], "sharded-src")
    base["model"].save_pretrained(folder, safe_serialization=True, max_shard_size="1MB")
    with open(os.path.join(folder, INDEX)) as f:
        index = json.load(f)
    return folder, index


def _copy(src, base) -> str:
    folder = os.path.join(base["root"], f"v{next(base['counter'])}")
    shutil.copytree(src, folder)
    return folder


def test_index_lists_missing_shard(base, sharded):
    folder = _copy(sharded[0], base)
    shard = sorted(set(sharded[1]["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, shard))
    _expect(folder, os.path.join(folder, shard), "missing", INDEX)


def test_corrupt_shard_is_named(base, sharded):
    folder = _copy(sharded[0], base)
    shard = sorted(set(sharded[1]["weight_map"].values()))[1]
    path = os.path.join(folder, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _expect(folder, path, "truncated")


def _index_cases():
    def wm(fn):
        def make(index):
            index = copy.deepcopy(index)
            fn(index["weight_map"])
            return json.dumps(index).encode()
        return make

    def wrong_shard(m):
        name = "model.norm.weight"
        m[name] = next(s for s in sorted(set(m.values())) if s != m[name])

    return [
        ("not-json", lambda i: b'{"weight_map": {', ["not valid JSON"]),
        ("not-utf8", lambda i: b"\xff" * 10, ["not valid JSON"]),
        ("list", lambda i: b"[]", ["not a JSON object"]),
        ("no-weight_map", lambda i: b'{"metadata": {}}', ["weight_map"]),
        ("weight_map-list", lambda i: json.dumps({"weight_map": list(i["weight_map"])}).encode(), ["weight_map"]),
        ("weight_map-empty", lambda i: b'{"weight_map": {}}', ["empty"]),
        ("shard-not-string", wm(lambda m: m.__setitem__("model.norm.weight", 7)), ["model.norm.weight", "shard"]),
        ("shard-escapes-folder", wm(lambda m: m.__setitem__("model.norm.weight", "../../etc/passwd")), ["shard"]),
        ("shard-absolute", wm(lambda m: m.__setitem__("model.norm.weight", "/etc/passwd")), ["shard"]),
        ("tensor-in-wrong-shard", wm(wrong_shard), ["model.norm.weight", "does not hold it"]),
        ("tensor-not-anywhere", wm(lambda m: m.__setitem__("model.extra.weight", sorted(m.values())[0])),
         ["model.extra.weight", "does not hold it"]),
    ]


@pytest.mark.parametrize("case", _index_cases(), ids=lambda c: c[0])
def test_bad_index(base, sharded, case):
    _, make, words = case
    folder = _copy(sharded[0], base)
    with open(os.path.join(folder, INDEX), "wb") as f:
        f.write(make(sharded[1]))
    _expect(folder, os.path.join(folder, INDEX), *words)


def test_tensor_in_two_shards(base, sharded, tmp_path):
    folder = _copy(sharded[0], base)
    shards = sorted(set(sharded[1]["weight_map"].values()))
    first = load_file(os.path.join(folder, shards[0]))
    last_path = os.path.join(folder, shards[-1])
    last = load_file(last_path)
    name = sorted(first)[0]
    last[name] = first[name]
    save_file(last, last_path, metadata={"format": "pt"})
    _expect(folder, last_path, name, "also in")


# -- GGUF ------------------------------------------------------------------------------------

def _gguf_tensors(model) -> dict[str, np.ndarray]:
    out = {}
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            p = name.split(".")
            g = f"blk.{p[2]}.{_HF_TO_GGUF['.'.join(p[3:-1])]}.{p[-1]}"
        out[g] = arr
    return out


def _write_raw_gguf(path, arch: str, meta: dict, tensors: dict[str, np.ndarray]) -> str:
    """A GGUF with exactly these metadata keys (under `arch.`) and F32 tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        key = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


_QWEN2_META = {"block_count": 2, "context_length": 1024, "embedding_length": 256, "feed_forward_length": 512,
               "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
               "attention.layer_norm_rms_epsilon": 1e-6}


def test_gguf_valid_loads(base, tmp_path):
    path = write_gguf(base["model"], str(tmp_path / "ok.gguf"), "F16")
    assert open_checkpoint(path).config.num_hidden_layers == 2
    _llm(path)
    raw = _write_raw_gguf(tmp_path / "raw.gguf", "qwen2", _QWEN2_META, _gguf_tensors(base["model"]))
    assert open_checkpoint(raw).config.hidden_size == 256


def test_gguf_block_count_larger_than_tensors(base, tmp_path):
    model = copy.deepcopy(base["model"])
    model.config.num_hidden_layers = 3
    path = write_gguf(model, str(tmp_path / "blocks.gguf"), "F16")
    _expect(path, path, "lacks", "blk.2.", "qwen2.block_count = 3", "tensors for 2 layer")


def test_gguf_block_count_smaller_than_tensors(base, tmp_path):
    path = _write_raw_gguf(tmp_path / "blocks1.gguf", "qwen2", dict(_QWEN2_META, block_count=1),
                           _gguf_tensors(base["model"]))
    _expect(path, path, "unexpected tensor", "blk.1.", "qwen2.block_count = 1")


def test_gguf_embedding_length_mismatch(base, tmp_path):
    model = copy.deepcopy(base["model"])
    model.config.hidden_size = 128
    path = write_gguf(model, str(tmp_path / "embd.gguf"), "F16")
    _expect(path, path, "token_embd.weight", "shape", "GGUF metadata")


def test_gguf_unsupported_architecture(base, tmp_path):
    tensors = {"token_embd.weight": np.zeros((128, 64), np.float32)}
    path = _write_raw_gguf(tmp_path / "bert.gguf", "bert", {"block_count": 1, "embedding_length": 64}, tensors)
    _expect(path, path, "unsupported GGUF architecture", "bert")


@pytest.mark.parametrize("extra", ["blk.0.attn_q_norm.weight", "token_types.weight", "blk.0.ffn_gate_exps.weight"])
def test_gguf_unexpected_tensor(base, tmp_path, extra):
    tensors = _gguf_tensors(base["model"])
    tensors[extra] = np.ones(64, np.float32)
    path = _write_raw_gguf(tmp_path / "extra.gguf", "qwen2", _QWEN2_META, tensors)
    _expect(path, path, "unexpected tensor", extra)


@pytest.mark.parametrize("meta,words", [
    ({"block_count": _DROP}, ["lacks", "qwen2.block_count"]),
    ({"embedding_length": "big"}, ["qwen2.embedding_length", "integer"]),
    ({"attention.head_count": 0}, ["qwen2.attention.head_count", "at least 1"]),
    ({"attention.head_count_kv": 3}, ["num_key_value_heads 3"]),
    ({"embedding_length": 250}, ["embedding_length 250", "head_count 4"]),
    ({"context_length": 1 << 30}, ["max_position_embeddings", "limit"]),
    ({"rope.freq_base": -1.0}, ["rope.freq_base", "positive"]),
], ids=["no-block_count", "embedding_length-string", "head_count-0", "kv-not-dividing",
        "heads-not-dividing", "context-2^30", "freq_base-negative"])
def test_gguf_bad_metadata(base, tmp_path, meta, words):
    merged = {k: v for k, v in dict(_QWEN2_META, **meta).items() if v is not _DROP}
    path = _write_raw_gguf(tmp_path / "meta.gguf", "qwen2", merged, _gguf_tensors(base["model"]))
    _expect(path, path, *words)


def test_gguf_missing_token_embd(base, tmp_path):
    tensors = _gguf_tensors(base["model"])
    del tensors["token_embd.weight"]
    path = _write_raw_gguf(tmp_path / "noembd.gguf", "qwen2", _QWEN2_META, tensors)
    _expect(path, path, "token_embd.weight")


def test_gguf_truncated(base, tmp_path):
    path = write_gguf(base["model"], str(tmp_path / "cut.gguf"), "F16")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _expect(path, path, "truncated")


# -- paths ---------------------------------------------------------------------------------------

def test_folder_without_safetensors(base, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(base["config"]))
    _expect(str(folder), str(folder), "no .safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(str(empty), str(empty), "no .safetensors", "not a model folder")


def test_path_does_not_exist(tmp_path):
    path = str(tmp_path / "nowhere" / "model.gguf")
    _expect(path, path, "no such file", via_llm=False)


def test_path_does_not_exist_via_llm(tmp_path):
    path = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(Exception) as info:
        _llm(path)
    _check_error(info.value, path, ["no such file"])


def test_file_neither_gguf_nor_safetensors(tmp_path):
    for name, content in [("model.bin", os.urandom(4096)), ("empty.gguf", b""), ("three.bytes", b"GGU"),
                          ("pickle.pt", b"\x80\x04\x95" + bytes(100))]:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        _expect(path, path, "not a GGUF file")


def test_bad_safetensors_file_given_directly(base):
    folder = _variant(base, st=os.urandom(1 << 16))
    path = os.path.join(folder, ST)
    _expect(path, path, "safetensors header")


def test_fifo_does_not_hang(tmp_path):
    path = str(tmp_path / "fifo.gguf")
    os.mkfifo(path)
    _expect(path, path, "not a regular file")


def test_config_value_fuzz(base):
    """Every config.json field set to values of every wrong type and size (and random combinations):
    each case loads or is one ModelLoadError naming config.json (or, for sizes that disagree with
    the weights, the safetensors file), raised at open."""
    rng = random.Random(SEED)
    pool = [None, -1, 0, 1, 3, 2 ** 70, 1.5, 256.0, "x", "256", [], {}, True, [1], {"a": 1}, 1e308, 10 ** 9]
    keys = sorted(set(base["config"]) | {"head_dim", "rope_scaling", "rope_theta", "attention_bias"})
    cases = [{k: v} for k in keys for v in pool]
    cases += [{rng.choice(keys): rng.choice(pool) for _ in range(3)} for _ in range(100)]
    folder = _variant(base)
    config_path, st_path = os.path.join(folder, "config.json"), os.path.join(folder, ST)
    loaded = failed = 0
    t0 = time.perf_counter()
    for case in cases:
        with open(config_path, "w") as f:
            json.dump(dict(base["config"], **case), f)
        try:
            with _deadline(PER_CASE_S, f"config {case}"):
                try:
                    open_checkpoint(folder).close()
                except ModelLoadError as err:
                    _check_error(err, err.path, [])
                    assert err.path in (config_path, st_path, folder), f"{case}: {err}"
                    failed += 1
                else:
                    loaded += 1
        except Exception as err:
            raise AssertionError(f"config {case}: {type(err).__name__}: {err}") from err
    assert time.perf_counter() - t0 < FUZZ_TOTAL_S
    assert failed > len(cases) // 2 and loaded > 10, (loaded, failed)
