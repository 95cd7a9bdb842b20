"""Code tokens in any Hugging Face model: add them whole to the tokenizer and initialise their rows.

:meth:`kgtok.quantize.EntityTokenizer.extend` calls :func:`extend_vocabulary`
with one token per (level, code), the disambiguation ranks and the entity
boundary tokens ``<ent>``, ``</ent>``. Each new token is one id (an
``AddedToken``, never split by BPE), and its input row (and output row, when
the model's output embedding is not tied to the input one) starts from one of
three initialisations, ``init``:

``codebook``
    ReaLM: the token's codeword, through a fixed random projection from code
    width to model width, all new rows rescaled to the mean norm of the
    existing rows. A code tuple's tokens then sum to a projection of the
    entity's quantised vector. Tokens without a codeword (boundary tokens,
    disambiguation ranks) start as ``mean``, rescaled with the rest.
``mean``
    The mean of the existing rows plus small noise (0.02 of the per-dimension
    standard deviation): the GS-Quant reference's choice.
``names``
    The row of the token of (level l, code k) is the mean, over the entities
    whose level-l code is k, of the mean existing row of each entity's name
    tokens: the model starts by reading a code as the names it stands for.
    Tokens no entity uses start as ``mean``.

The random draws (noise, projection) come from one generator seeded by
``seed``, in the order stage 5 has always drawn them, so its rows are
reproduced exactly. This module imports nothing from ``kgtok.llm``: stage 5
builds on it, not the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ENTITY_BEGIN, ENTITY_END = "<ent>", "</ent>"
BOUNDARY_TOKENS = (ENTITY_BEGIN, ENTITY_END)
INITS = ("codebook", "mean", "names")


def add_tokens(tokenizer: Any, tokens: Sequence[str]) -> tuple[list[int], int]:
    """Add ``tokens`` whole (never split, not normalised); returns (their ids, the vocabulary size before)."""
    from tokenizers import AddedToken

    existing = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    return tokenizer.convert_tokens_to_ids(list(tokens)), existing


def embedding_matrices(model: Any) -> list[torch.Tensor]:
    """The input embedding weight, and the output one when it is a separate tensor (untied)."""
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    return matrices


def mean_rows(old: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(V_old, H) existing rows -> (count, H): their mean plus 0.02 x their per-dimension std of noise."""
    mean, std = old.mean(0), old.std(0)
    return mean + 0.02 * std * torch.randn(count, old.shape[1], generator=generator)


def codebook_rows(old: torch.Tensor, rows: torch.Tensor, codewords: Sequence[np.ndarray | None],
                  generator: torch.Generator) -> torch.Tensor:
    """ReaLM's rows: codewords (code_dim,) projected to the model width, all rows scaled by one factor so that
    their mean norm is the old rows' mean norm (each row keeps its relative length).

    ``rows`` (count, H) are the ``mean`` rows; those of tokens whose codeword
    is None stay (and are scaled with the rest).
    """
    known = [i for i, word in enumerate(codewords) if word is not None]
    if not known:
        return rows
    dim = len(codewords[known[0]])
    projection = torch.randn(dim, old.shape[1], generator=generator) / dim ** 0.5  # (code_dim, H)
    rows = rows.clone()
    words = torch.as_tensor(np.stack([codewords[i] for i in known]), dtype=torch.float32)  # (known, code_dim)
    rows[known] = words @ projection
    scale = old.norm(dim=1).mean() / rows.norm(dim=1).mean().clamp_min(1e-8)
    return rows * scale


def name_rows(old: torch.Tensor, rows: torch.Tensor, name_ids: Sequence[Sequence[int]],
              token_entities: Sequence[np.ndarray | None]) -> torch.Tensor:
    """Each token's row: the mean over its entities of their names' mean row; tokens with none keep ``rows``.

    name_ids : per entity, its name's token ids under the old vocabulary
    (an empty name has no vector and is left out of every mean).
    """
    dim = old.shape[1]
    has_name = torch.tensor([len(ids) > 0 for ids in name_ids])
    flat = torch.tensor([i for ids in name_ids for i in ids], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(name_ids)), torch.tensor([len(ids) for ids in name_ids]))
    sums = torch.zeros(len(name_ids), dim).index_add_(0, owner, old[flat])  # (N, H)
    names = sums / torch.tensor([max(len(ids), 1) for ids in name_ids]).unsqueeze(1)  # (N, H) mean name row
    rows = rows.clone()
    for i, entities in enumerate(token_entities):
        if entities is None or len(entities) == 0:
            continue
        entities = torch.as_tensor(entities, dtype=torch.long)
        entities = entities[has_name[entities]]
        if len(entities):
            rows[i] = names[entities].mean(0)
    return rows


def extend_vocabulary(model: Any, tokenizer: Any, tokens: Sequence[str], *, init: str = "codebook",
                      codewords: Sequence[np.ndarray | None] | None = None,
                      token_entities: Sequence[np.ndarray | None] | None = None,
                      entity_names: Sequence[str] | None = None, seed: int = 0) -> list[int]:
    """Add ``tokens`` to a Hugging Face ``tokenizer`` and ``model`` and initialise their rows; returns their ids.

    Parameters
    ----------
    model : a transformers model (``get_input_embeddings``, ``resize_token_embeddings``).
    tokenizer : its tokenizer (``add_tokens``, ``convert_tokens_to_ids``).
    tokens : the token strings, added in this order.
    init : ``codebook`` (default), ``mean`` or ``names`` (see the module docstring).
    codewords : ``codebook`` init: one (code_dim,) vector or None per token.
    token_entities : ``names`` init: per token, the entity ids (rows of ``entity_names``) it stands for, or None.
    entity_names : ``names`` init: (N,) entity names.
    seed : the generator of the noise and the projection.

    Tokens already in the vocabulary keep their rows; if none is new, nothing changes.
    """
    if init not in INITS:
        raise ValueError(f"embedding init {init!r}: expected one of {', '.join(map(repr, INITS))}")
    for name, value in (("codewords", codewords), ("token_entities", token_entities)):
        if value is not None and len(value) != len(tokens):
            raise ValueError(f"{name} has {len(value)} entries; expected one per token ({len(tokens)})")
    if init == "names" and (token_entities is None or entity_names is None):
        raise ValueError("init='names' needs token_entities and entity_names (the name of every entity)")
    name_ids = None
    if init == "names":  # tokenised before the code tokens exist: names read as the model reads them today
        name_ids = [tokenizer(str(name), add_special_tokens=False)["input_ids"] for name in entity_names]
    new_ids, existing = add_tokens(tokenizer, tokens)
    if len(tokenizer) == existing:
        return new_ids
    # Many LMs pad their matrix past the tokenizer (to a multiple of 64, say): keep the padding, never shrink.
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(tokenizer), rows), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    fresh = [i for i, token_id in enumerate(new_ids) if token_id >= existing]  # tokens that were not there
    with torch.no_grad():
        for weight in embedding_matrices(model):
            old = weight[:existing].float()  # (V_old, H)
            rows = mean_rows(old, len(tokens), generator)  # (count, H)
            if init == "codebook" and codewords is not None:
                rows = codebook_rows(old, rows, codewords, generator)
            elif init == "names":
                rows = name_rows(old, rows, name_ids, token_entities)
            weight[[new_ids[i] for i in fresh]] = rows[fresh].to(weight.dtype)
    return new_ids
