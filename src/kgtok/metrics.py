"""Rank-based link-prediction metrics, shared by stage 1 (KGE) and stage 5 (LM).

Filtered ranking (Bordes et al. 2013): for the query (h, r, ?) with answer t,
every other entity t' with (h, r, t') known in train ∪ valid ∪ test is removed
before ranking; likewise for (?, r, t).  Ties count *realistically*: the rank
is the mean of the optimistic rank (1 + #better) and the pessimistic rank
(#better + #tied, the answer included), the expected rank under random
tie-breaking, as PyKEEN's ``realistic`` rank.  The RotatE reference code
instead subtracts a constant from filtered scores and breaks ties by sort
order; a model that scores everything equal then looks perfect.  Not here.

Vocabulary follows PyKEEN: sides ``head``/``tail``/``both``; metrics ``mrr``,
``mr``, ``hits_at_k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

HITS_AT = (1, 3, 10)


def realistic_rank(
    scores: torch.Tensor,
    targets: torch.Tensor,
    filter_rows: torch.Tensor | np.ndarray | None = None,
    filter_cols: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Filtered realistic rank of each target among all candidates.

    Parameters
    ----------
    scores : (batch, num_candidates) float; higher is better. NaN counts as the
        worst possible score.
    targets : (batch,) int64 column of the true answer in each row.
    filter_rows, filter_cols : coordinates of other true answers to remove
        (e.g. from :meth:`kgtok.data.FilterIndex.tail_pairs`); entries equal
        to the target itself are ignored, so the index may include it.

    Returns
    -------
    (batch,) float64 ranks, 1 = best; half-integers arise from ties.
    """
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # float64 stays: fused LM scores near 1e4 differ below float32's step there
    if torch.isnan(scores).any():  # a check reads the scores; a replacement would also write a copy
        scores = scores.masked_fill(torch.isnan(scores), -torch.inf)  # (nan_to_num would lift a real -inf)
    device = scores.device  # indices follow the scores (a GPU's, in stage 1 with device=cuda)
    rows = torch.arange(scores.shape[0], device=device)
    targets = torch.as_tensor(targets).to(device)
    true = scores[rows, targets].unsqueeze(1)  # (batch, 1)
    if filter_rows is None or not len(filter_rows):  # nothing to filter: no mask to build and apply
        # int32 sums: a plain bool .sum() first copies the mask to int64 (about 1.8x slower on a CPU)
        better = (scores > true).sum(dim=1, dtype=torch.int32)
        tied = (scores == true).sum(dim=1, dtype=torch.int32)  # includes the answer itself
    else:
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.as_tensor(filter_rows, dtype=torch.long).to(device),
             torch.as_tensor(filter_cols, dtype=torch.long).to(device)] = False
        keep[rows, targets] = True  # the answer itself is never filtered out
        better = ((scores > true) & keep).sum(dim=1, dtype=torch.int32)
        tied = ((scores == true) & keep).sum(dim=1, dtype=torch.int32)  # includes the answer itself
    optimistic = better + 1
    pessimistic = better + tied
    return (optimistic + pessimistic).double() / 2.0


