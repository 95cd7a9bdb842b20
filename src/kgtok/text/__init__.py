"""Stage 2: sentence-encoder embeddings of entity labels and descriptions (offline MiniLM by default)."""

from kgtok.text.config import DEFAULT_MODEL, TextConfig
from kgtok.text.encode import TextEncoding, embed_texts, encode_texts, resolve_model
from kgtok.text.stage import run_text

__all__ = ["DEFAULT_MODEL", "TextConfig", "TextEncoding", "embed_texts", "encode_texts", "resolve_model", "run_text"]
