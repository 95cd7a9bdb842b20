"""Constrained generation over a query's candidates: the answer is always a listed entity.

Greedy decoding restricted by a prefix trie of the candidates' token
sequences needs, at each step, the next-token log-probabilities of the
prefixes still alive; those are exactly the per-token scores
:mod:`kgtok.llm.scoring` computes for every candidate, so :func:`trie_greedy`
decodes from them without running the model again.  :func:`generate_pick`
runs Hugging Face ``generate`` with ``prefix_allowed_tokens_fn`` instead
(``decode: generate``; slower; the tests check both agree).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PrefixTrie:
    """Token sequences of the candidates; ``allowed(prefix)`` lists the tokens that may follow."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.children: dict[tuple[int, ...], set[int]] = {}
        self.index: dict[tuple[int, ...], int] = {}
        for i, seq in enumerate(sequences):
            for j in range(len(seq)):
                self.children.setdefault(tuple(seq[:j]), set()).add(seq[j])
            self.index.setdefault(tuple(seq), i)  # identical sequences resolve to the first listed

    def allowed(self, prefix: list[int]) -> list[int]:
        return sorted(self.children.get(tuple(prefix), ()))

    def lookup(self, sequence: list[int]) -> int:
        """Candidate index of a complete sequence; -1 if it is not one."""
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
