"""IncrementalDetokenizer: the streamed pieces always add up to tokenizer.decode of all ids."""

from __future__ import annotations

import random
import time

import pytest

from finback.store.packaged import embedded_model_path, r1_tokenizer_gguf_path
from finback.tokenizer import IncrementalDetokenizer, Tokenizer
from finback.tokenizer.tokenizer import BYTE_TO_UNICODE

R1_PATH = r1_tokenizer_gguf_path()
SMOL_PATH = embedded_model_path()

pytestmark = pytest.mark.skipif(
    R1_PATH is None or SMOL_PATH is None, reason="packaged GGUF files are not installed"
)

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "我爱北京天安门。深度求索（DeepSeek）是一家人工智能公司。",
    "日本語のテキストです。カタカナとひらがな。한국어 텍스트입니다.",
    "العربية نص تجريبي. עברית: שלום עולם",
    "emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇺🇸🇯🇵 ❤️ 🧑🏿‍💻",
    "Mixed: Hello 世界 🌍 مرحبا 123 ñ! café naïve",
    "def f(x):\n    return x ** 2  # 平方\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𐍈 𓀀 (astral plane)",
    "   leading spaces and\ttabs\n\n\nnewlines   ",
    "<think>\n让我想想……\n</think>\n\n答案是 42。",
]


@pytest.fixture(scope="module")
def r1():
    return Tokenizer.from_gguf(R1_PATH)


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(SMOL_PATH)


@pytest.fixture(params=["r1", "smol"])
def tok(request):
    return request.getfixturevalue(request.param)


def _stream(tok, ids, skip, use_bytes, chunks):
    """Feed `ids` in the given chunk sizes; return (pieces from add, flush output, detokenizer)."""
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip, use_bytes=use_bytes)
    pieces, i = [], 0
    for k in chunks:
        pieces.append(d.add(ids[i : i + k]))
        i += k
    if i < len(ids):
        pieces.append(d.add(ids[i:]))
    tail = d.flush()
    return pieces, tail, d


def _random_chunks(rng, n):
    out = []
    while sum(out) < n:
        out.append(rng.choice([0, 1, 1, 1, 2, 3, 5]))
    return out


MODES = [pytest.param(None, id="bytes"), pytest.param(False, id="window")]


@pytest.mark.parametrize("use_bytes", MODES)
@pytest.mark.parametrize("skip", [True, False])
def test_real_texts_token_by_token(tok, skip, use_bytes):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces, tail, d = _stream(tok, ids, skip, use_bytes, [1] * len(ids))
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip) == text
        assert d.text == text
        assert tail == ""
        # no piece ever carries half a character
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("use_bytes", MODES)
def test_split_character_is_held_back(r1, use_bytes):
    # find a character that byte-level BPE splits over several tokens
    for text in ["𓀀", "𝔘", "🧑🏿‍💻", "龘", "䶵"]:
        ids = r1.encode(text)
        if len(ids) > 1:
            break
    else:  # pragma: no cover
        pytest.skip("no split character found")
    d = IncrementalDetokenizer(r1, use_bytes=use_bytes)
    first = d.add(ids[:1])
    assert first == ""  # incomplete: nothing yet
    rest = d.add(ids[1:])
    assert first + rest == text and d.text == text
    assert d.flush() == ""


@pytest.mark.parametrize("use_bytes", MODES)
@pytest.mark.parametrize("skip", [True, False])
def test_cut_mid_character_flush_matches_decode(tok, skip, use_bytes):
    rng = random.Random(7)
    for text in TEXTS[1:6]:
        ids = tok.encode(text)
        for cut in range(len(ids) + 1):
            prefix = ids[:cut]
            pieces, tail, d = _stream(tok, prefix, skip, use_bytes, _random_chunks(rng, cut))
            want = tok.decode(prefix, skip_special_tokens=skip)
            assert "".join(pieces) + tail == want == d.text
            assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("use_bytes", MODES)
@pytest.mark.parametrize("skip", [True, False])
def test_random_id_sequences(tok, skip, use_bytes):
    rng = random.Random(11 if skip else 12)
    specials = sorted(tok.all_special_ids)
    for _ in range(400):
        n = rng.randint(0, 24)
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_size) for _ in range(n)]
        pieces, tail, d = _stream(tok, ids, skip, use_bytes, _random_chunks(rng, n))
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), ids
        assert d.text == "".join(pieces) + tail


