"""Stage 5c's rankers: from the LM's scores to the filtered rank of every query's gold.

Per query, :func:`prediction_row` stores what the LM chose (METHOD.md stage 5):

- ``pick``: constrained generation, the candidate greedy trie decoding gives;
- ``scores``: every candidate's sequence score (``score: sum | mean | constrained``);
- ``fused_scores``, ``fused_pick``: LM log-likelihood + w x log softmax of the
  stage-1 scores (:func:`log_prior`; w from ``fusion_weight``, or chosen on
  LM-valid by :func:`choose_fusion_weight`);
- ``class_pick``: a class constraint from the candidates' own scores (:func:`constrain_to_class`; not yet
  ReaLM's, where the LM predicts the class).

After the last query every registered ranker turns the rows into ranks: a
pick by the DIFT rule (:func:`kgtok.metrics.dift_rank`), scores by re-ranking
the list (:func:`kgtok.metrics.rerank_rank`).  The registry is the one list
of rankers: ``metrics.json`` has a section per ranker, the manifest
``<key>_mrr``, ``<key>_hits_at_1``..., and the CLI's and the report's tables a
row each.  A new ranker is one function here::

    @ranker("rerank_top3", "LM re-rank of stage 1's top 3")
    def rerank_top3(rows: PredictionRows) -> np.ndarray | None:
        ...  # (n,) rank of each gold, or None when this run lacks what it needs

(plus a field in :func:`prediction_row` if it needs a per-query number the
rows do not hold yet).  This module imports numpy only: the CLI reads the
registry without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MEASURES = ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")  # per ranker in the manifest: <key>_<measure>
FUSION_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)  # 64: stage-1 order, LM breaks near-ties
CLASS_PENALTY = 1e4  # class_scores: candidates outside the predicted class rank below every one inside
FUSION_GRID_LIMIT = 4096.0  # a best weight at the grid's top extends it (x4) up to here, else "retriever only"


class PredictionRows:
    """The prediction rows of one evaluation, as the columns rankers read."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.stage1 = np.array([p["stage1_rank"] for p in rows])  # (n,) the retriever's filtered rank
        self.gold_index = np.array([p["gold_index"] for p in rows])  # (n,) -1: gold not listed

    def picked(self, field: str) -> np.ndarray | None:
        """DIFT-rule ranks of the candidate in ``field`` (position in ``<field>_position``); None if not stored."""
        from kgtok.metrics import dift_rank

        if not all(field in p for p in self.rows):
            return None
        positions = np.array([p[f"{field}_position"] for p in self.rows])
        return dift_rank(self.stage1, positions, np.array([p[field] == p["gold"] for p in self.rows]),
                         self.versus_gold(positions))

    def versus_gold(self, positions: np.ndarray) -> np.ndarray | None:
        """(n,) sign of the stage-1 score of the candidate at each 1-based position minus the gold's (+1 where
        the gold is not listed); None for rows without ``stage1_scores`` (written before kgtok stored them)."""
        if not self.rows or not all("stage1_scores" in p for p in self.rows):
            return None
        scores = padded([p["stage1_scores"] for p in self.rows])
        rows = np.arange(len(self.rows))
        sign = np.sign(scores[rows, positions - 1] - scores[rows, np.maximum(self.gold_index, 0)])
        return np.where(self.gold_index >= 0, sign, 1.0)

    def reranked(self, field: str) -> np.ndarray | None:
        """Ranks when each list is re-ordered by the (k,) scores in ``field``; None if not stored."""
        if not all(field in p for p in self.rows):
            return None
        return rerank_lists([p[field] for p in self.rows], self.gold_index, self.stage1)


def padded(lists: list[list[float]] | list[np.ndarray]) -> np.ndarray:
    """(n, longest) scores of lists of any length, -inf past each list's end (never above a listed candidate):
    a list is shorter than top_k where the filter leaves fewer entities."""
    out = np.full((len(lists), max((len(x) for x in lists), default=0)), -np.inf)
    for row, values in enumerate(lists):  # one row per query
        out[row, : len(values)] = values
    return out


def rerank_lists(lists: list[list[float]] | list[np.ndarray], gold_index: np.ndarray, stage1: np.ndarray
                 ) -> np.ndarray:
    """:func:`kgtok.metrics.rerank_rank` of score lists of any length (each gold ranked in its own list)."""
    from kgtok.metrics import rerank_rank

    return rerank_rank(padded(lists), gold_index, stage1, lengths=np.array([len(x) for x in lists]))


