"""Vocabulary extension: one token per (level, code) plus entity-boundary tokens.

New input rows are initialised either from the codebook vectors (ReaLM: the
embedding of a code relates to its codeword; a code tuple's tokens then sum to
a projection of the entity's quantised vector) through a fixed random
projection from code width to model width, rescaled to the norm of the
existing rows; or from the mean of the existing rows plus small noise (the
reference's choice, and the fallback for tokens without a codeword); or from
the names of the entities each token groups (``names``: the mean of their
names' mean rows).
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


def code_levels(tokens: list[str]) -> list[int]:
    """The level (0-based; the disambiguation rank last) of each code token ``<b_17>``, by its namespace in the
    order :func:`code_vocabulary` lists them."""
    names = [token.strip("<>").rsplit("_", 1)[0] for token in tokens]
    order = {name: level for level, name in enumerate(dict.fromkeys(names))}
    return [order[name] for name in names]


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


def token_entities(tokens: list[str], entity_ids: list[str]) -> list[np.ndarray | None]:
    """Per token, the entities whose id tuple holds it (``names`` init), or None when none does.

    ``entity_ids``: each entity's id tokens as one string (``<a_1><b_7>``).  Each level has its own token
    namespace, so "holds <b_7>" is "has code 7 at level 1"; with ``ids: random`` the groups are the random
    tuples' (the tokens the prompts show).
    """
    import re

    found = [re.findall(r"<[^<>]+>", ids) for ids in entity_ids]
    position = {token: i for i, token in enumerate(tokens)}
    index = np.array([position.get(t, -1) for held in found for t in held], dtype=np.int64)  # (held tokens,)
    entity = np.repeat(np.arange(len(found)), [len(held) for held in found])
    pairs = np.unique(np.stack([index, entity], 1)[index >= 0], axis=0)  # (token, entity), sorted, once each
    bounds = np.searchsorted(pairs[:, 0], np.arange(len(tokens) + 1))
    return [pairs[b:e, 1] if e > b else None for b, e in zip(bounds[:-1], bounds[1:])]


def extend_vocabulary(model: Any, tokenizer: Any, tokens: list[str], *, init: str = "codebook",
                      codebooks: np.ndarray | None = None, entities: list[dict[str, Any]] | None = None,
                      seed: int = 0) -> list[int]:
    """Add ``tokens`` (whole, never split) and initialise their rows (:func:`kgtok.quantize.hf.extend_vocabulary`,
    the same maths as ``EntityTokenizer.extend``); returns their ids.

    ``entities`` (``names`` init): the instructions' ``entities.jsonl`` rows (``name`` and ``ids`` per entity).
    """
    from kgtok.quantize.hf import extend_vocabulary as extend

    if init == "names" and entities is None:
        raise ValueError("embedding_init=names needs the entities' names and ids (the instructions' entities.jsonl)")
    codewords = [codeword_of(token, codebooks) for token in tokens] if init == "codebook" else None
    groups = token_entities(tokens, [e["ids"] for e in entities]) if init == "names" else None
    names = [e["name"] for e in entities] if init == "names" else None
    return extend(model, tokenizer, tokens, init=init, codewords=codewords, token_entities=groups,
                  entity_names=names, seed=seed)
