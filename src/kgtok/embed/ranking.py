"""Filtered ranking of a KGE model over all entities, and the candidate export.

Queries are scored in batches against every entity, so memory is bounded by
``batch_size * num_entities`` floats whatever the split size.  Both sides are
ranked: (h, r, ?) for the tail and (?, r, t) for the head; a model trained
with reciprocal relations answers the head query as (t, r⁻¹, ?).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kgtok.data.filter_index import FilterIndex
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.models import KGEModel
from kgtok.metrics import RankingEvaluator, filtered_top_k, realistic_rank

SIDES = ("tail", "head")  # direction 0 predicts the tail, 1 the head


@dataclass
class RankedQueries:
    """Everything known about the queries of one split, both directions stacked.

    Row i < n is the tail query of triple i, row n + i its head query.
    """

    triples: np.ndarray  # (2n, 3) int64 original (h, r, t)
    direction: np.ndarray  # (2n,) int8: 0 = predict tail, 1 = predict head
    gold: np.ndarray  # (2n,) int64 the answer
    rank: np.ndarray  # (2n,) float64 filtered realistic rank of the answer
    gold_score: np.ndarray  # (2n,) float32
    gold_probability: np.ndarray  # (2n,) float32 softmax over non-filtered entities
    candidates: np.ndarray | None = None  # (2n, k) int64 best first (filtered, answer kept)
    candidate_scores: np.ndarray | None = None  # (2n, k) float32

    def evaluator(self) -> RankingEvaluator:
        evaluator = RankingEvaluator()
        for d, side in enumerate(SIDES):
            rows = self.direction == d
            evaluator.process(side, self.rank[rows], self.triples[rows, 1])
        return evaluator

    def save(self, path: str | Path) -> None:
        arrays = {k: v for k, v in self.__dict__.items() if v is not None}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RankedQueries:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in data.files})


# On a CPU a batch's (batch, N) scores are kept near this many floats (16 MB, inside a 32 MB L3). With the
# candidates scored in blocks (models._SCORE_BLOCK), WN18RR's training queries ranked 1.9x faster than with one
# product in batches of 512 (2 AMD EPYC cores, bench/results/kge_step_time.json).
_CPU_SCORE_FLOATS = 1 << 22


def score_side(
    model: KGEModel, triples: torch.Tensor, side: str, *, reciprocal: bool, num_base_relations: int
) -> torch.Tensor:
    """(batch, num_entities) scores of every entity as the answer of one side."""
    h, r, t = triples[:, 0], triples[:, 1], triples[:, 2]
    if side == "tail":
        return model.score_all_tails(h, r)
    if reciprocal:
        return model.score_all_tails(t, r + num_base_relations)
    return model.score_all_heads(r, t)


@torch.no_grad()
def rank_triples(
    model: KGEModel,
    triples: torch.Tensor,
    filter_index: FilterIndex,
    *,
    reciprocal: bool,
    num_base_relations: int,
    batch_size: int = 512,
    top_k: int = 0,
    progress: bool = False,
    description: str = "ranking",
) -> RankedQueries:
    """Filtered realistic ranks (and optionally top-k candidates) for both sides of every triple."""
    model.eval()
    device = model.entity.device  # scores and filtering on the model's device; results come back as numpy
    triples = torch.as_tensor(triples, dtype=torch.long)
    n = triples.shape[0]
    k = min(top_k, model.num_entities)
    rank = np.empty(2 * n, dtype=np.float64)
    gold_score = np.empty(2 * n, dtype=np.float32)
    gold_probability = np.empty(2 * n, dtype=np.float32)
    candidates = np.empty((2 * n, k), dtype=np.int64) if k else None
    candidate_scores = np.empty((2 * n, k), dtype=np.float32) if k else None
    if device.type == "cpu":  # the filter, rank and top-k passes over a batch's scores run faster in cache
        batch_size = min(batch_size, max(16, _CPU_SCORE_FLOATS // model.num_entities))
    batches = [(d, side, start) for d, side in enumerate(SIDES) for start in range(0, n, batch_size)]
    for d, side, start in tqdm(batches, desc=description, disable=not progress, leave=False):
        batch = triples[start : start + batch_size]  # (batch, 3) on the CPU: the filter index reads numpy
        scores = score_side(model, batch.to(device), side, reciprocal=reciprocal,
                            num_base_relations=num_base_relations).float()  # (batch, N) on the device
        h, r, t = batch.numpy().T
        if side == "tail":
            rows, cols = filter_index.tail_pairs(h, r)
            gold = batch[:, 2].to(device)
        else:
            rows, cols = filter_index.head_pairs(r, t)
            gold = batch[:, 0].to(device)
        out = slice(d * n + start, d * n + start + len(batch))
        true = scores.gather(1, gold.unsqueeze(1)).squeeze(1)
        gold_score[out] = true.cpu().numpy()
        # One filtered copy serves rank, probability and top-k: the other true answers at -inf, the gold kept.
        # (A NaN or -inf gold would tie with them, so such a batch ranks with the explicit mask instead.)
        worst = bool(torch.isneginf(true).any() or torch.isnan(true).any())
        if worst:
            rank[out] = realistic_rank(scores, gold, rows, cols).cpu().numpy()
        masked = torch.nan_to_num_(scores, nan=-torch.inf)  # in place: the raw scores are not needed again
        masked[torch.as_tensor(rows).to(device), torch.as_tensor(cols).to(device)] = -torch.inf
        masked[torch.arange(len(batch), device=device), gold] = torch.nan_to_num(true, nan=-torch.inf)  # as masked
        if not worst:
            rank[out] = realistic_rank(masked, gold).cpu().numpy()
        gold_probability[out] = torch.exp(true - torch.logsumexp(masked, dim=1)).cpu().numpy()
        if k:
            ids, values = filtered_top_k(masked, k)
            candidates[out] = ids.cpu().numpy()
            candidate_scores[out] = values.cpu().numpy()
    triples_np = triples.numpy()
    return RankedQueries(
        triples=np.concatenate([triples_np, triples_np]),
        direction=np.repeat(np.arange(2, dtype=np.int8), n),
        gold=np.concatenate([triples_np[:, 2], triples_np[:, 0]]),
        rank=rank,
        gold_score=gold_score,
        gold_probability=gold_probability,
        candidates=candidates,
        candidate_scores=candidate_scores,
    )


def rank_splits(
    model: KGEModel,
    kg: KnowledgeGraph,
    *,
    reciprocal: bool,
    batch_size: int,
    top_k: int,
    export_splits: tuple[str, ...],
    progress: bool = False,
) -> tuple[dict[str, RankedQueries], dict[str, dict]]:
    """Rank valid, test and every exported split; metrics of valid and test.

    Candidates (top-k) are kept only for the exported splits.  Metrics filter with train ∪ valid ∪ test (the
    standard); exported train and valid lists, stage 5's training material, with train ∪ valid only, as any
    honest training set (a test answer may be a negative there): those splits are ranked again for it.
    An exported valid split also keeps its lists under the standard filter as ``valid_eval``: stage 5's
    held-out LM-valid, on which choices are made, must be measured as test is (with the training lists, a
    test answer ranked above the gold counts as an error: on UMLS the retriever's Hits@1 there was 0.50
    against 0.94 under the standard filter).
    """
    ranked: dict[str, RankedQueries] = {}
    metrics: dict[str, dict] = {}
    seen = None  # train ∪ valid, built when a training list is exported
    for split in dict.fromkeys(("valid", "test", *export_splits)):
        training_list = split in export_splits and split != "test"
        if split in ("valid", "test"):
            ranked[split] = rank_triples(
                model, kg.triples[split], kg.filter_index, reciprocal=reciprocal,
                num_base_relations=kg.num_relations, batch_size=batch_size,
                top_k=top_k if split in export_splits else 0, progress=progress, description=f"rank {split}",
            )
            metrics[split] = ranked[split].evaluator().compute()
            if training_list:
                ranked[f"{split}_eval"] = ranked[split]
        if training_list:
            if seen is None:
                seen = FilterIndex(np.concatenate([kg.train.numpy(), kg.valid.numpy()]), kg.num_entities,
                                   kg.num_relations)
            ranked[split] = rank_triples(
                model, kg.triples[split], seen, reciprocal=reciprocal, num_base_relations=kg.num_relations,
                batch_size=batch_size, top_k=top_k, progress=progress, description=f"rank {split} (train ∪ valid)",
            )
    return ranked, metrics