@dataclass(frozen=True)
class Ranker:
    key: str  # metrics.json section; manifest keys <key>_mrr, <key>_hits_at_1, ...
    label: str  # its row in the CLI's and the report's tables
    rank: Callable[[PredictionRows], np.ndarray | None]  # (n,) rank of each gold; None: not in this run


_RANKERS: dict[str, Ranker] = {}


def ranker(key: str, label: str) -> Callable[[Callable[[PredictionRows], np.ndarray | None]], Any]:
    """Register a rank function under ``key`` with its table ``label`` (order of registration = order shown)."""

    def register(rank: Callable[[PredictionRows], np.ndarray | None]) -> Callable[..., Any]:
        if key in _RANKERS:
            raise ValueError(f"ranker {key!r} is registered twice")
        _RANKERS[key] = Ranker(key, label, rank)
        return rank

    return register


def rankers() -> tuple[Ranker, ...]:
    """Every registered ranker, in the order metrics and tables show them."""
    return tuple(_RANKERS.values())


def summary_keys(measures: tuple[str, ...] = MEASURES) -> list[str]:
    """Manifest metric keys of every registered ranker, measure by measure: ``retriever_mrr``, ``dift_mrr``..."""
    return [f"{r.key}_{measure}" for measure in measures for r in rankers()]


@ranker("retriever", "stage 1 (retriever)")
def retriever(rows: PredictionRows) -> np.ndarray:
    return rows.stage1


@ranker("dift", "LM pick (DIFT rule)")
def dift(rows: PredictionRows) -> np.ndarray | None:
    return rows.picked("pick")


@ranker("rerank", "LM re-rank")
def rerank(rows: PredictionRows) -> np.ndarray | None:
    return rows.reranked("scores")


@ranker("fused_pick", "LM pick + stage-1 prior (fused)")
def fused_pick(rows: PredictionRows) -> np.ndarray | None:
    return rows.picked("fused_pick")


@ranker("fused_rerank", "LM + stage-1 prior (fused)")
def fused_rerank(rows: PredictionRows) -> np.ndarray | None:
    return rows.reranked("fused_scores")


@ranker("dift_class", "LM pick + class constraint")
def dift_class(rows: PredictionRows) -> np.ndarray | None:
    return rows.picked("class_pick")


@ranker("rerank_class", "LM re-rank + class constraint")
def rerank_class(rows: PredictionRows) -> np.ndarray | None:
    """The re-rank with the LM's predicted class first (class_prefix runs; trie picks already keep to it)."""
    return rows.reranked("class_scores")


@ranker("generative", "LM generation over all entities (beam)")
def generative(rows: PredictionRows) -> np.ndarray | None:
    """The gold's filtered position in the LM's beam of entities (``generative_beams``); none there: inf."""
    if not all("generative_rank" in p for p in rows.rows):
        return None
    return np.array([np.inf if p["generative_rank"] is None else p["generative_rank"] for p in rows.rows])