def filtered_top_k(
    scores: torch.Tensor,
    k: int,
    filter_rows: torch.Tensor | np.ndarray | None = None,
    filter_cols: torch.Tensor | np.ndarray | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates per row after removing known true answers other than the target.

    Returns (ids, scores), each (batch, k), best first; ties are broken by the
    lower id so that exports are reproducible.
    """
    scores = scores.float()
    filtering = filter_rows is not None and len(filter_rows)
    if filtering or torch.isnan(scores).any():  # a copy: the masking below stays local
        scores = scores.masked_fill(torch.isnan(scores), -torch.inf)
    device = scores.device
    if filtering:
        filter_rows = torch.as_tensor(filter_rows, dtype=torch.long).to(device)
        filter_cols = torch.as_tensor(filter_cols, dtype=torch.long).to(device)
        saved = None
        if targets is not None:
            targets = targets.to(device)
            rows = torch.arange(scores.shape[0], device=device)
            saved = scores[rows, targets].clone()
        scores[filter_rows, filter_cols] = -torch.inf
        if targets is not None:
            scores[rows, targets] = saved
    k = min(k, scores.shape[1])
    if 0 < k < scores.shape[1]:
        # One topk of k + 1: where the k-th value beats the (k+1)-th, its first k are the set (float scores
        # rarely tie there), ordered by value, then id. Only the other rows take the passes over every
        # candidate that choose among a tie at the k-th place.
        top = torch.topk(scores, k + 1, dim=1)
        ids, values = _by_value_then_id(top.indices[:, :k], top.values[:, :k])
        tied = top.values[:, k - 1] <= top.values[:, k]
        if bool(tied.any()):
            ids[tied], values[tied] = _top_k_with_ties(scores[tied], k)
        return ids, values
    return _top_k_with_ties(scores, k)


def _by_value_then_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, k) candidates ordered best first, equal values by the lower id."""
    order = torch.argsort(ids, dim=1)
    ids, values = ids.gather(1, order), values.gather(1, order)
    order = torch.argsort(-values, dim=1, stable=True)
    return ids.gather(1, order), values.gather(1, order)


def _top_k_with_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """filtered_top_k's choice among a tie at the k-th place, by passes over every candidate."""
    # topk alone picks arbitrary members of a tie at the k-th place; instead take
    # everything above the k-th value plus the lowest ids among those equal to it.
    threshold = torch.topk(scores, k, dim=1).values[:, -1:]  # (batch, 1)
    above = scores > threshold
    at = scores == threshold
    needed = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    chosen = above | at
    spare = at.sum(dim=1, keepdim=True, dtype=torch.int32) > needed  # more ties at the k-th value than places
    tied = torch.nonzero(spare.squeeze(1)).squeeze(1)
    if len(tied):  # the cumulative count runs only over those rows (float scores rarely tie)
        chosen[tied] = above[tied] | (at[tied] & (torch.cumsum(at[tied], dim=1) <= needed[tied]))  # exactly k
    ids = chosen.nonzero()[:, 1].view(-1, k)  # ascending id within each row
    values = scores.gather(1, ids)
    order = torch.argsort(-values, dim=1, stable=True)
    return ids.gather(1, order), values.gather(1, order)


def rank_metrics(ranks: np.ndarray | torch.Tensor, hits_at: Sequence[int] = HITS_AT) -> dict[str, float]:
    """MRR, MR and Hits@k of a set of (realistic) ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {"mrr": float("nan"), "mr": float("nan"), **{f"hits_at_{k}": float("nan") for k in hits_at}, "count": 0}
    out = {"mrr": float(np.mean(1.0 / ranks)), "mr": float(np.mean(ranks))}
    for k in hits_at:
        out[f"hits_at_{k}"] = float(np.mean(ranks <= k))
    out["count"] = int(ranks.size)
    return out


@dataclass
class RankingEvaluator:
    """Collects ranks per batch; computes metrics per side and overall at the end.

    As PyKEEN's rank-based evaluator: ``process(side, ranks, relations)`` per
    batch, then ``compute()``.
    """

    hits_at: tuple[int, ...] = HITS_AT
    _ranks: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"head": [], "tail": []})
    _relations: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"head": [], "tail": []})

    def process(self, side: str, ranks: torch.Tensor | np.ndarray, relations: torch.Tensor | np.ndarray) -> None:
        if side not in self._ranks:
            raise ValueError(f"side must be 'head' or 'tail', got {side!r}")
        self._ranks[side].append(np.asarray(ranks, dtype=np.float64))
        self._relations[side].append(np.asarray(relations, dtype=np.int64))

    def ranks(self, side: str) -> np.ndarray:
        if side == "both":
            return np.concatenate([self.ranks("head"), self.ranks("tail")])
        parts = self._ranks[side]
        return np.concatenate(parts) if parts else np.empty(0)

    def relations(self, side: str) -> np.ndarray:
        if side == "both":
            return np.concatenate([self.relations("head"), self.relations("tail")])
        parts = self._relations[side]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{"both": {...}, "head": {...}, "tail": {...}}`` of :func:`rank_metrics`."""
        return {side: rank_metrics(self.ranks(side), self.hits_at) for side in ("both", "head", "tail")}

    def per_relation(self, relation_names: Sequence[str]) -> dict[str, dict[str, float]]:
        """Metrics of both sides per relation (only relations that occur)."""
        ranks, relations = self.ranks("both"), self.relations("both")
        return {
            relation_names[r]: rank_metrics(ranks[relations == r], self.hits_at)
            for r in np.unique(relations)
        }


def dift_rank(stage1_rank: np.ndarray, pick_position: np.ndarray, picked_gold: np.ndarray,
              pick_vs_gold: np.ndarray | None = None) -> np.ndarray:
    """Rank of the gold after an LM picked one candidate (the DIFT / GS-Quant rule).

    A correct pick ranks 1.  Otherwise the pick moves to the top: the gold keeps
    its stage-1 filtered rank if the pick already stood above it, and drops by
    one if the pick stood below it, as in DIFT's ``eval.py``.  Hits@3/10
    therefore stay mostly stage 1's.  ``pick_vs_gold`` (n,): the sign of the
    pick's stage-1 score minus the gold's; a pick tied with the gold shared its
    realistic rank, so moving it up costs the gold half a place.  Without it,
    the pick stood below when its 1-based ``pick_position`` > rank (a tie is
    then counted as above or below by list position).
    """
    stage1_rank = np.asarray(stage1_rank, dtype=np.float64)
    if pick_vs_gold is None:
        drop = (np.asarray(pick_position, dtype=np.float64) > stage1_rank).astype(np.float64)
    else:
        drop = (1.0 - np.sign(np.asarray(pick_vs_gold, dtype=np.float64))) / 2  # above 0, tied 0.5, below 1
    return np.where(np.asarray(picked_gold, dtype=bool), 1.0, stage1_rank + drop)


def rerank_rank(scores: np.ndarray, gold_index: np.ndarray, stage1_rank: np.ndarray,
                lengths: np.ndarray | None = None) -> np.ndarray:
    """Rank of the gold when the whole candidate list is re-ordered by ``scores`` (n, k).

    A gold inside the list gets its realistic rank among the k scores; a gold
    outside it (``gold_index`` -1) keeps its stage-1 rank, which is already
    below every listed candidate.  ``lengths`` (n,): row i's list ends at
    ``lengths[i]``; the cells past it (padding) are left out, so a gold scored
    -inf or NaN ranks last of its own list, not among other lists' padding.
    """
    gold_index = np.asarray(gold_index)
    inside = gold_index >= 0
    out = np.asarray(stage1_rank, dtype=np.float64).copy()
    if inside.any():
        scores = np.asarray(scores)[inside]
        rows = cols = None
        if lengths is not None:
            rows, cols = np.nonzero(np.arange(scores.shape[1]) >= np.asarray(lengths)[inside][:, None])
        ranks = realistic_rank(torch.as_tensor(scores), torch.as_tensor(gold_index[inside]), rows, cols)
        out[inside] = ranks.numpy()
    return out


# ----------------------------------------------------------------------------
# Paired comparison of two rankers (or runs) on the same queries
# ----------------------------------------------------------------------------

COMPARED = ("hits_at_1", "mrr")  # measures that every A-vs-B table reports
_CHUNK = 500  # resamples per array (memory: _CHUNK x n)


def paired_comparison(ranks_a: np.ndarray, ranks_b: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """A - B on the same queries, per measure in :data:`COMPARED`: difference, bootstrap CI, paired p-value.

    ``ranks_a``, ``ranks_b``: (n,) ranks of the same n queries, in the same order.
    Per measure, ``{"a", "b", "difference", "ci_low", "ci_high", "p_value", "test"}``:

    - the confidence interval is the percentile bootstrap over queries
      (``resamples`` draws of n queries with replacement, one set of draws for
      both measures);
    - Hits@1's p-value is the exact McNemar test: of the queries where exactly
      one of A and B hits, how unlikely is a split this uneven if either is
      equally likely (two-sided binomial test, ``scipy.stats.binomtest``);
    - MRR's p-value is the paired sign-flip permutation test of the per-query
      reciprocal-rank differences (all 2^m flips when that is at most
      ``resamples``, m the number of non-zero differences; else ``resamples``
      random flips, with the +1 correction).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(ranks_a, dtype=np.float64), np.asarray(ranks_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired ranks need the same (n,) shape, got {a.shape} and {b.shape}")
    n = a.size
    rng = np.random.default_rng(seed)
    draws = bootstrap_draws(n, resamples, rng)
    tail = (1.0 - confidence) / 2.0
    out = {}
    for measure in COMPARED:
        va, vb = (a <= 1.0, b <= 1.0) if measure == "hits_at_1" else (1.0 / a, 1.0 / b)
        diff = va.astype(np.float64) - vb.astype(np.float64)
        if n == 0:
            out[measure] = {"a": float("nan"), "b": float("nan"), "difference": float("nan"),
                            "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"), "test": ""}
            continue
        boot = np.concatenate([diff[chunk].mean(axis=1) for chunk in draws])
        low, high = np.quantile(boot, [tail, 1.0 - tail])
        if measure == "hits_at_1":
            only_a, only_b = int(np.sum(va & ~vb)), int(np.sum(vb & ~va))
            p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            test = "exact McNemar"
        else:
            p, test = sign_flip_p_value(diff, resamples, rng), "paired sign-flip permutation"
        out[measure] = {"a": float(va.mean()), "b": float(vb.mean()), "difference": float(diff.mean()),
                        "ci_low": float(low), "ci_high": float(high), "p_value": float(p), "test": test}
    return out


def bootstrap_draws(n: int, resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``resamples`` draws of n indices with replacement, in chunks of at most :data:`_CHUNK` rows (none if n = 0)."""
    return [rng.integers(0, n, size=(min(_CHUNK, resamples - i), n)) for i in range(0, resamples, _CHUNK)] if n else []


def paired_mean_difference(diff: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                           confidence: float = 0.95) -> dict[str, float]:
    """Mean of paired per-query differences (any measure, e.g. a loss): ``difference``, percentile bootstrap
    ``ci_low`` / ``ci_high`` over queries and the sign-flip ``p_value``, as :func:`paired_comparison` gives MRR."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        return {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan")}
    rng = np.random.default_rng(seed)
    boot = np.concatenate([diff[chunk].mean(axis=1) for chunk in bootstrap_draws(diff.size, resamples, rng)])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return {"difference": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
            "p_value": sign_flip_p_value(diff, resamples, rng)}


def sign_flip_p_value(diff: np.ndarray, resamples: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of mean(diff) = 0 under random signs of the paired differences."""
    d = diff[diff != 0]
    m = d.size
    if m == 0:
        return 1.0
    observed = abs(d.mean()) - 1e-12  # equal means count as at least as extreme (float noise)
    if 2 ** m <= resamples:  # exact: every sign pattern
        signs = 1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1)
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed))
    extreme = 0
    for begin in range(0, resamples, _CHUNK):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(_CHUNK, resamples - begin), m))
        extreme += int(np.sum(np.abs((signs * d).mean(axis=1)) >= observed))
    return float((1 + extreme) / (resamples + 1))


def format_difference(row: dict[str, float], digits: int = 3) -> str:
    """``+0.012 [-0.010, +0.034] p=0.31`` (one measure of :func:`paired_comparison`)."""
    if not np.isfinite(row["difference"]):
        return "-"
    p = row["p_value"]
    p_text = f"p={p:.2g}" if p >= 0.001 else "p<0.001"
    return (f"{row['difference']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}] "
            f"{p_text}")
