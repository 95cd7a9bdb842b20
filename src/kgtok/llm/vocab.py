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
import torch

ENTITY_BEGIN, ENTITY_END = "<ent>", "</ent>"
BOUNDARY_TOKENS = (ENTITY_BEGIN, ENTITY_END)


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
    """Add ``tokens`` (whole, never split) and initialise their rows; returns their ids.

    ``init``: ``codebook`` or ``mean`` (see the module docstring).
    """
    from tokenizers import AddedToken

    if init not in ("codebook", "mean"):
        raise ValueError(f"embedding init {init!r}: expected 'codebook' or 'mean'")
    existing = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) == existing:
        return new_ids
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(output.weight)
        for weight in matrices:
            old = weight[:existing].float()  # (V_old, H)
            mean, std = old.mean(0), old.std(0)
            rows = mean + 0.02 * std * torch.randn(len(tokens), weight.shape[1], generator=generator)
            if init == "codebook" and codebooks is not None:
                dim = codebooks.shape[-1]
                projection = torch.randn(dim, weight.shape[1], generator=generator) / dim ** 0.5  # (code dim, H)
                target_norm = old.norm(dim=1).mean()
                for i, token in enumerate(tokens):
                    word = codeword_of(token, codebooks)
                    if word is not None:
                        rows[i] = torch.as_tensor(word, dtype=torch.float32) @ projection
                scale = target_norm / rows.norm(dim=1).mean().clamp_min(1e-8)
                rows = rows * scale
            weight[new_ids] = rows.to(weight.dtype)
    return new_ids
