"""Triple classification (ReaLM, SSQR): is (h, r, t) true?  Instructions and metrics.

Negatives corrupt the head or the tail (half each), redrawn until the triple
is unknown in train ∪ valid ∪ test, with (``negatives``) an entity seen with
that relation in the same position in the training graph (``typed``: a
negative of the right type, the hard case), or any entity (``uniform``: most
are absurd and easy).  Test negatives may instead come from a file
(``--negatives``: head<TAB>relation<TAB>tail lines, as benchmarks such as
WN11 / FB13 ship them).  Evaluation's decision threshold is chosen on LM-valid
(:func:`best_threshold`).  Each
prompt shows the triple (names and codes) and training-graph facts about its
head; the source triple itself is never shown (for a negative, neither is the
true triple it was made from), so training prompts look like test prompts.
LM-train: a sample of training triples; LM-valid: validation; test: test.
The fine-tuned LM answers by comparing the likelihoods of " true" and " false".
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.data.graph import KnowledgeGraph, _triple_keys
from kgtok.llm.config import InstructConfig
from kgtok.llm.neighbours import NeighbourIndex
from kgtok.llm.prompts import classification_prompt_parts, compose_prompt


TYPED_ROUNDS = 50  # draws from a relation's own heads/tails before a triple falls back to any entity
RANDOM_ROUNDS = 50  # uniform draws after those; a triple still pending then takes one of its free corruptions


def corrupt(kg: KnowledgeGraph, triples: np.ndarray, rng: np.random.Generator, typed: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """One corrupted copy of each triple (head or tail replaced), never a known true triple; returns the
    negatives and the rows of ``triples`` they were made from (all, but those with no negative at all).

    ``typed``: the replacement is an entity seen with the triple's relation in that position in the training
    graph (uniform over those entities); a triple whose pool yields no unknown triple in ``TYPED_ROUNDS``
    draws falls back to any entity.  After ``RANDOM_ROUNDS`` more, a triple still pending draws from the exact
    list of its free corruptions, on the other side where its own has none (a UMLS or Nations query whose
    every other answer is known looped for ever); one with none on either side (Nations has such) gets no
    negative, with a warning.
    """
    known = _triple_keys(kg.all_triples, kg.num_entities, kg.num_relations)
    out = triples.copy()
    pending = np.arange(len(out))
    side = rng.integers(0, 2, len(out)) * 2  # column 0 (head) or 2 (tail)
    pools = _position_pools(kg) if typed else {}
    rounds = 0
    while len(pending):  # a few rounds: a random entity rarely makes a true triple
        if rounds == TYPED_ROUNDS * typed + RANDOM_ROUNDS:
            made = np.ones(len(out), dtype=bool)
            for i in pending:  # the few left: their free corruptions listed exactly (a loop over those only)
                negative = _free_corruption(kg, triples[i], int(side[i]), known, rng)
                if negative is None:
                    made[i] = False
                else:
                    out[i] = negative
            if not made.all():
                warnings.warn(f"{int((~made).sum())} of {len(out)} triples have no negative: every entity on "
                              "both sides makes a known triple (a dense graph); they get none", stacklevel=2)
            return out[made], np.flatnonzero(made)
        if typed and rounds < TYPED_ROUNDS:
            for i in pending:  # one draw per pending triple from its relation's pool
                pool = pools.get((int(out[i, 1]), int(side[i])))
                out[i, side[i]] = pool[rng.integers(len(pool))] if pool is not None else rng.integers(
                    kg.num_entities)
        else:
            out[pending, side[pending]] = rng.integers(0, kg.num_entities, len(pending))
        keys = _triple_keys(out[pending], kg.num_entities, kg.num_relations)
        clash = np.isin(keys, known) | (out[pending, 0] == out[pending, 2])
        pending = pending[clash]
        rounds += 1
    return out, np.arange(len(out))


def _free_corruption(kg: KnowledgeGraph, triple: np.ndarray, side: int, known: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray | None:
    """``triple`` with its head or tail (``side`` first, then the other) replaced by a uniformly drawn entity
    that makes no known triple and no self-loop; None when no entity does."""
    everyone = np.arange(kg.num_entities)
    for column in (side, 2 - side):
        candidates = np.repeat(triple[None, :], kg.num_entities, axis=0)
        candidates[:, column] = everyone
        keys = _triple_keys(candidates, kg.num_entities, kg.num_relations)
        free = np.flatnonzero(~np.isin(keys, known) & (candidates[:, 0] != candidates[:, 2]))
        if len(free):
            return candidates[free[rng.integers(len(free))]]
    return None


def _position_pools(kg: KnowledgeGraph) -> dict[tuple[int, int], np.ndarray]:
    """(relation, column 0 or 2) -> the entities the training graph has there."""
    train = kg.train.numpy()
    return {(int(r), column): np.unique(train[train[:, 1] == r, column])
            for r in np.unique(train[:, 1]) for column in (0, 2)}


def read_negatives(path: str | Path, kg: KnowledgeGraph) -> np.ndarray:
    """(n, 3) id triples from head<TAB>relation<TAB>tail lines (entity and relation names as in the KG);
    a 4th column, if any, is a label: lines labelled 1 (true) are skipped, -1 or 0 kept."""
    entities, relations = kg.entity_to_id, kg.relation_to_id
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (3, 4):
            raise ValueError(f"{path}:{number}: expected head<TAB>relation<TAB>tail[<TAB>label], got "
                             f"{len(fields)} field(s)")
        if len(fields) == 4 and fields[3].strip() == "1":
            continue
        h, r, t = fields[:3]
        for name, table, what in ((h, entities, "entity"), (r, relations, "relation"), (t, entities, "entity")):
            if name not in table:
                raise ValueError(f"{path}:{number}: unknown {what} {name!r}")
        rows.append((entities[h], relations[r], entities[t]))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def best_threshold(margins: np.ndarray, labels: np.ndarray) -> float:
    """The margin threshold (predict true when margin > threshold) with the best accuracy; ties: nearest 0."""
    margins, labels = np.asarray(margins, dtype=np.float64), np.asarray(labels, dtype=bool)
    values = np.unique(margins)
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0], [0.0]])
    # correct at cut c: the true triples above it and the false ones at or below it (sorted counts, no loop)
    at_or_below = [np.searchsorted(np.sort(margins[side]), cuts, side="right") for side in (labels, ~labels)]
    accuracy = (labels.sum() - at_or_below[0] + at_or_below[1]) / len(margins)
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best]))]])


def classification_records(kg: KnowledgeGraph, triples: np.ndarray, split: str, tokens: list[str] | None,
                           neighbours: NeighbourIndex, config: InstructConfig, rng: np.random.Generator,
                           given: np.ndarray | None = None) -> list[dict[str, Any]]:
    """A true and a corrupted record per triple (or the ``given`` negatives), in a shuffled order."""
    if given is None:
        negatives, made_from = corrupt(kg, triples, rng, typed=config.negatives == "typed")
        sources = np.concatenate([triples, triples[made_from]])
    else:  # a given negative was made from no triple we know: it hides only itself
        negatives = given
        sources = np.concatenate([triples, given])
    rows = np.concatenate([triples, negatives])  # (n + m, 3)
    labels = np.concatenate([np.ones(len(triples), bool), np.zeros(len(negatives), bool)])
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
