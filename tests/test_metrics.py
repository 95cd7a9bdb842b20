"""Filtered realistic ranks and top-k against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kgtok.data.filter_index import FilterIndex
from kgtok.metrics import RankingEvaluator, filtered_top_k, rank_metrics, realistic_rank


def brute_force_rank(scores: np.ndarray, target: int, known: set[int]) -> float:
    true = scores[target]
    others = [s for j, s in enumerate(scores) if j != target and j not in known]
    better = sum(s > true for s in others)
    tied = sum(s == true for s in others)
    return better + 1 + tied / 2.0  # mean of (better + 1) and (better + 1 + tied)


def test_hand_example_with_ties():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.9]])
    # Target 1 ties with 2 and 3; 4 is better but a known true answer (filtered).
    rank = realistic_rank(scores, torch.tensor([1]), np.array([0]), np.array([4]))
    assert rank.tolist() == [2.0]  # optimistic 1, pessimistic 3
    unfiltered = realistic_rank(scores, torch.tensor([1]))
    assert unfiltered.tolist() == [3.0]  # optimistic 2, pessimistic 4
    constant = realistic_rank(torch.zeros(1, 101), torch.tensor([7]))
    assert constant.tolist() == [51.0]  # a constant model is ranked in the middle, not first


def test_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.2, 0.3]])
    assert realistic_rank(scores, torch.tensor([0])).tolist() == [3.0]
    assert realistic_rank(scores, torch.tensor([2])).tolist() == [1.0]


def test_matches_brute_force_on_random_kg():
    rng = np.random.default_rng(0)
    num_entities, num_relations = 40, 3
    triples = np.unique(
        np.stack([rng.integers(0, 40, 500), rng.integers(0, 3, 500), rng.integers(0, 40, 500)], 1), axis=0
    )
    index = FilterIndex(triples, num_entities, num_relations)
    queries = triples[rng.choice(len(triples), 120, replace=False)]
    # Coarse scores make many ties.
    scores = torch.tensor(rng.integers(0, 6, (len(queries), num_entities)), dtype=torch.float32)
    rows, cols = index.tail_pairs(queries[:, 0], queries[:, 1])
    ranks = realistic_rank(scores, torch.as_tensor(queries[:, 2]), rows, cols).numpy()
    for i, (h, r, t) in enumerate(queries.tolist()):
        known = set(index.true_tails(h, r).tolist())
        assert ranks[i] == brute_force_rank(scores[i].numpy(), t, known)
    rows, cols = index.head_pairs(queries[:, 1], queries[:, 2])
    ranks = realistic_rank(scores, torch.as_tensor(queries[:, 0]), rows, cols).numpy()
    for i, (h, r, t) in enumerate(queries.tolist()):
        known = set(index.true_heads(r, t).tolist())
        assert ranks[i] == brute_force_rank(scores[i].numpy(), h, known)


def test_filtered_top_k_keeps_target_and_orders_ties_by_id():
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.5, 0.1, 0.5]])
    rows, cols = np.array([0, 0]), np.array([0, 2])  # 0 and 2 are known answers
    ids, values = filtered_top_k(scores, 4, rows, cols, targets=torch.tensor([2]))
    assert ids.tolist() == [[2, 1, 3, 5]]  # 0 removed; the target 2 kept; ties by id
    assert values[0].tolist() == pytest.approx([0.8, 0.5, 0.5, 0.5])
    ids, _ = filtered_top_k(scores, 2, rows, cols)
    assert ids.tolist() == [[1, 3]]


def test_rank_metrics_and_evaluator():
    assert rank_metrics([1, 2, 4, 20]) == pytest.approx(
        {"mrr": (1 + 0.5 + 0.25 + 0.05) / 4, "mr": 6.75, "hits_at_1": 0.25, "hits_at_3": 0.5, "hits_at_10": 0.75, "count": 4}
    )
    evaluator = RankingEvaluator()
    evaluator.process("head", np.array([1.0, 3.0]), np.array([0, 1]))
    evaluator.process("tail", np.array([2.0]), np.array([1]))
    result = evaluator.compute()
    assert result["head"]["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["tail"]["mrr"] == pytest.approx(0.5)
    assert result["both"]["count"] == 3 and result["both"]["mr"] == pytest.approx(2.0)
    per_relation = evaluator.per_relation(["r0", "r1"])
    assert per_relation["r0"]["mrr"] == 1.0 and per_relation["r1"]["count"] == 2
    with pytest.raises(ValueError, match="side must be"):
        evaluator.process("both", np.array([1.0]), np.array([0]))


def test_paired_comparison_against_hand_computation():
    from kgtok.metrics import format_difference, paired_comparison

    # Hits@1: A hits queries 0-3, B hits 0 and 4: discordant 3 (A only) vs 1 (B only).
    a = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 4.0])
    b = np.array([1.0, 2.0, 2.0, 2.0, 1.0, 4.0])
    out = paired_comparison(a, b, resamples=2000)
    hits = out["hits_at_1"]
    assert hits["a"] == pytest.approx(4 / 6) and hits["b"] == pytest.approx(2 / 6)
    assert hits["difference"] == pytest.approx(2 / 6)
    # exact McNemar: 2 * P(X >= 3 | X ~ Bin(4, 1/2)) = 2 * 5/16
    assert hits["p_value"] == pytest.approx(0.625)
    assert hits["ci_low"] <= hits["difference"] <= hits["ci_high"]
    # MRR: reciprocal-rank differences 0, .5, .5, .5, -.5, 0; all 16 sign flips of the four non-zero ones,
    # |mean| >= .25 (the observed) when |sum of signs| >= 2: 16 - C(4,2) = 10 patterns.
    d = np.array([0.5, 0.5, 0.5, -0.5])
    patterns = [np.array(s) for s in np.ndindex(2, 2, 2, 2)]
    extreme = sum(abs(((1 - 2 * s) * d).mean()) >= 0.25 - 1e-12 for s in patterns)
    assert extreme == 10
    assert out["mrr"]["p_value"] == pytest.approx(10 / 16)
    assert out["mrr"]["difference"] == pytest.approx(1.0 / 6)
    # a constant difference: the bootstrap interval is that point; no discordant query: p = 1
    same = paired_comparison(np.ones(50), np.ones(50), resamples=200)
    assert same["hits_at_1"]["p_value"] == 1.0 and same["mrr"]["ci_low"] == same["mrr"]["ci_high"] == 0.0
    assert format_difference(hits).startswith("+0.333 [")


def test_paired_comparison_interval_matches_normal_approximation():
    from kgtok.metrics import paired_comparison

    rng = np.random.default_rng(1)
    a = rng.integers(1, 5, size=4000).astype(float)
    b = rng.integers(1, 5, size=4000).astype(float)
    out = paired_comparison(a, b, resamples=4000)
    diff = (1 / a) - (1 / b)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert out["mrr"]["ci_low"] == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert out["mrr"]["ci_high"] == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert 0.0 < out["mrr"]["p_value"] <= 1.0
    # a real difference is found: B's ranks one worse
    worse = paired_comparison(a, a + 1, resamples=2000)
    assert worse["mrr"]["p_value"] < 0.001 and worse["hits_at_1"]["p_value"] < 1e-10


def test_paired_comparison_draws_one_set_of_resamples_for_both_measures():
    """With ranks 1 or beyond any list (reciprocal rank ~0), Hits@1 and MRR differ per query by the same amount:
    one set of bootstrap draws gives both the same interval (fresh draws per measure gave two intervals)."""
    from kgtok.metrics import paired_comparison

    rng = np.random.default_rng(2)
    a, b = (np.where(rng.random(300) < share, 1.0, 1e15) for share in (0.5, 0.4))
    out = paired_comparison(a, b, resamples=500)
    assert out["hits_at_1"]["difference"] == pytest.approx(out["mrr"]["difference"], abs=1e-12)
    assert out["hits_at_1"]["ci_low"] == pytest.approx(out["mrr"]["ci_low"], abs=1e-12)
    assert out["hits_at_1"]["ci_high"] == pytest.approx(out["mrr"]["ci_high"], abs=1e-12)


def test_filtered_top_k_fast_path_equals_the_tie_passes():
    """Rows without a tie at the k-th place take one topk; the result equals the passes that settle ties, for
    rows with ties inside the top k, at the k-th place, of -inf, and for k at the number of candidates."""
    from kgtok.metrics import _top_k_with_ties

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (64, 40), generator=generator).float()  # many ties everywhere
    scores[:32] += torch.rand(32, 40, generator=generator) * 0.01 * (torch.arange(40) % 3 == 0)  # some rows clean
    scores[5, :] = -torch.inf
    scores[6, 10:] = -torch.inf
    for k in (1, 5, 10, 39, 40):
        ids, values = filtered_top_k(scores, k)
        want_ids, want_values = _top_k_with_ties(scores, k)
        assert torch.equal(ids, want_ids), k
        assert torch.equal(values, want_values), k
    clean = torch.rand(8, 1000, generator=generator)
    ids, values = filtered_top_k(clean, 20)
    assert torch.equal(ids, torch.topk(clean, 20).indices) and torch.equal(values, torch.topk(clean, 20).values)


def test_a_sampled_sign_flip_p_value_never_reaches_zero():
    """With sampled sign patterns the p-value counts the observed one among them, (1 + extreme) / (n + 1):
    thirty equal differences in 100 draws give 1/101 (exact enumeration of 2^30 patterns is out of reach)."""
    from kgtok.metrics import sign_flip_p_value

    assert sign_flip_p_value(np.ones(30), 100, np.random.default_rng(0)) == pytest.approx(1 / 101)
