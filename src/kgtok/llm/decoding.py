"""Constrained generation over a query's candidates: the answer is always a listed entity.

Greedy decoding restricted by a prefix trie of the candidates' token
sequences needs, at each step, the next-token log-probabilities of the
prefixes still alive; those are exactly the per-token scores
:mod:`kgtok.llm.scoring` computes for every candidate, so :func:`trie_greedy`
decodes from them without running the model again.  :func:`generate_pick`
runs Hugging Face ``generate`` with ``prefix_allowed_tokens_fn`` instead
(``decode: generate``; slower; the tests check both agree).

Generative retrieval (``generative_beams``) is not limited to a list: beam
search under a :class:`PrefixTrie` of every entity's answer tokens
(:func:`beam_entities`) returns the entities the LM writes, best first.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PrefixTrie:
    """Token sequences as one map from each prefix to the tokens that may follow (``children``, sorted), and
    from each complete sequence to its index (identical sequences resolve to the first listed).

    Built once with numpy (per depth, the unique (prefix, next token) rows), so each step of constrained
    decoding, over 20 candidates or every entity of the graph, is one dictionary access.
    """

    def __init__(self, sequences: list[list[int]]) -> None:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.width = int(lengths.max(initial=0))
        ids = np.full((len(sequences), self.width), -1, dtype=np.int64)  # (N, width), -1 past the end
        if lengths.sum():
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            ids[np.repeat(np.arange(len(sequences)), lengths), np.arange(lengths.sum()) - starts] = \
                np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences if len(s)])
        self.children: dict[tuple[int, ...], list[int]] = {}
        for depth in range(self.width):
            pairs = np.unique(ids[lengths > depth, :depth + 1], axis=0)  # (unique prefixes+next, depth + 1)
            change = np.flatnonzero(np.any(pairs[1:, :depth] != pairs[:-1, :depth], axis=1)) + 1
            for begin, end in zip(np.r_[0, change], np.r_[change, len(pairs)]):  # one group per prefix
                self.children[tuple(pairs[begin, :depth].tolist())] = pairs[begin:end, depth].tolist()
        self.index: dict[tuple[int, ...], int] = {}
        for i, seq in enumerate(sequences):
            self.index.setdefault(tuple(seq), i)

    def allowed(self, prefix: list[int]) -> list[int]:
        return self.children.get(tuple(prefix), [])

    def lookup(self, sequence: list[int]) -> int:
        """Index of a complete sequence; -1 if it is not one."""
        return self.index.get(tuple(sequence), -1)


def trie_greedy(sequences: list[list[int]], token_logprobs: list[np.ndarray]) -> int:
    """The candidate that greedy decoding restricted to ``sequences`` produces.

    At step j every alive candidate shares the chosen prefix, so its token-j
    log-prob is the model's score of that next token; the best token wins and
    the candidates that continue with it stay alive.
    """
    alive = list(range(len(sequences)))
    step = 0
    while len(alive) > 1:
        going = [i for i in alive if step < len(sequences[i])]
        if not going:  # identical sequences: the first listed (best stage-1 rank)
            break
        best = max(going, key=lambda i: token_logprobs[i][step])
        alive = [i for i in going if sequences[i][step] == sequences[best][step]]
        step += 1
    return alive[0]


def generate_pick(model: Any, prompt: list[int], sequences: list[list[int]], pad_id: int, eos_id: int) -> int:
    """Hugging Face greedy ``generate`` constrained by the candidates' prefix trie."""
    import torch

    trie = PrefixTrie(sequences)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    start = len(prompt)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max(len(s) for s in sequences), pad_token_id=pad_id,
                         eos_token_id=eos_id,
                         prefix_allowed_tokens_fn=lambda _, tokens: trie.allowed(tokens[start:].tolist()))
    found = trie.lookup(out[0, start:].tolist())
    return found if found >= 0 else 0


def beam_entities(model: Any, prompts: list[list[int]], trie: PrefixTrie, beams: int, pad_id: int, eos_id: int,
                  length_penalty: float = 0.0) -> list[list[int]]:
    """Per prompt, the entities beam search writes after it under ``trie``, best first (at most ``beams``).

    The prompts run as one batch, left-padded (masked, positions counted from each prompt's first token):
    one call's decoding steps for the whole batch, which a GPU runs at about the cost of one (on 2 CPU cores
    the tiny LM took about the same time either way: bench/llm_generative_speed.py).  ``length_penalty`` 0
    ranks by the sum of token log-probs (``score: sum``), 1 by their mean.  A beam that leaves the trie (only
    when fewer prefixes than beams are alive) is closed with EOS and dropped.
    """
    import torch

    device = next(model.parameters()).device
    start = max(len(p) for p in prompts)  # every prompt ends here, so the answer starts here in every row
    ids = torch.tensor([[pad_id] * (start - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (start - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams,
                         num_return_sequences=beams, max_new_tokens=trie.width, pad_token_id=pad_id,
                         eos_token_id=eos_id, length_penalty=length_penalty, early_stopping=False,
                         prefix_allowed_tokens_fn=lambda _, tokens: trie.children.get(
                             tuple(tokens[start:].tolist()), [eos_id]))
    rows = out[:, start:].tolist()
    found: list[list[int]] = []
    for query in range(len(prompts)):  # num_return_sequences rows per prompt, in prompt order
        entities: list[int] = []
        for row in rows[query * beams: (query + 1) * beams]:
            end = row.index(eos_id) + 1 if eos_id in row else len(row)
            entity = trie.lookup(row[:end])
            if entity >= 0 and entity not in entities:
                entities.append(entity)
        found.append(entities)
    return found


def filtered_position(entities: list[int], gold: int, known: set[int]) -> float:
    """The gold's filtered rank in a generated list: 1 + the entities before it that are not other known
    answers; infinite (reciprocal rank 0) when the list lacks it."""
    if gold not in entities:
        return float("inf")
    before = entities[: entities.index(gold)]
    return 1.0 + sum(e not in known for e in before)
