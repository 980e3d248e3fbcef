"""Tokenizers built from GGUF metadata or tokenizer.json, and an incremental detokenizer."""

from finback.tokenizer.detokenizer import IncrementalDetokenizer
from finback.tokenizer.tokenizer import SUPPORTED_PRE_TYPES, Tokenizer

__all__ = ["IncrementalDetokenizer", "SUPPORTED_PRE_TYPES", "Tokenizer"]
