"""Stage 5c's ranker table: one registration per ranker feeds the metrics, the summary keys and the tables."""

from __future__ import annotations

import numpy as np
import pytest

from kgtok.llm import rankers as ranker_module
from kgtok.llm.rankers import (MEASURES, PredictionRows, prediction_row, rank_all, ranker, ranking_metrics, rankers,
                               summary_keys)


def rows() -> list[dict]:
    """Three queries with three candidates each: the LM's pick, scores and a fused pick."""
    return [
        {"id": "q0", "direction": "tail", "relation": "r", "gold": 7, "stage1_rank": 2.0, "gold_index": 1,
         "pick": 7, "pick_position": 2, "scores": [-3.0, -1.0, -2.0], "fused_pick": 5, "fused_pick_position": 1,
         "fused_scores": [-1.0, -2.0, -3.0]},
        {"id": "q1", "direction": "head", "relation": "r", "gold": 4, "stage1_rank": 1.0, "gold_index": 0,
         "pick": 9, "pick_position": 3, "scores": [-2.0, -2.0, -1.0], "fused_pick": 4, "fused_pick_position": 1,
         "fused_scores": [-1.0, -2.0, -3.0]},
        {"id": "q2", "direction": "head", "relation": "s", "gold": 1, "stage1_rank": 30.0, "gold_index": -1,
         "pick": 2, "pick_position": 1, "scores": [-1.0, -2.0, -3.0], "fused_pick": 2, "fused_pick_position": 1,
         "fused_scores": [-1.0, -2.0, -3.0]},
    ]


def test_registered_rankers_and_their_summary_keys():
    assert [r.key for r in rankers()] == ["retriever", "dift", "rerank", "fused_pick", "fused_rerank", "dift_class",
                                          "rerank_class", "generative"]
    assert all(r.label for r in rankers())
    assert summary_keys(("hits_at_1", "mrr"))[:3] == ["retriever_hits_at_1", "dift_hits_at_1", "rerank_hits_at_1"]
    assert len(summary_keys()) == len(MEASURES) * len(rankers())
    with pytest.raises(ValueError, match="twice"):
        ranker("dift", "again")(lambda r: None)


