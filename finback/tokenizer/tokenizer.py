"""Tokenizers for the R1 family, built from GGUF metadata or loaded from tokenizer.json.

The BPE itself runs in the Rust `tokenizers` library. A GGUF file carries no tokenizer.json, only
llama.cpp's description of one (`tokenizer.ggml.*`), so `Tokenizer.from_gguf` assembles the
equivalent tokenizer.json document from it:

- model: byte-level BPE with the file's vocabulary and merges, every token at the id the file gives
  it (the GGUF token list is the truth for ids);
- pre-tokenizer: the sequence of split regexes llama.cpp uses for the file's `tokenizer.ggml.pre`
  (each regex splits the pieces the previous one left, both matches and gaps kept), then the GPT-2
  byte-to-unicode mapping;
- added tokens: CONTROL (and UNKNOWN) tokens as special tokens, USER_DEFINED ones (`<think>`) as
  plain added tokens, both matched whole in the text, both at their file ids;
- decoder: byte-level.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported; that is what
every model of the family (Qwen2 and Llama 3 distills, DeepSeek-V3/R1) and SmolLM2 ship.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers
from tokenizers import decoders as _decoders

from finback.loader.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes per `tokenizer.ggml.pre`, as llama.cpp applies them (llama-vocab.cpp).
# Where the model's own tokenizer.json spells a regex with `(?i:...)`, we keep that spelling:
# the Rust library runs it natively (llama.cpp rewrites it only because its engine cannot).
# ---------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Written with \x{...} escapes so that no editor's Unicode normalization can change a range (the
# Greek Extended end points and U+1FBE, U+2126, U+212A are not NFC-stable).
_DEEPSEEK_LLM_LETTERS = (
    r"\s?["
    r"A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}"
    r"\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}"
    r"\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}"
    r"\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}"
    r"\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}"
    r"\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}"
    r"\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}"
    r"\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}"
    r"\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}"
    r"\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}"
    r"\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}"
    r"\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}"
    r"\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+"
)
# CJK ideographs U+4E00-U+9FA5, U+0800-U+4E00, Hangul U+AC00-U+D7FF (deepseek-llm / -coder)
_DEEPSEEK_LLM_CJK = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"
# ideographs, hiragana, katakana (deepseek-v3)
_DEEPSEEK3_CJK = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
# ASCII punctuation, full-width forms U+FF01-U+FF0F U+FF1A-U+FF5E, quotes U+2018-U+201F,
# U+3000-U+3002 (deepseek-llm)
_DEEPSEEK_LLM_PUNCT = r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+"

_PRE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-llm": (
        r"[\r\n]",
        _DEEPSEEK_LLM_LETTERS,
        _DEEPSEEK_LLM_PUNCT,
        r"\s+$",
        _DEEPSEEK_LLM_CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_LLM_CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", _DEEPSEEK3_CJK, _DEEPSEEK3),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
}
# other `tokenizer.ggml.pre` names llama.cpp gives the same splitting
_PRE_ALIASES: dict[str, str] = {
    "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "phi-2": "gpt2",
    "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm", "minerva-7b": "smollm",
    "exaone": "smollm", "command-r": "smollm",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2",
}
# pre types whose BPE looks a whole pre-token up in the vocabulary before merging (llama.cpp's
# `ignore_merges`, the tokenizer.json BPE flag of the same name)
_IGNORE_MERGES = {"llama-bpe"}
# pre types for which llama.cpp adds BOS unless the file says otherwise
_DEFAULT_ADD_BOS = {"llama-bpe"}

SUPPORTED_PRE_TYPES = tuple(sorted(set(_PRE_TYPES) | set(_PRE_ALIASES)))

# Token texts that end generation (llama.cpp detects the same ones by text), besides eos/eot/eom.
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping used by byte-level BPE."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def byte_level_spelling(text: str) -> str:
    """`text` (real UTF-8 text) written in the byte-level alphabet, the way BPE vocabularies store it."""
    return "".join(BYTE_TO_UNICODE[b] for b in text.encode("utf-8"))


def byte_level_token_bytes(token: str) -> bytes:
    """The bytes the Rust ByteLevel decoder produces for one token string.

    Every character in the byte alphabet gives its byte; a token with any other character (a
    special token like `<｜User｜>`) is passed through as its own UTF-8.
    """
    out = bytearray()
    for ch in token:
        b = UNICODE_TO_BYTE.get(ch)
        if b is None:
            return token.encode("utf-8")
        out.append(b)
    return bytes(out)


def _is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _plain_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v for v in value]


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


class Tokenizer:
    """A text <-> token id converter with the special tokens of one model.

    Build it with `from_gguf`, `from_pretrained` or `load`; the constructor takes an already built
    `tokenizers.Tokenizer` and the model's special-token facts.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        pre_type: str | None = None,
        source: str | None = None,
    ):
        self._backend = backend
        self.vocab_size = int(vocab_size)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self.add_eos_token = bool(add_eos_token and eos_token_id is not None)
        self.chat_template = chat_template
        self.pre_type = pre_type
        self.source = source
        self.bos_token = self._content(bos_token_id)
        self.eos_token = self._content(eos_token_id)
        self.pad_token = self._content(pad_token_id)
        self.unk_token = self._content(unk_token_id)

        added = backend.get_added_tokens_decoder()
        special = {i for i, tok in added.items() if tok.special}
        self._special_ids = frozenset(special)
        self._added_ids = frozenset(added)

        eog: set[int] = set(i for i in extra_eos_token_ids if i is not None)
        if eos_token_id is not None:
            eog.add(eos_token_id)
        for text in _EOG_TEXTS:
            tid = backend.token_to_id(text)
            if tid is not None and tid in self._added_ids:
                eog.add(tid)
        self.eos_token_ids: frozenset[int] = frozenset(eog)
        self.all_special_ids: frozenset[int] = frozenset(
            special
            | {i for i in (bos_token_id, eos_token_id, pad_token_id, unk_token_id) if i is not None}
            | eog
        )

        decoder = backend.decoder
        # decode() is plain byte concatenation exactly when the decoder is byte-level alone
        self.byte_level = isinstance(decoder, _decoders.ByteLevel)
        self._byte_tables: dict[bool, list[bytes]] = {}

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A GGUF file (by its magic), a folder with tokenizer.json, or a tokenizer.json file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.from_pretrained(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        if _is_gguf_file(path):
            return cls.from_gguf(path)
        if path.endswith(".json"):
            return cls.from_pretrained(path)
        raise ValueError(f"{path}: neither a GGUF file, a tokenizer.json nor a folder holding one")

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike | Mapping[str, Any]) -> "Tokenizer":
        """From a GGUF file (complete or with its tensor data cut off) or its metadata dict."""
        if isinstance(path_or_metadata, Mapping):
            meta, source = path_or_metadata, None
        else:
            from finback.loader.gguf import read_gguf_metadata

            source = os.fspath(path_or_metadata)
            meta = read_gguf_metadata(source)
        try:
            return cls._from_gguf_metadata(meta, source)
        except ModelLoadError:
            raise
        except ValueError as e:
            if source:
                raise ModelLoadError(source, str(e)) from e
            raise

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping[str, Any], source: str | None) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("no tokenizer in this GGUF (tokenizer.ggml.model is missing)")
        if model == "llama":
            raise ValueError(
                "tokenizer.ggml.model 'llama' (a SentencePiece vocabulary) is not supported; "
                "only byte-level BPE ('gpt2') vocabularies are"
            )
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model {model!r} is not supported; only byte-level BPE ('gpt2') is"
            )
        pre = meta.get("tokenizer.ggml.pre") or ""
        if not pre:
            logger.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' splitting")
            pre = "default"
        pre_type = _PRE_ALIASES.get(pre, pre)
        if pre_type not in _PRE_TYPES:
            raise ValueError(
                f"unknown pre-tokenizer type {pre!r} (tokenizer.ggml.pre); "
                f"supported: {', '.join(SUPPORTED_PRE_TYPES)}"
            )

        tokens = _plain_list(meta.get("tokenizer.ggml.tokens"))
        if not tokens:
            raise ValueError("tokenizer.ggml.tokens is missing or empty")
        types = _plain_list(meta.get("tokenizer.ggml.token_type")) or [TOKEN_NORMAL] * len(tokens)
        if len(types) < len(tokens):
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("tokenizer.ggml.merges is missing")
        merges_in = _plain_list(meta.get("tokenizer.ggml.merges"))

        def special_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            value = int(value)
            if not 0 <= value < len(tokens):
                logger.warning("tokenizer.ggml.%s = %d is outside the vocabulary; ignored", key, value)
                return None
            return value

        bos, eos = special_id("bos_token_id"), special_id("eos_token_id")
        pad, unk = special_id("padding_token_id"), special_id("unknown_token_id")
        eot, eom = special_id("eot_token_id"), special_id("eom_token_id")

        # Tokens that end generation are control tokens even if the file forgot to say so
        # (llama.cpp does the same); pad/unk only when the file already marks them non-normal.
        promote = {i for i in (bos, eos, eot, eom) if i is not None}
        promote.update(i for i, text in enumerate(tokens) if text in _EOG_TEXTS)

        vocab: dict[str, int] = {}
        added: list[dict[str, Any]] = []
        seen_added: set[str] = set()
        alphabet = UNICODE_TO_BYTE
        for i, text in enumerate(tokens):
            ttype = types[i]
            if not text:
                text = f"[EMPTY_{i}]"
            if ttype in (TOKEN_CONTROL, TOKEN_UNKNOWN) or i in promote:
                kind = True  # special
            elif ttype == TOKEN_USER_DEFINED:
                kind = False  # added, not special
            else:
                kind = None  # a BPE vocabulary entry
            if kind is None:
                if not all(ch in alphabet for ch in text):
                    text = byte_level_spelling(text)
                if text in vocab:
                    logger.warning(
                        "duplicate token %r at ids %d and %d; keeping the first", text, vocab[text], i
                    )
                    continue
                vocab[text] = i
            else:
                if text in seen_added:
                    logger.warning("duplicate added token %r at id %d; ignored", text, i)
                    continue
                seen_added.add(text)
                # also a vocabulary entry at its id: that is how the Rust library keeps an added
                # token's id (it renumbers added tokens the model does not know). The content is
                # matched whole before BPE runs, and no merge leads to it.
                if text in vocab:
                    logger.warning("added token %r at id %d shadows vocabulary id %d", text, i, vocab[text])
                vocab[text] = i
                added.append(
                    {
                        "id": i,
                        "content": text,
                        "single_word": False,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "special": kind,
                    }
                )

        merges: list[list[str]] = []
        for m in merges_in:
            pos = m.find(" ", 1)
            if pos < 0:
                raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges")
            merges.append([m[:pos], m[pos + 1 :]])

        splits = [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
            for rx in _PRE_TYPES[pre_type]
        ]
        byte_level = {
            "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False
        }
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": splits + [byte_level],
            },
            "post_processor": None,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": pre_type in _IGNORE_MERGES,
                "vocab": vocab,
                "merges": merges,
            },
        }
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot build the tokenizer from GGUF metadata: {e}") from e

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = pre_type in _DEFAULT_ADD_BOS
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            unk_token_id=unk,
            extra_eos_token_ids=[i for i in (eot, eom) if i is not None],
            add_bos_token=bool(add_bos),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template if isinstance(template, str) else None,
            pre_type=pre,
            source=source,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a folder holding tokenizer.json (and optionally tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja, generation_config.json), or a tokenizer.json
        path (its folder's other files are used when present)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            folder, tok_file = path, os.path.join(path, "tokenizer.json")
        else:
            folder, tok_file = os.path.dirname(path) or ".", path
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json")

        def read_json(name: str) -> dict:
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                return {}
            try:
                with open(p, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{p}: not readable JSON: {e}") from e
            return data if isinstance(data, dict) else {}

        with open(tok_file, encoding="utf-8") as f:
            text = f.read()
        try:
            doc = json.loads(text)
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"{tok_file}: not a tokenizer.json: {e}") from e

        config = read_json("tokenizer_config.json")
        special_map = read_json("special_tokens_map.json")
        gen_config = read_json("generation_config.json")

        def token_id(name: str) -> int | None:
            content = _token_content(config.get(name))
            if content is None:
                content = _token_content(special_map.get(name))
            return backend.token_to_id(content) if content is not None else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        pad, unk = token_id("pad_token"), token_id("unk_token")

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and _post_processor_starts_with(doc.get("post_processor"), bos)
        add_eos = config.get("add_eos_token")

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()

        extra_eos = gen_config.get("eos_token_id")
        if isinstance(extra_eos, int):
            extra_eos = [extra_eos]
        extra_eos = [int(i) for i in (extra_eos or []) if isinstance(i, int)]

        all_ids = list(backend.get_vocab(with_added_tokens=True).values())
        vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(all_ids, default=-1) + 1)
        return cls(
            backend,
            vocab_size=vocab_size,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            unk_token_id=unk,
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=template if isinstance(template, str) else None,
            source=tok_file,
        )

    # ----------------------------------------------------------------------------------- use

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are recognised as such.

        With `add_special_tokens`, BOS is prepended when the model says add_bos_token (and EOS
        appended when it says add_eos_token).
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token:
                ids.append(self.eos_token_id)
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        out = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        if add_special_tokens:
            for ids in out:
                if self.add_bos_token:
                    ids.insert(0, self.bos_token_id)
                if self.add_eos_token:
                    ids.append(self.eos_token_id)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.all_special_ids

    def token_bytes_table(self, skip_special_tokens: bool = False) -> list[bytes]:
        """For a byte-level tokenizer: the bytes each id decodes to (`b""` for ids that decode to
        nothing), so that `decode(ids)` is the UTF-8 decoding (invalid bytes -> U+FFFD) of the
        concatenation. Built once per flag."""
        if not self.byte_level:
            raise ValueError("token_bytes_table needs a byte-level decoder")
        table = self._byte_tables.get(skip_special_tokens)
        if table is None:
            n = max(self.vocab_size, self._backend.get_vocab_size(with_added_tokens=True))
            table = [b""] * n
            for text, i in self._backend.get_vocab(with_added_tokens=True).items():
                if i >= n:
                    table.extend([b""] * (i + 1 - n))
                    n = i + 1
                table[i] = byte_level_token_bytes(text)
            if skip_special_tokens:
                for i in self._special_ids:
                    if i < len(table):
                        table[i] = b""
            self._byte_tables[skip_special_tokens] = table
        return table

    def _content(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre_type!r}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, source={self.source!r})"
        )


def _post_processor_starts_with(post: Any, token_id: int) -> bool:
    """Whether a tokenizer.json post-processor puts `token_id` first in a single sequence."""
    if not isinstance(post, Mapping):
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_starts_with(p, token_id) for p in post.get("processors") or [])
    if post.get("type") != "TemplateProcessing":
        return False
    single = post.get("single") or []
    if not single or "SpecialToken" not in single[0]:
        return False
    name = single[0]["SpecialToken"].get("id")
    ids = ((post.get("special_tokens") or {}).get(name) or {}).get("ids") or []
    return token_id in ids
