"""A-vs-B tables of stage 5c runs: every ranker's metric with its paired difference, 95% CI and p-value.

Each row is one ranker of one run (a stage-5c artifact) on the test queries.
Two comparisons per row, on the same queries (paired: matched by query id):

- against the retriever (stage 1's order of the same run);
- against the same ranker of the run without IDs (``ids: none``), when there
  is one: does an entity ID (codes, or random unique ones) help?

Both come from :func:`kgtok.metrics.paired_comparison` (bootstrap CI over
queries; exact McNemar for Hits@1, paired sign-flip permutation for MRR), the
one statistics function of the project.  ``kgtok ablate``,
``bench/llm_compare.py`` and ``bench/ablation.py`` print these rows.  numpy and
scipy only.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.llm.prompts import read_jsonl
from kgtok.llm.rankers import rank_all, rankers
from kgtok.metrics import COMPARED, HITS_AT, format_difference, paired_comparison, rank_metrics

NAMES = {"hits_at_1": "Hits@1", "mrr": "MRR"}


def evaluation_ranks(evaluate_dir: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Query ids and the gold's rank per ranker, recomputed from a stage-5c artifact's predictions.jsonl."""
    path = Path(evaluate_dir) / "predictions.jsonl"
    predictions = read_jsonl(path)
    if predictions and "stage1_rank" not in predictions[0]:
        raise ValueError(f"{path}: not a link-prediction evaluation (triple classification has no ranks)")
    return [p["id"] for p in predictions], rank_all(predictions)


def _aligned(ids: list[str], ranks: np.ndarray, common: list[str]) -> np.ndarray:
    """``ranks`` (in ``ids`` order) re-ordered to ``common``."""
    index = {q: i for i, q in enumerate(ids)}
    return ranks[[index[q] for q in common]]


