"""The CSR filter index against brute-force sets."""

from __future__ import annotations

import numpy as np

from kgtok.data.filter_index import FilterIndex


def random_triples(seed: int, n: int, entities: int, relations: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, entities, n), rng.integers(0, relations, n), rng.integers(0, entities, n)], 1)


def brute_force(triples: np.ndarray) -> tuple[dict, dict]:
    tails, heads = {}, {}
    for h, r, t in triples.tolist():
        tails.setdefault((h, r), set()).add(t)
        heads.setdefault((r, t), set()).add(h)
    return tails, heads


def test_matches_brute_force_sets():
    entities, relations = 30, 4
    triples = random_triples(0, 600, entities, relations)
    triples = np.concatenate([triples, triples[:50]])  # repeats across "splits" count once
    index = FilterIndex(triples, entities, relations)
    tails, heads = brute_force(triples)
    for h in range(entities):
        for r in range(relations):
            assert index.true_tails(h, r).tolist() == sorted(tails.get((h, r), ()))
            assert index.true_heads(r, h).tolist() == sorted(heads.get((r, h), ()))
    assert index.num_tail_queries == len(tails) and index.num_head_queries == len(heads)


def test_batch_pairs_match_brute_force():
    entities, relations = 50, 3
    triples = random_triples(1, 400, entities, relations)
    index = FilterIndex(triples, entities, relations)
    tails, heads = brute_force(triples)
    queries = random_triples(2, 200, entities, relations)  # includes queries with no known answer
    rows, cols = index.tail_pairs(queries[:, 0], queries[:, 1])
    got = {(int(i), int(c)) for i, c in zip(rows, cols)}
    want = {(i, t) for i, (h, r, _) in enumerate(queries.tolist()) for t in tails.get((h, r), ())}
    assert got == want and len(rows) == len(want)
    rows, cols = index.head_pairs(queries[:, 1], queries[:, 2])
    got = {(int(i), int(c)) for i, c in zip(rows, cols)}
    want = {(i, h) for i, (_, r, t) in enumerate(queries.tolist()) for h in heads.get((r, t), ())}
    assert got == want


def test_mask_a_score_matrix():
    triples = np.array([[0, 0, 1], [0, 0, 2], [3, 0, 1]])
    index = FilterIndex(triples, 4, 1)
    scores = np.zeros((2, 4))
    rows, cols = index.tail_pairs(np.array([0, 3]), np.array([0, 0]))
    scores[rows, cols] = -np.inf
    assert np.isinf(scores).tolist() == [[False, True, True, False], [False, True, False, False]]


def test_empty_lookup():
    index = FilterIndex(np.array([[0, 0, 1]]), 2, 1)
    assert index.true_tails(1, 0).size == 0
    rows, cols = index.tail_pairs(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert rows.size == 0 and cols.size == 0