def test_generative_ranks_are_the_beam_positions_and_zero_outside():
    with_beam = [{**row, "generative_rank": rank} for row, rank in zip(rows(), [1.0, None, 3.0])]
    ranks = rank_all(with_beam)
    np.testing.assert_array_equal(ranks["generative"], [1.0, np.inf, 3.0])
    metrics, _ = ranking_metrics(with_beam, ranks)
    assert metrics["generative"]["both"]["mrr"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert metrics["generative"]["both"]["hits_at_1"] == pytest.approx(1 / 3)
    assert "generative" not in rank_all(rows())  # off: no section


def test_rankers_rank_from_the_rows_and_skip_what_the_run_lacks():
    ranks = rank_all(rows())
    assert list(ranks) == ["retriever", "dift", "rerank", "fused_pick", "fused_rerank"]  # no class picks stored
    np.testing.assert_array_equal(ranks["retriever"], [2.0, 1.0, 30.0])
    np.testing.assert_array_equal(ranks["dift"], [1.0, 2.0, 30.0])  # right pick; pick below the gold: +1; unlisted
    np.testing.assert_array_equal(ranks["rerank"], [1.0, 2.5, 30.0])  # q1: tied with another candidate
    np.testing.assert_array_equal(ranks["fused_pick"], [2.0, 1.0, 30.0])
    metrics, per_relation = ranking_metrics(rows(), ranks)
    assert metrics["dift"]["both"]["mrr"] == pytest.approx(np.mean([1, 1 / 2, 1 / 30]))
    assert metrics["dift"]["head"]["count"] == 2 and set(per_relation["dift"]) == {"r", "s"}


def test_a_new_ranker_is_one_function(monkeypatch):
    monkeypatch.setattr(ranker_module, "_RANKERS", dict(ranker_module._RANKERS))  # registered for this test only

    @ranker("oracle", "the gold itself")
    def oracle(view: PredictionRows) -> np.ndarray:
        return np.ones(len(view.rows))

    assert rankers()[-1].label == "the gold itself" and "oracle_mrr" in summary_keys()
    ranks = rank_all(rows())
    assert ranking_metrics(rows(), ranks)[0]["oracle"]["both"]["hits_at_1"] == 1.0


def test_prediction_row_stores_what_each_ranker_needs():
    record = {"id": "q", "direction": "tail", "triple": ["h", "r", "t"], "gold": 20, "stage1_rank": 2.0,
              "candidates": [10, 20, 30], "candidate_text": ["a", "b", "c"], "candidate_scores": [5.0, 1.0, 0.0]}
    token_logprobs = [np.array([-2.0, -2.0]), np.array([-1.0]), np.array([-1.0, -2.0])]  # sums -4, -1, -3
    row = prediction_row(record, [[1, 2], [3], [4, 5]], token_logprobs, 1, score="mean", fusion_weight=2.0,
                         classes=np.array([-1] * 10 + [0] + [-1] * 9 + [1] + [-1] * 9 + [1]))
    assert (row["pick"], row["pick_position"], row["pick_text"], row["gold_index"]) == (20, 2, "b", 1)
    assert row["scores"] == [-2.0, -1.0, -1.5]  # mean: per answer token
    assert row["fused_pick"] == 10  # the retriever's prior outweighs the LM at w = 2
    assert (row["class_pick"], row["class_pick_position"]) == (20, 2)
    plain = prediction_row(record, [[1, 2], [3], [4, 5]], token_logprobs, 1, score="sum", fusion_weight=0.0,
                           classes=None)
    assert "fused_pick" not in plain and "class_pick" not in plain and plain["scores"] == [-4.0, -1.0, -3.0]


def test_fused_scores_use_the_configured_sequence_score():
    """score=mean: the fused ranker adds the prior to the mean log-probs, not to their sums."""
    from kgtok.llm.rankers import log_prior

    record = {"id": "q", "direction": "tail", "triple": ["h", "r", "t"], "gold": 20, "stage1_rank": 2.0,
              "candidates": [10, 20, 30], "candidate_text": ["a", "b", "c"], "candidate_scores": [5.0, 1.0, 0.0]}
    token_logprobs = [np.array([-2.0, -2.0]), np.array([-1.0]), np.array([-1.0, -2.0])]  # sums -4, -1, -3
    row = prediction_row(record, [[1, 2], [3], [4, 5]], token_logprobs, 1, score="mean", fusion_weight=2.0,
                         classes=None)
    expected = np.array([-2.0, -1.0, -1.5]) + 2.0 * log_prior(record["candidate_scores"])
    np.testing.assert_allclose(row["fused_scores"], expected, rtol=1e-12)  # unrounded: the re-rank sees the pick's


def test_constrained_score_is_the_trie_decoding_probability():
    """Only tokens that tell the alive candidates apart count: a token after the trie has decided adds nothing
    (the raw sum lets it outweigh the decision), and the k probabilities sum to 1 with the trie pick on top."""
    from kgtok.llm.decoding import trie_greedy
    from kgtok.llm.rankers import sequence_scores

    answers = [[1, 2, 9], [1, 3, 9], [4, 9]]  # 0 and 1 share token 1; 9 ends every answer (EOS)
    token_logprobs = [np.array([-1.0, -0.5, -5.0]), np.array([-1.0, -3.0, -0.1]), np.array([-2.0, -7.0])]
    scores = sequence_scores(token_logprobs, answers, "constrained")
    first = -1.0 - np.logaddexp(-1.0, -2.0)  # token 1 against token 4
    np.testing.assert_allclose(scores, [first - 0.5 - np.logaddexp(-0.5, -3.0), first - 3.0 - np.logaddexp(-0.5, -3.0),
                                        -2.0 - np.logaddexp(-1.0, -2.0)])
    np.testing.assert_allclose(np.exp(scores).sum(), 1.0)
    assert int(np.argmax(scores)) == trie_greedy(answers, token_logprobs) == 0
    assert int(np.argmax(sequence_scores(token_logprobs, answers, "sum"))) == 1  # the raw sum follows the noise


def test_fusion_weight_at_the_grid_top_extends_the_grid_or_says_retriever_only():
    from kgtok.llm.rankers import choose_fusion_weight

    # queries 1-2: the LM is wrong by 40 log-prob, the retriever right by 3 (needs w > 40/3);
    # query 3: the LM right by 100, the retriever wrong by 3 (needs w < 100/3): the optimum 16 lies past 4
    priors = [np.array([0.0, -3.0]), np.array([-3.0, 0.0]), np.array([-3.0, 0.0])]
    lm = [np.array([-40.0, 0.0]), np.array([0.0, -40.0]), np.array([0.0, -100.0])]
    gold, stage1 = np.array([0, 1, 0]), np.array([1.0, 1.0, 2.0])
    chosen = choose_fusion_weight(lm, priors, gold, stage1, grid=(0.0, 1.0, 4.0))
    assert chosen["weight"] == 16.0 and chosen["grid"] == [0.0, 1.0, 4.0, 16.0, 64.0]
    assert chosen["position"] == "interior" and chosen["curve"]["64.0"] < 1.0
    # the retriever alone is best whatever the weight: reported as retriever only, grid extended to the limit
    always = choose_fusion_weight([np.array([-1.0, 0.0])], [np.array([0.0, -1e-6])], np.array([0]),
                                  np.array([1.0]), grid=(0.0, 1.0), limit=64.0)
    assert always["position"] == "retriever_only" and always["grid"][-1] == 64.0
    plateau = choose_fusion_weight(lm[:2], priors[:2], gold[:2], stage1[:2], grid=(0.0, 1.0, 4.0), limit=1024.0)
    assert plateau["weight"] == 16.0 and plateau["position"] == "retriever_only" and plateau["grid"][-1] == 1024.0
    lm_only = choose_fusion_weight([np.array([0.0, -1.0])], [np.array([-5.0, 0.0])], np.array([0]), np.array([2.0]))
    assert lm_only["weight"] == 0.0 and lm_only["position"] == "lm_only"
