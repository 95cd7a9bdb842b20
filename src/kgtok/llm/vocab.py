"""Vocabulary extension: one token per (level, code) plus entity-boundary tokens.

New input rows are initialised either from the codebook vectors (ReaLM: the
embedding of a code relates to its codeword; a code tuple's tokens then sum to
a projection of the entity's quantised vector) through a fixed random
projection from code width to model width, rescaled to the norm of the
existing rows; or from the mean of the existing rows plus small noise (the
reference's choice, and the fallback for tokens without a codeword).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kgtok.quantize.hf import BOUNDARY_TOKENS, ENTITY_BEGIN, ENTITY_END  # noqa: F401  (stage 5 reads them here)


def code_vocabulary(quantize_artifact: str | Path) -> tuple[list[str], np.ndarray | None]:
    """Every code token of a stage-4 artifact, and (levels, K, dim) codebooks when saved.

    The ``flat`` variant saves one codebook that every level shares: it is repeated per level here, so that
    ``<b_17>`` starts from codeword 17 as ``<a_17>`` does (not from the mean, as levels past the first did).
    """
    from kgtok.quantize.tokenizer import EntityTokenizer

    tokenizer = EntityTokenizer.load(Path(quantize_artifact) / "tokenizer")
    return tokenizer.vocabulary(), shared_per_level(tokenizer.codebooks_.numpy(), tokenizer.base_codes_.shape[1])


def shared_per_level(codebooks: np.ndarray, levels: int) -> np.ndarray:
    """(levels, K, dim): one book per code level, a single shared book repeated (disambiguation has none)."""
    if codebooks.shape[0] == 1 and levels > 1:
        return np.repeat(codebooks, levels, axis=0)
    return codebooks


def codeword_of(token: str, codebooks: np.ndarray | None) -> np.ndarray | None:
    """The codeword behind a token ``<b_17>`` (level 1, code 17), or None (boundary, disambiguation)."""
    from kgtok.quantize.tokenizer import level_namespace

    if codebooks is None or "_" not in token:
        return None
    name, code = token.strip("<>").rsplit("_", 1)
    levels = codebooks.shape[0]
    for level in range(levels):
        if level_namespace(level) == name and int(code) < codebooks.shape[1]:
            return codebooks[level][int(code)]
    return None


def extend_vocabulary(model: Any, tokenizer: Any, tokens: list[str], *, init: str = "codebook",
                      codebooks: np.ndarray | None = None, seed: int = 0) -> list[int]:
    """Add ``tokens`` (whole, never split) and initialise their rows (:func:`kgtok.quantize.hf.extend_vocabulary`,
    the same maths as ``EntityTokenizer.extend``); returns their ids."""
    from kgtok.quantize.hf import extend_vocabulary as extend

    codewords = [codeword_of(token, codebooks) for token in tokens] if init == "codebook" else None
    return extend(model, tokenizer, tokens, init=init, codewords=codewords, seed=seed)
