"""Scoring functions: the batched paths agree with per-triple scoring, both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kgtok.data.filter_index import FilterIndex
from kgtok.embed.models import MODELS, build_model
from kgtok.embed.ranking import rank_triples
from kgtok.metrics import filtered_top_k, realistic_rank


def make(name: str, entities: int = 13, relations: int = 4, dim: int = 6):
    model = build_model(name, entities, relations, dim, margin=3.0)
    model.reset_parameters(torch.Generator().manual_seed(0), scale=0.5 if name in ("complex", "distmult") else None)
    return model


def brute_scores(model, h, r, t_all) -> torch.Tensor:
    triples = torch.stack([torch.full_like(t_all, h), torch.full_like(t_all, r), t_all], 1)
    return model.score_triples(triples)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_entity_scores_match_single_triples(name):
    model = make(name)
    entities = torch.arange(model.num_entities)
    heads, relations = torch.tensor([0, 5, 12]), torch.tensor([1, 3, 0])
    with torch.no_grad():
        tails = model.score_all_tails(heads, relations)
        head_scores = model.score_all_heads(relations, heads)  # heads used as tails here
        for i in range(3):
            expected = brute_scores(model, int(heads[i]), int(relations[i]), entities)
            torch.testing.assert_close(tails[i], expected, rtol=1e-5, atol=1e-5)
            # score(e, r, t) for every e
            triples = torch.stack([entities, torch.full_like(entities, relations[i]), torch.full_like(entities, heads[i])], 1)
            torch.testing.assert_close(head_scores[i], model.score_triples(triples), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compare_each_matches_compare(name):
    model = make(name)
    q = model.tail_query(torch.tensor([1, 2]), torch.tensor([0, 3]))
    candidates = torch.tensor([[4, 7, 1], [0, 2, 9]])
    with torch.no_grad():
        each = model.compare_each(q, model.entity[candidates])
        full = model.compare(q, model.entity)
    torch.testing.assert_close(each, full.gather(1, candidates))


def test_complex_score_is_re_of_trilinear_product():
    model = make("complex", dim=3)
    h, r, t = 2, 1, 7
    to_c = lambda x: torch.complex(*x.chunk(2))  # noqa: E731
    expected = (to_c(model.entity[h]) * to_c(model.relation[r]) * torch.conj(to_c(model.entity[t]))).sum().real
    score = model.score_triples(torch.tensor([[h, r, t]]))[0]
    torch.testing.assert_close(score, expected)


def test_rotate_relations_are_unit_rotations():
    model = make("rotate", dim=5)
    h, r, t = 3, 2, 8
    to_c = lambda x: torch.complex(*x.chunk(2))  # noqa: E731
    rotation = torch.polar(torch.ones(5), model.phases(torch.tensor([r]))[0])
    expected = model.margin - (to_c(model.entity[h]) * rotation - to_c(model.entity[t])).abs().sum()
    torch.testing.assert_close(model.score_triples(torch.tensor([[h, r, t]]))[0], expected)


@pytest.mark.parametrize("name, reciprocal", [("rotate", False), ("complex", True), ("transe", False)])
def test_rank_triples_matches_brute_force(name, reciprocal):
    base_relations = 3
    model = make(name, entities=17, relations=base_relations * (2 if reciprocal else 1))
    rng = np.random.default_rng(0)
    triples = np.unique(np.stack([rng.integers(0, 17, 80), rng.integers(0, 3, 80), rng.integers(0, 17, 80)], 1), axis=0)
    index = FilterIndex(triples, 17, base_relations)
    test = torch.as_tensor(triples[:25])
    ranked = rank_triples(model, test, index, reciprocal=reciprocal, num_base_relations=base_relations,
                          batch_size=4, top_k=5)
    entities = torch.arange(17)
    with torch.no_grad():
        for i, (h, r, t) in enumerate(test.tolist()):
            tail_scores = brute_scores(model, h, r, entities)
            if reciprocal:
                head_scores = brute_scores(model, t, r + base_relations, entities)
            else:
                head_scores = model.score_triples(torch.stack(
                    [entities, torch.full_like(entities, r), torch.full_like(entities, t)], 1))
            known_t = index.true_tails(h, r)
            known_h = index.true_heads(r, t)
            want_t = realistic_rank(tail_scores[None], torch.tensor([t]), np.zeros(len(known_t), int), known_t)
            want_h = realistic_rank(head_scores[None], torch.tensor([h]), np.zeros(len(known_h), int), known_h)
            assert ranked.rank[i] == pytest.approx(float(want_t[0]))
            assert ranked.rank[len(test) + i] == pytest.approx(float(want_h[0]))
            # The gold's probability: a softmax over the gold and every entity that is not another known answer.
            for side, scores, gold, known in ((0, tail_scores, t, known_t), (1, head_scores, h, known_h)):
                keep = torch.ones(len(scores), dtype=torch.bool)
                keep[torch.as_tensor(known, dtype=torch.long)] = False
                keep[gold] = True
                want_p = torch.exp(scores[gold] - torch.logsumexp(scores[keep], 0))
                assert ranked.gold_probability[side * len(test) + i] == pytest.approx(float(want_p), rel=1e-4)
            # Candidates: no other known answer, the gold kept, best first.
            others = set(known_t.tolist()) - {t}
            assert not others & set(ranked.candidates[i].tolist())
            if ranked.rank[i] <= 5 and float(ranked.rank[i]).is_integer():
                assert t in ranked.candidates[i].tolist()
            assert np.all(np.diff(ranked.candidate_scores[i]) <= 0)
            np.testing.assert_allclose(ranked.candidate_scores[i], tail_scores[ranked.candidates[i]].numpy(), rtol=1e-5)
    assert ranked.direction.tolist() == [0] * 25 + [1] * 25
    assert ranked.gold.tolist() == test[:, 2].tolist() + test[:, 0].tolist()
    assert np.all((ranked.gold_probability > 0) & (ranked.gold_probability <= 1))
    # Batch size does not change results (bounded memory, same answers).
    again = rank_triples(model, test, index, reciprocal=reciprocal, num_base_relations=base_relations,
                         batch_size=1000, top_k=5)
    np.testing.assert_array_equal(again.candidates, ranked.candidates)
    np.testing.assert_allclose(again.rank, ranked.rank)


@pytest.mark.parametrize("name", ["complex", "distmult"])
def test_cpu_ranking_in_blocks_equals_one_product(name, monkeypatch):
    """On a CPU, ranking caps the batch by its score floats and scores candidates a block at a time; ranks,
    probabilities and candidates must equal one whole product over one batch (blocks of 4 of 17, batches of 16)."""
    from kgtok.embed import models, ranking

    model = make(name, entities=17, relations=6)
    rng = np.random.default_rng(3)
    triples = np.unique(np.stack([rng.integers(0, 17, 60), rng.integers(0, 3, 60), rng.integers(0, 17, 60)], 1), axis=0)
    index = FilterIndex(triples, 17, 3)
    test = torch.as_tensor(triples[:20])
    whole = rank_triples(model, test, index, reciprocal=True, num_base_relations=3, batch_size=1000, top_k=5)
    monkeypatch.setattr(models, "_SCORE_BLOCK", 4)
    monkeypatch.setattr(ranking, "_CPU_SCORE_FLOATS", 2 * 17)
    blocked = rank_triples(model, test, index, reciprocal=True, num_base_relations=3, batch_size=1000, top_k=5)
    for field in ("rank", "gold_score", "gold_probability", "candidates", "candidate_scores"):
        np.testing.assert_allclose(getattr(blocked, field), getattr(whole, field), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["complex", "distmult"])
def test_one_gather_training_terms_equal_the_separate_ones(name):
    triples = torch.tensor([[0, 1, 5], [5, 3, 12], [7, 0, 7], [2, 2, 9]])
    grads = []
    for fused in (True, False):
        model = make(name)
        if fused:
            queries, factors = model.one_vs_all_terms(triples)
            scores = model.compare(queries, model.entity)
        else:
            scores, factors = model.score_all_tails(triples[:, 0], triples[:, 1]), model.factors(triples)
        loss = torch.nn.functional.cross_entropy(scores, triples[:, 2]) + sum(f.pow(3).sum() for f in factors)
        loss.backward()
        grads.append((float(loss), model.entity.grad.clone(), model.relation.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-5, atol=1e-6)


def test_rank_triples_with_nan_golds_and_ties_matches_the_explicit_filter():
    """rank_triples filters one copy of the scores in place (the other answers at -inf); a NaN gold would tie
    with those, so its batch must rank as realistic_rank does with the explicit mask; tied candidates still
    come out by id."""
    base_relations = 3
    model = make("complex", entities=17, relations=2 * base_relations)
    with torch.no_grad():
        model.entity[3] = float("nan")  # every score of entity 3 is NaN
        model.entity[9] = model.entity[5]  # 5 and 9 tie everywhere
        model.entity[11] = model.entity[5]
    rng = np.random.default_rng(1)
    triples = np.unique(np.stack([rng.integers(0, 17, 90), rng.integers(0, 3, 90), rng.integers(0, 17, 90)], 1), axis=0)
    index = FilterIndex(triples, 17, base_relations)
    test = torch.as_tensor(triples[:30])
    assert 3 in test[:, 2].tolist() or 3 in test[:, 0].tolist()
    ranked = rank_triples(model, test, index, reciprocal=True, num_base_relations=base_relations, batch_size=4,
                          top_k=5)
    entities = torch.arange(17)
    with torch.no_grad():
        for i, (h, r, t) in enumerate(test.tolist()):
            for row, (query, relation, gold, known) in enumerate(
                    [(h, r, t, index.true_tails(h, r)), (t, r + base_relations, h, index.true_heads(r, t))]):
                scores = brute_scores(model, query, relation, entities)[None]
                zeros = np.zeros(len(known), int)
                want = realistic_rank(scores, torch.tensor([gold]), zeros, known)
                ids, values = filtered_top_k(scores, 5, zeros, known, targets=torch.tensor([gold]))
                at = row * len(test) + i
                assert ranked.rank[at] == float(want[0])
                assert ranked.candidates[at].tolist() == ids[0].tolist()
    assert ranked.rank[(ranked.gold == 3)].min() > 1  # a NaN gold ranks last
