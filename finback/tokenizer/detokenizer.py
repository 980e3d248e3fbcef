"""Streaming detokenization: token ids in, newly completed text out.

`IncrementalDetokenizer.add(ids)` returns only the text the new ids complete, never a broken
character: the bytes of a character split across byte-level tokens (a Chinese character, an
emoji) are held back until the character is whole. `flush()` gives what is still held back, with
U+FFFD for an incomplete character. All `add()` outputs plus `flush()` equal
`tokenizer.decode(all_ids, skip_special_tokens=...)`.

Each call costs O(new tokens):
- byte-level tokenizers (every model of the family): each id maps to a fixed byte string, and an
  incremental UTF-8 decoder turns the byte stream into text exactly as a one-shot decode would;
- any other decoder: vLLM's scheme, decoding a short window of recent tokens twice (from a prefix
  offset to the read offset, and to the end) and emitting the difference once it no longer ends in
  an incomplete character.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from finback.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing sequence of token ids into text, a piece at a time."""

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, *, use_bytes: bool | None = None
    ):
        """`use_bytes`: None picks the byte path when the tokenizer is byte-level; False forces the
        windowed path (any decoder); True requires a byte-level tokenizer."""
        if use_bytes and not tokenizer.byte_level:
            raise ValueError("use_bytes=True needs a tokenizer with a byte-level decoder")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pieces: list[str] = []
        self._byte_mode = tokenizer.byte_level if use_bytes is None else use_bytes
        if self._byte_mode:
            self._table = tokenizer.token_bytes_table(skip_special_tokens)
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._ids: list[int] = []
            self._prefix_offset = 0
            self._read_offset = 0

    @property
    def text(self) -> str:
        """All text emitted so far (by add() and flush())."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_ids: Iterable[int] | int) -> str:
        """Feed new token ids; return the newly completed text (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        if self._byte_mode:
            table = self._table
            n = len(table)
            data = b"".join(table[i] if 0 <= i < n else b"" for i in map(int, token_ids))
            out = self._decoder.decode(data) if data else ""
        else:
            self._ids.extend(int(i) for i in token_ids)
            out = self._window_step()
        if out:
            self._pieces.append(out)
        return out

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        if self._byte_mode:
            out = self._decoder.decode(b"", final=True)
        else:
            ids = self._ids
            decode = self.tokenizer.decode
            skip = self.skip_special_tokens
            prefix_text = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
            new_text = decode(ids[self._prefix_offset :], skip_special_tokens=skip)
            out = new_text[len(prefix_text) :]
            ids.clear()
            self._prefix_offset = self._read_offset = 0
        if out:
            self._pieces.append(out)
        return out

    def _window_step(self) -> str:
        ids = self._ids
        if len(ids) == self._read_offset:
            return ""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = decode(ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            out = new_text[len(prefix_text) :]
            # the next window starts where this one's new text began; older ids are not needed
            del ids[: self._read_offset]
            self._prefix_offset, self._read_offset = 0, len(ids)
            return out
        return ""