def rank_all(predictions: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Ranks of the gold per registered ranker that this run's rows support."""
    rows = PredictionRows(predictions)
    ranks = {r.key: r.rank(rows) for r in rankers()}
    return {key: values for key, values in ranks.items() if values is not None}


def ranking_metrics(predictions: list[dict[str, Any]], ranks: dict[str, np.ndarray]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per ranker: both/head/tail metrics, and metrics per relation (PyKEEN's rank-based evaluator)."""
    from kgtok.metrics import RankingEvaluator

    relation_names = sorted({p["relation"] for p in predictions})
    relation_ids = np.array([relation_names.index(p["relation"]) for p in predictions])
    head = np.array([p["direction"] == "head" for p in predictions])
    metrics: dict[str, Any] = {}
    per_relation: dict[str, Any] = {}
    for key, values in ranks.items():
        evaluator = RankingEvaluator()
        evaluator.process("head", values[head], relation_ids[head])
        evaluator.process("tail", values[~head], relation_ids[~head])
        metrics[key] = evaluator.compute()
        per_relation[key] = evaluator.per_relation(relation_names)
    return metrics, per_relation


# ----------------------------------------------------------------------------
# Per query: what the LM chose
# ----------------------------------------------------------------------------


def gold_position(record: dict[str, Any]) -> int:
    """0-based index of the gold entity among the record's candidates; -1 when it is not listed."""
    return record["candidates"].index(record["gold"]) if record["gold"] in record["candidates"] else -1


def log_prior(candidate_scores: list[float] | np.ndarray) -> np.ndarray:
    """Log softmax of stage-1 scores over the listed candidates: the retriever's own belief."""
    prior = np.asarray(candidate_scores, dtype=np.float64)
    prior = prior - prior.max()
    return prior - np.log(np.exp(prior).sum())


def constrain_to_class(pick: int, scores: np.ndarray, candidate_classes: np.ndarray) -> int:
    """Keep the pick if its class has the most candidate probability mass, else the best of that class.

    The "predicted class" is the one with the most mass under the softmax of the candidates' sequence scores:
    the LM never predicts a class here, so this is *not* ReaLM's constraint (where the LM generates the
    target's class before the entity, trained as part of the answer); issue 14 item 6 keeps that open.
    """
    known = candidate_classes >= 0
    if not known.any():
        return pick
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    labels, inverse = np.unique(candidate_classes[known], return_inverse=True)
    predicted = labels[np.argmax(np.bincount(inverse, weights=probs[known]))]
    if candidate_classes[pick] == predicted:
        return pick
    members = np.flatnonzero(candidate_classes == predicted)
    return int(members[np.argmax(scores[members])])


def constrained_logprobs(answers: list[list[int]], token_logprobs: list[np.ndarray]) -> np.ndarray:
    """(k,) log-probability of each candidate under decoding restricted to the candidates' prefix trie.

    At each trie node the LM's log-probs of the tokens that may follow are renormalised over those tokens
    alone, so a token every alive candidate shares, or one written after a candidate is the only one left,
    adds nothing.  The raw sum instead adds the log-probs of all of them: an answer "name <codes>" whose
    code tokens the LM has not learnt (loss about 15 per token) is ranked by noise past its name, where the
    greedy trie pick has long decided (re-rank 0.12 against pick 0.35 on the WN18RR 6k subset,
    bench/results/llm_wn18rr_6k_smollm2_calibrated.md).  The k values are a distribution over the
    candidates (they sum to 1 in probability), whose greedy path is the trie pick.  Candidates sharing a
    prefix share its next-token log-probs (the same context), so they are read off the first that has them.
    """
    children: dict[tuple[int, ...], dict[int, float]] = {}  # prefix -> next token -> log-prob
    for answer, logprobs in zip(answers, token_logprobs):  # k candidates of a few tokens: one query's trie
        for step, token in enumerate(answer):
            children.setdefault(tuple(answer[:step]), {}).setdefault(token, float(logprobs[step]))
    norm = {prefix: float(np.logaddexp.reduce(list(following.values()))) for prefix, following in children.items()}
    return np.array([sum(float(lp) - norm[tuple(answer[:step])] for step, lp in enumerate(logprobs))
                     for answer, logprobs in zip(answers, token_logprobs)])


def sequence_scores(token_logprobs: list[np.ndarray], answers: list[list[int]], score: str) -> np.ndarray:
    """(k,) candidate scores: the sum of each answer's token log-probs, their mean (``score: mean``), or its
    log-probability under the candidates' trie (``score: constrained``, :func:`constrained_logprobs`)."""
    if score == "constrained":
        return constrained_logprobs(answers, token_logprobs)
    totals = np.array([np.sum(lp, dtype=np.float64) for lp in token_logprobs])
    return totals if score == "sum" else totals / np.array([len(a) for a in answers])


def predicted_class_pick(pick: int, scores: np.ndarray, candidate_classes: np.ndarray, class_scores: np.ndarray
                         ) -> tuple[int, int]:
    """ReaLM: (predicted class, pick).  The LM's class is the one whose class token it finds likeliest
    (``class_scores``, among the candidates' classes); a pick of another class is replaced by the
    best-scored candidate of the predicted class."""
    predicted = int(candidate_classes[int(np.argmax(class_scores))])
    if candidate_classes[pick] == predicted:
        return predicted, pick
    members = np.flatnonzero(candidate_classes == predicted)
    return predicted, int(members[np.argmax(scores[members])])


def prediction_row(record: dict[str, Any], answers: list[list[int]], token_logprobs: list[np.ndarray],
                   pick: int, *, score: str, fusion_weight: float, classes: np.ndarray | None,
                   class_scores: np.ndarray | None = None) -> dict[str, Any]:
    """One line of predictions.jsonl: the query, the gold, and what each ranker needs of the LM's choices.

    ``answers``: candidate token ids; ``token_logprobs``: per candidate, its tokens' log-probs; ``pick``: the
    constrained-generation choice; ``fusion_weight`` 0: no fused fields; ``class_scores`` (class_prefix
    records): ReaLM's class pick from the LM's predicted class; else ``classes`` (None: no class pick): the
    candidate-mass constraint.
    The fused scores add the prior to the same sequence scores the re-rank uses (``score: mean`` or ``constrained``).
    """
    scores = sequence_scores(token_logprobs, answers, score)
    row = {"id": record["id"], "direction": record["direction"], "relation": record["triple"][1],
           "gold": record["gold"], "stage1_rank": record["stage1_rank"],
           "pick": record["candidates"][pick], "pick_position": pick + 1,
           "pick_text": record["candidate_text"][pick], "gold_index": gold_position(record),
           "scores": [float(s) for s in scores]}  # unrounded: the re-rank must see what the pick saw
    if record.get("candidate_scores") is not None:  # a wrong pick tied with the gold in stage 1 (dift_rank)
        row["stage1_scores"] = [float(s) for s in record["candidate_scores"]]
    if fusion_weight > 0:
        fused = scores + fusion_weight * log_prior(record["candidate_scores"])
        best = int(np.argmax(fused))
        row.update(fused_scores=[float(s) for s in fused],
                   fused_pick=record["candidates"][best], fused_pick_position=best + 1)
    if class_scores is not None:
        predicted, picked = predicted_class_pick(pick, scores, np.asarray(record["candidate_classes"]),
                                                 class_scores)
        inside = np.asarray(record["candidate_classes"]) == predicted
        row.update(class_pick=record["candidates"][picked], class_pick_position=picked + 1,
                   predicted_class=predicted, gold_class=record["gold_class"],
                   class_scores=[float(s) for s in np.where(inside, scores, scores - CLASS_PENALTY)])
    elif classes is not None:
        picked = constrain_to_class(pick, scores, classes[np.asarray(record["candidates"])])
        row.update(class_pick=record["candidates"][picked], class_pick_position=picked + 1)
    return row


def fused_rerank_ranks(lm_scores: list[np.ndarray], priors: list[np.ndarray], weight: float, gold_index: np.ndarray,
                       stage1_ranks: np.ndarray) -> np.ndarray:
    """(n,) gold ranks when each list is ordered by LM score + ``weight`` x stage-1 log-prior (0: the LM alone)."""
    return rerank_lists([t + weight * p if weight else t for t, p in zip(lm_scores, priors)], gold_index,
                        stage1_ranks)


def choose_fusion_weight(lm_scores: list[np.ndarray], priors: list[np.ndarray], gold_index: np.ndarray,
                         stage1_ranks: np.ndarray, grid: tuple[float, ...] = FUSION_GRID,
                         limit: float = FUSION_GRID_LIMIT) -> dict[str, Any]:
    """The grid weight whose fused re-rank MRR is highest on held-out queries (ties: the smaller weight).

    The LM and the retriever err on different queries; how much to trust each
    depends on the backbone and the data, so the weight is learnt on LM-valid
    rather than fixed (choosing it on test would report an optimistic number).
    A best MRR at the top of the grid (alone or tied) is no optimum: the grid
    grows (x4) until the top is worse than the best, or up to ``limit``, where
    the answer is "retriever only" (its order, the LM breaking ties, is as
    good as any weight; the weight kept is still the smallest best).
    ``position`` says which: ``interior``, ``lm_only`` (w = 0 best, the grid's
    other end), ``grid_bottom`` (the smallest weight of a grid without 0) or
    ``retriever_only``.
    """
    grid = tuple(sorted(grid))
    curve: dict[float, float] = {}

    def mrr(w: float) -> float:
        return float(np.mean(1.0 / fused_rerank_ranks(lm_scores, priors, w, gold_index, stage1_ranks)))

    while True:
        for w in grid:
            if w not in curve:
                curve[w] = mrr(w)
        best = max(grid, key=lambda w: (curve[w], -w))
        if curve[grid[-1]] < curve[best] or grid[-1] * 4 > limit:
            break
        grid = (*grid, grid[-1] * 4)
    if curve[grid[-1]] >= curve[best]:
        position = "retriever_only"
    elif best == grid[0]:
        position = "lm_only" if best == 0 else "grid_bottom"
    else:
        position = "interior"
    return {"weight": best, "position": position, "valid_mrr": round(curve[best], 4),
            "valid_queries": len(lm_scores), "grid": list(grid),
            "curve": {str(w): round(v, 4) for w, v in curve.items()}}