@pytest.mark.parametrize("use_bytes", MODES)
def test_random_bytes_including_invalid_utf8(tok, use_bytes):
    """Single-byte tokens in random order: invalid sequences become U+FFFD exactly as in decode."""
    byte_ids = [tok.token_to_id(BYTE_TO_UNICODE[b]) for b in range(256)]
    byte_ids = [i for i in byte_ids if i is not None]
    high = [i for b, i in zip(range(256), byte_ids) if b >= 0x80] or byte_ids
    rng = random.Random(3)
    for trial in range(400):
        pool = high if trial % 2 else byte_ids
        n = rng.randint(0, 16)
        ids = [rng.choice(pool) for _ in range(n)]
        for skip in (True, False):
            pieces, tail, _ = _stream(tok, ids, skip, use_bytes, _random_chunks(rng, n))
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("use_bytes", MODES)
def test_skip_special_tokens_both_ways(r1, use_bytes):
    ids = (
        [r1.bos_token_id]
        + r1.encode("<｜User｜>你好<｜Assistant｜><think>\n嗯\n</think>\n\n你好！😀")
        + [r1.eos_token_id]
    )
    kept = "<｜begin▁of▁sentence｜><｜User｜>你好<｜Assistant｜><think>\n嗯\n</think>\n\n你好！😀<｜end▁of▁sentence｜>"
    skipped = "你好<think>\n嗯\n</think>\n\n你好！😀"  # <think> is not a special token
    for skip, want in ((False, kept), (True, skipped)):
        assert r1.decode(ids, skip_special_tokens=skip) == want
        pieces, tail, d = _stream(r1, ids, skip, use_bytes, [1] * len(ids))
        assert "".join(pieces) + tail == want == d.text


def test_default_skips_special_tokens(smol):
    ids = smol.encode("<|im_start|>assistant\nHi there<|im_end|>")
    d = IncrementalDetokenizer(smol)
    assert d.add(ids) + d.flush() == "assistant\nHi there"
    d = IncrementalDetokenizer(smol, skip_special_tokens=False)
    assert d.add(ids) + d.flush() == "<|im_start|>assistant\nHi there<|im_end|>"


def test_add_accepts_single_ids_and_empty_lists(r1):
    ids = r1.encode("中文😀")
    d = IncrementalDetokenizer(r1)
    assert d.add([]) == ""
    out = "".join(d.add(i) for i in ids)
    assert out + d.flush() == "中文😀"


def test_flush_gives_replacement_for_incomplete_tail(r1):
    ids = [r1.token_to_id(BYTE_TO_UNICODE[b]) for b in "中".encode("utf-8")]
    d = IncrementalDetokenizer(r1)
    assert d.add(ids[:2]) == ""
    assert d.flush() == "\ufffd" == r1.decode(ids[:2])
    assert d.text == "\ufffd"


def test_window_path_stays_small(r1):
    """The windowed path decodes only a few recent tokens per call, not the whole history."""
    ids = r1.encode(" ".join(TEXTS) * 20)
    d = IncrementalDetokenizer(r1, use_bytes=False)
    longest = 0
    for i in ids:
        d.add([i])
        longest = max(longest, len(d._ids))
    assert longest <= 8
    assert d.text + d.flush() == r1.decode(ids)


def test_long_stream_is_linear(r1):
    ids = r1.encode(" ".join(TEXTS) * 60)
    assert len(ids) > 10000
    for use_bytes in (None, False):
        d = IncrementalDetokenizer(r1, use_bytes=use_bytes)
        start = time.perf_counter()
        for i in ids:
            d.add([i])
        elapsed = time.perf_counter() - start
        assert d.text + d.flush() == r1.decode(ids)
        assert elapsed < 5.0, (use_bytes, elapsed)


def test_use_bytes_requires_byte_level():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models

    backend = RustTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    tok = Tokenizer(backend, vocab_size=3)
    assert not tok.byte_level
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, use_bytes=True)
    d = IncrementalDetokenizer(tok)  # falls back to the windowed path
    assert d.add([0, 1]) + d.add([0]) + d.flush() == tok.decode([0, 1, 0])
