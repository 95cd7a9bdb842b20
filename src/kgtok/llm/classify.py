"""Triple classification (ReaLM, SSQR): is (h, r, t) true?  Instructions and metrics.

Negatives corrupt the head or the tail (half each) with a uniformly drawn
entity, redrawn until the triple is unknown in train ∪ valid ∪ test.  Each
prompt shows the triple (names and codes) and training-graph facts about its
head; the source triple itself is never shown (for a negative, neither is the
true triple it was made from), so training prompts look like test prompts.
LM-train: a sample of training triples; LM-valid: validation; test: test.
The fine-tuned LM answers by comparing the likelihoods of " true" and " false".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kgtok.data.graph import KnowledgeGraph, _triple_keys
from kgtok.llm.config import InstructConfig
from kgtok.llm.neighbours import NeighbourIndex
from kgtok.llm.prompts import classification_prompt_parts, compose_prompt


def corrupt(kg: KnowledgeGraph, triples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One corrupted copy of each triple (head or tail replaced), never a known true triple."""
    known = _triple_keys(kg.all_triples, kg.num_entities, kg.num_relations)
    out = triples.copy()
    pending = np.arange(len(out))
    side = rng.integers(0, 2, len(out)) * 2  # column 0 (head) or 2 (tail)
    while len(pending):  # a few rounds: a random entity rarely makes a true triple
        out[pending, side[pending]] = rng.integers(0, kg.num_entities, len(pending))
        keys = _triple_keys(out[pending], kg.num_entities, kg.num_relations)
        clash = np.isin(keys, known) | (out[pending, 0] == out[pending, 2])
        pending = pending[clash]
    return out


def classification_records(kg: KnowledgeGraph, triples: np.ndarray, split: str, tokens: list[str] | None,
                           neighbours: NeighbourIndex, config: InstructConfig, rng: np.random.Generator
                           ) -> list[dict[str, Any]]:
    """A true and a corrupted record per triple, in a shuffled order."""
    negatives = corrupt(kg, triples, rng)
    rows = np.concatenate([triples, negatives])  # (2n, 3)
    labels = np.concatenate([np.ones(len(triples), bool), np.zeros(len(triples), bool)])
    sources = np.concatenate([triples, triples])
    order = rng.permutation(len(rows))
    records = []
    for i in order:  # building text: one pass per record
        h, r, t = (int(v) for v in rows[i])
        source = tuple(int(v) for v in sources[i])
        facts = [f for f in neighbours.for_query(h, r, True, source, config.neighbours + 1) if f != (h, r, t)]
        records.append({
            "id": f"{split}-{i}", "split": split, "task": "classification",
            "triple": [kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]],
            "label": bool(labels[i]),
            "prompt_parts": (parts := classification_prompt_parts(kg, (h, r, t), facts[: config.neighbours], tokens,
                                                                  config)),
            "prompt": compose_prompt(parts),
            "answer": "true" if labels[i] else "false",
        })
    return records


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="binary",
                                                               zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "count": int(len(labels))}
