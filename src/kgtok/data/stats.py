"""Summary statistics of a KG, for ``kgtok data info`` and the data stage's manifest."""

from __future__ import annotations

from typing import Any

import numpy as np

from kgtok.data.graph import SPLITS, KnowledgeGraph


def relation_statistics(kg: KnowledgeGraph, split: str = "train") -> list[dict[str, Any]]:
    """Per relation: triple count, tails per head, heads per tail, mapping category.

    Categories follow Bordes et al. (2013): a side is "N" when its average
    count exceeds 1.5; tails-per-head > 1.5 makes it 1-N, heads-per-tail makes N-1.
    """
    triples = kg.triples[split].numpy()
    r = triples[:, 1]
    count = np.bincount(r, minlength=kg.num_relations)
    # Distinct heads (and tails) per relation: unique (r, entity) pairs counted per r.
    heads = np.bincount(np.unique(r * kg.num_entities + triples[:, 0]) // kg.num_entities, minlength=kg.num_relations)
    tails = np.bincount(np.unique(r * kg.num_entities + triples[:, 2]) // kg.num_entities, minlength=kg.num_relations)
    with np.errstate(divide="ignore", invalid="ignore"):
        tph = np.where(heads > 0, count / np.maximum(heads, 1), 0.0)
        hpt = np.where(tails > 0, count / np.maximum(tails, 1), 0.0)
    rows = []
    for i, name in enumerate(kg.relation_names):
        category = ("N" if hpt[i] > 1.5 else "1") + "-" + ("N" if tph[i] > 1.5 else "1")
        rows.append({
            "relation": name, "triples": int(count[i]), "tails_per_head": round(float(tph[i]), 3),
            "heads_per_tail": round(float(hpt[i]), 3), "category": category,
        })
    return rows


def summarize(kg: KnowledgeGraph) -> dict[str, Any]:
    """Counts, unseen entities, degree and text coverage, relation categories."""
    train = kg.train.numpy()
    degree = np.bincount(np.concatenate([train[:, 0], train[:, 2]]), minlength=kg.num_entities)
    relations = relation_statistics(kg)
    categories: dict[str, int] = {}
    for row in relations:
        categories[row["category"]] = categories.get(row["category"], 0) + 1
    report = kg.report
    return {
        "name": kg.name,
        "source": str(kg.source) if kg.source else None,
        "counts": kg.counts(),
        "unseen_entities": {s: report.unseen_entities.get(s, 0) for s in SPLITS[1:]},
        "unseen_relations": {s: report.unseen_relations.get(s, 0) for s in SPLITS[1:]},
        "unseen_entity_triples": {s: report.unseen_entity_triples.get(s, 0) for s in SPLITS[1:]},
        "duplicates_dropped": dict(report.duplicates),
        "split_overlap": dict(report.split_overlap),
        "crlf_files": list(report.crlf_files),
        "train_degree": {
            "mean": float(degree.mean()) if len(degree) else 0.0,
            "median": float(np.median(degree)) if len(degree) else 0.0,
            "max": int(degree.max()) if len(degree) else 0,
            "isolated_in_train": int((degree == 0).sum()),
        },
        "text": {
            "entities_with_label": kg.num_entities - report.missing_label,
            "entities_with_description": kg.num_entities - report.missing_description,
            "text_lines_for_unknown_entities": report.text_unknown_entities,
        },
        "relation_categories": categories,
        "relations": relations,
        "has_entity_types": kg.entity_types is not None,
    }