def paired_runs(run_a: str | Path, run_b: str | Path, keys: tuple[str, ...] | None = None,
                queries: Collection[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Run A minus run B per ranker both have (``keys``: these only), over their common test queries
    (``queries``: those among them only, e.g. the ones a third run evaluated):
    :func:`kgtok.metrics.paired_comparison` rows (e.g. GS-Quant vs ReaLM codes, or a run vs a baseline)."""
    (ids_a, ranks_a), (ids_b, ranks_b) = evaluation_ranks(run_a), evaluation_ranks(run_b)
    keep = set(ids_b) if queries is None else set(ids_b) & set(queries)
    common = [q for q in ids_a if q in keep]
    return {key: paired_comparison(_aligned(ids_a, ranks_a[key], common), _aligned(ids_b, ranks_b[key], common))
            for key in (keys or ranks_a) if key in ranks_a and key in ranks_b}


def common_ranks(runs: dict[str, str | Path]) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """The test queries every run has (in the first run's order) and, per run and ranker, the gold's ranks on
    them: what a paired comparison of the runs needs."""
    loaded = {name: evaluation_ranks(path) for name, path in runs.items()}
    common_set = set.intersection(*(set(ids) for ids, _ in loaded.values()))
    common = [q for q in next(iter(loaded.values()))[0] if q in common_set]
    return common, {name: {key: _aligned(ids, values, common) for key, values in by_ranker.items()}
                    for name, (ids, by_ranker) in loaded.items()}


def comparison_rows(runs: dict[str, str | Path], no_ids: str | None = None, *, random_ids: str | None = None,
                    resamples: int = 10_000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (run, ranker): metrics and the paired comparisons (see the module docstring).

    ``runs``: name -> stage-5c artifact, in the order shown; ``no_ids`` / ``random_ids``: the names of the
    runs without IDs and with random IDs (None: no such column; codes vs random IDs tells "codes help" from
    "unique IDs help").  Only queries present in every run are compared (``queries`` in each row).
    Row: ``run``, ``ranker``, ``label``, ``queries``, per measure ``<measure>`` and ``vs_retriever`` /
    ``vs_no_ids`` / ``vs_random_ids`` (``{measure: paired_comparison row}``; None where it does not apply).
    """
    common, ranks = common_ranks(runs)
    labels = {r.key: r.label for r in rankers()}
    rows = []
    first = next(iter(ranks))
    retriever = ranks[first]["retriever"]
    rows.append({"run": first, "ranker": "retriever", "label": labels["retriever"], "queries": len(common),
                 **_measures(retriever), "vs_retriever": None, "vs_no_ids": None, "vs_random_ids": None})
    for name, by_ranker in ranks.items():
        for key, values in by_ranker.items():
            if key == "retriever":
                continue
            def versus(other: str | None) -> dict[str, Any] | None:
                if other is None or name in (other, no_ids) or key not in ranks[other]:
                    return None
                return paired_comparison(values, ranks[other][key], resamples=resamples, seed=seed)

            rows.append({
                "run": name, "ranker": key, "label": labels.get(key, key), "queries": len(common), **_measures(values),
                "vs_retriever": paired_comparison(values, by_ranker["retriever"], resamples=resamples, seed=seed),
                "vs_no_ids": versus(no_ids), "vs_random_ids": versus(random_ids),
            })
    return rows


def _measures(ranks: np.ndarray, hits_at: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Hits@k and MRR (a rank of inf: the gold is not in the list, reciprocal rank 0)."""
    out = rank_metrics(ranks, hits_at)
    return {key: out[key] for key in (*(f"hits_at_{k}" for k in hits_at), "mrr")}


def difference_lines(rows: dict[str, dict[str, dict[str, float]]], indent: str = "") -> str:
    """One markdown item per ranker of :func:`paired_runs`: ``- dift: Hits@1 +0.010 [...] p=..., MRR ...``."""
    return "".join(f"{indent}- {key}: Hits@1 {format_difference(row['hits_at_1'])}, "
                   f"MRR {format_difference(row['mrr'])}\n" for key, row in rows.items())


AGAINST = {"vs_retriever": "retriever", "vs_no_ids": "no IDs", "vs_random_ids": "random IDs"}


def compared_with(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The comparison columns the rows fill: retriever and no IDs always, random IDs when some row has it."""
    return ("vs_retriever", "vs_no_ids", *(("vs_random_ids",) if any(r.get("vs_random_ids") for r in rows) else ()))


def comparison_cells(row: dict[str, Any], others: tuple[str, ...] = ("vs_retriever", "vs_no_ids")) -> list[str]:
    """The table cells of a row after run and ranker: per measure, the value and each difference in ``others``."""
    cells = []
    for measure in COMPARED:
        cells.append(f"{row[measure]:.3f}")
        for other in others:
            cells.append(format_difference(row[other][measure]) if row.get(other) else "-")
    return cells


def comparison_header(others: tuple[str, ...] = ("vs_retriever", "vs_no_ids")) -> list[str]:
    return ["run", "ranker", *[cell for measure in COMPARED for cell in
                               (NAMES[measure], *[f"{NAMES[measure]} - {AGAINST[o]} [95% CI] p" for o in others])]]


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, with a line on the tests used."""
    others = compared_with(rows)
    header = comparison_header(others)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["run"], row["label"], *comparison_cells(row, others)]) + " |")
    queries = rows[0]["queries"] if rows else 0
    return ("\n".join(lines) + f"\n\nDifferences are paired over the same {queries} test queries: 95% percentile "
            "bootstrap CI (10,000 resamples of queries); p: exact McNemar test (Hits@1), paired sign-flip "
            "permutation test (MRR).\n")


def significant(rows: list[dict[str, Any]], alpha: float = 0.05) -> list[str]:
    """Sentences naming every difference with p < alpha (for a benchmark's note)."""
    out = []
    for row in rows:
        for other, against in (("vs_retriever", "the retriever"), ("vs_no_ids", "no IDs"),
                               ("vs_random_ids", "random IDs")):
            for measure in COMPARED:
                if row.get(other) and row[other][measure]["p_value"] < alpha:
                    out.append(f"{row['run']} {row['label']}: {NAMES[measure]} vs {against} "
                               f"{format_difference(row[other][measure])}")
    return out


LM_OWN = ("dift", "rerank")  # the LM's own choice (issue 15: "codes beat no IDs at pick or re-rank")
LM_ANY = ("dift", "rerank", "fused_pick", "fused_rerank")  # with the retriever's prior too


def valid_choice(evaluate_dir: str | Path, keys: tuple[str, ...] = LM_ANY,
                 fusion: dict[str, Any] | None = None) -> tuple[str, dict[str, float]]:
    """The ranker of ``keys`` with the best LM-valid Hits@1 (then MRR; then the first in ``keys``), and its
    LM-valid metrics: a "best ranker" chosen without looking at test (stage 5c stores them with the fusion
    weight it chose on LM-valid; ``fusion``: that entry of its metrics.json, when already read)."""
    path = Path(evaluate_dir) / "metrics.json"
    if fusion is None:
        fusion = json.loads(path.read_text(encoding="utf-8")).get("fusion", {})
    valid = fusion.get("valid_rankers")
    present = [key for key in keys if valid and key in valid]
    if not present:
        raise ValueError(f"{path}: no LM-valid metrics of {', '.join(keys)} (evaluate with fusion_weight null, "
                         "which scores LM-valid, and instructions with an lm_valid split)")
    best = max(present, key=lambda key: (valid[key]["hits_at_1"], valid[key]["mrr"], -present.index(key)))
    return best, valid[best]


def headline(runs: dict[str, str | Path], codes: list[str], *, no_ids: str | None, random_ids: str | None,
             realm: str | None = None, controls: dict[str, str] | None = None, resamples: int = 10_000,
             seed: int = 0) -> dict[str, Any]:
    """Issue 15's summary of one graph: each run's best ranker (chosen on LM-valid) on the common test
    queries, and the paired Hits@1 differences that decide its targets.

    ``runs``: name -> stage-5c artifact; ``codes``: the names that are GS-Quant codes (with or without the
    switches): the one whose best ranker is best on LM-valid (ties: its LM-own ranker) is "codes".  Keys: ``rows`` (per run and
    ``retriever``: ranker, LM-valid metrics, test Hits@1 and MRR; per run also its best LM-own ranker and
    ``vs_retriever``, its best ranker's Hits@1 difference to the retriever),
    ``codes_run``; ``codes_vs_none_*`` and ``codes_vs_random_*`` (the codes run's best LM-own ranker, pick
    or re-rank, against the other run's; ``_diff``, ``_ci``, ``_p``); ``lm_vs_retriever_*`` (the codes run's
    best ranker, fused ones included, against the retriever, with the fusion weight's position);
    ``gsquant_vs_realm_*`` when ``realm`` is given; with the generative ranker, each row's ``generative``
    (Hits@1/3/10, MRR) and ``codes_vs_random_generative_*`` / ``gsquant_vs_realm_generative_*``.
    ``controls``: a codes run's own random-ID run where its prompts differ (e.g. ``codes_first`` ->
    ``random_ids_first``), its control instead of ``random_ids`` (``codes_vs_random_control`` names it).
    """
    common, ranks = common_ranks(runs)
    rows: dict[str, dict[str, Any]] = {"retriever": {"ranker": "retriever",
                                                     **_measures(ranks[next(iter(ranks))]["retriever"])}}
    chosen: dict[str, dict[str, str]] = {}
    for name, path in runs.items():
        fusion = json.loads((Path(path) / "metrics.json").read_text(encoding="utf-8")).get("fusion", {})
        best, valid = valid_choice(path, LM_ANY, fusion)
        best_own, own_valid = valid_choice(path, LM_OWN, fusion)
        chosen[name] = {"any": best, "own": best_own}
        rows[name] = {"ranker": best, "valid": valid, **_measures(ranks[name][best]),
                      "own_ranker": best_own, "own_valid": own_valid,
                      **{f"own_{k}": v for k, v in _measures(ranks[name][best_own]).items()},
                      "fusion_weight": fusion.get("weight"), "fusion_position": fusion.get("position"),
                      "vs_retriever": paired_comparison(ranks[name][best], ranks[name]["retriever"],
                                                        resamples=resamples, seed=seed)["hits_at_1"]}
    if not codes:
        raise ValueError("headline: no codes run named")
    # Ties (fused rankers that are the retriever's order score alike) fall to the LM-own ranker's LM-valid
    # metrics, then to the order of ``codes``.
    codes_run = max(codes, key=lambda name: (rows[name]["valid"]["hits_at_1"], rows[name]["valid"]["mrr"],
                                             rows[name]["own_valid"]["hits_at_1"], rows[name]["own_valid"]["mrr"],
                                             -codes.index(name)))
    out: dict[str, Any] = {"queries": len(common), "codes_run": codes_run, "rows": rows}

    def versus(prefix: str, a: np.ndarray, b: np.ndarray, **extra: Any) -> None:
        row = paired_comparison(a, b, resamples=resamples, seed=seed)["hits_at_1"]
        out.update({f"{prefix}_diff": row["difference"], f"{prefix}_ci": [row["ci_low"], row["ci_high"]],
                    f"{prefix}_p": row["p_value"], **{f"{prefix}_{k}": v for k, v in extra.items()}})

    codes_own = ranks[codes_run][chosen[codes_run]["own"]]
    control = (controls or {}).get(codes_run, random_ids)  # random IDs written as the codes run writes codes
    out["codes_vs_random_control"] = control
    for prefix, other in (("codes_vs_none", no_ids), ("codes_vs_random", control), ("gsquant_vs_realm", realm)):
        if other is not None:
            versus(prefix, codes_own, ranks[other][chosen[other]["own"]],
                   rankers=[chosen[codes_run]["own"], chosen[other]["own"]])
    versus("lm_vs_retriever", ranks[codes_run][chosen[codes_run]["any"]], ranks[codes_run]["retriever"],
           ranker=chosen[codes_run]["any"], fusion_position=rows[codes_run]["fusion_position"])
    # Issue 15 item 4: the generative ranker (beam search over every entity's answer), beside the others where
    # a run has it.  One fixed ranker, nothing chosen: the codes run's against the random-ID and ReaLM runs'.
    for name in runs:
        if "generative" in ranks[name]:
            rows[name]["generative"] = _measures(ranks[name]["generative"], HITS_AT)
    for prefix, other in (("codes_vs_random_generative", control), ("gsquant_vs_realm_generative", realm)):
        if other is not None and "generative" in ranks[codes_run] and "generative" in ranks[other]:
            versus(prefix, ranks[codes_run]["generative"], ranks[other]["generative"])
    return out

