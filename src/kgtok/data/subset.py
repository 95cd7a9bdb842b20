"""A connected sub-KG of a large graph, for runs that must fit a laptop's hour.

Entities are taken by snowball sampling over the training graph: from a few
random seeds, whole breadth-first layers are added (a layer that would
overflow the budget is sampled at random) until the budget is reached, so the
subset keeps the local structure link prediction relies on, which uniform
entity sampling of a sparse graph like WN18RR destroys. Every split keeps the
triples whose two entities are in the subset; valid/test triples whose entity
or relation never occurs in the subset's train are dropped, so the sub-KG is
as clean as a benchmark (no unseen-entity warnings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from kgtok.artifacts import atomic_dir, refuse_unmarked_dir
from kgtok.data.graph import SPLITS, KnowledgeGraph, load_kg


def snowball_entities(train: np.ndarray, num_entities: int, size: int, *, seeds: int = 4,
                      rng: np.random.Generator) -> np.ndarray:
    """Sorted ids of ``size`` entities reached by BFS layers from ``seeds`` random starts."""
    if size >= num_entities:
        return np.arange(num_entities)
    adjacency = sp.coo_matrix((np.ones(len(train)), (train[:, 0], train[:, 2])), shape=(num_entities,) * 2).tocsr()
    adjacency = ((adjacency + adjacency.T) > 0).tocsr()
    chosen = np.zeros(num_entities, dtype=bool)
    frontier = np.zeros(num_entities, dtype=bool)
    while chosen.sum() < size:
        if not frontier.any():  # start (or restart from) random seeds outside the subset
            outside = np.flatnonzero(~chosen)
            frontier[rng.choice(outside, size=min(seeds, len(outside)), replace=False)] = True
        layer = np.flatnonzero(frontier)
        room = size - int(chosen.sum())
        if len(layer) > room:
            layer = rng.choice(layer, size=room, replace=False)
        chosen[layer] = True
        reached = np.asarray(adjacency[layer].sum(axis=0)).ravel() > 0
        frontier = reached & ~chosen
    return np.flatnonzero(chosen)


def subset_triples(kg: KnowledgeGraph, keep: np.ndarray) -> dict[str, np.ndarray]:
    """Per split, the triples inside the entity set ``keep`` (valid/test: only train-seen ids)."""
    inside = np.zeros(kg.num_entities, dtype=bool)
    inside[keep] = True
    out = {}
    for split in SPLITS:
        t = kg.triples[split].numpy()
        out[split] = t[inside[t[:, 0]] & inside[t[:, 2]]]
    seen_entity = np.zeros(kg.num_entities, dtype=bool)
    seen_entity[out["train"][:, [0, 2]].ravel()] = True
    seen_relation = np.zeros(kg.num_relations, dtype=bool)
    seen_relation[out["train"][:, 1]] = True
    for split in ("valid", "test"):
        t = out[split]
        out[split] = t[seen_entity[t[:, 0]] & seen_entity[t[:, 2]] & seen_relation[t[:, 1]]]
    return out


def write_subset(source: str | Path, dest: str | Path, *, entities: int, seed: int = 0, seeds: int = 4) -> Path:
    """Write a sub-KG of ``source`` with about ``entities`` entities to ``dest`` (replaced atomically).

    Entities that end up in no training triple are left out, so the result can
    hold slightly fewer than asked. Text (``entity_text.tsv``) follows.
    """
    if entities < 2:
        raise ValueError(f"entities: expected at least 2, got {entities}")
    dest = Path(dest)
    refuse_unmarked_dir(dest, lambda d: (d / "SUBSET.txt").exists(),  # e.g. the source itself
                        "has no SUBSET.txt, so it is not a subset kgtok wrote; writing the subset there would "
                        "replace it: choose another destination")
    kg = load_kg(source)
    rng = np.random.default_rng(seed)
    keep = snowball_entities(kg.train.numpy(), kg.num_entities, entities, seeds=seeds, rng=rng)
    triples = subset_triples(kg, keep)
    empty = [split for split, t in triples.items() if not len(t)]
    if empty:  # load_kg refuses an empty split: say why here, before anything is written
        raise ValueError(f"entities={entities}: the subset of {source} has no {' and no '.join(empty)} triples "
                         f"(sizes {', '.join(f'{k} {len(t)}' for k, t in triples.items())}); ask for more entities")
    used = np.unique(triples["train"][:, [0, 2]])
    names, relations = np.asarray(kg.entity_names, dtype=object), np.asarray(kg.relation_names, dtype=object)
    with atomic_dir(dest) as tmp:
        for split, t in triples.items():
            lines = [f"{h}\t{r}\t{tl}\n" for h, r, tl in zip(names[t[:, 0]], relations[t[:, 1]], names[t[:, 2]])]
            (tmp / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
        if any(kg.descriptions) or kg.labels != kg.entity_names:
            rows = [f"{kg.entity_names[i]}\t{_clean(kg.labels[i])}\t{_clean(kg.descriptions[i])}\n" for i in used]
            (tmp / "entity_text.tsv").write_text("".join(rows), encoding="utf-8")
        (tmp / "SUBSET.txt").write_text(
            f"Snowball subset of {Path(source).resolve()}: {len(used)} of {kg.num_entities} entities, seed {seed}; "
            f"triples train {len(triples['train'])}, valid {len(triples['valid'])}, test {len(triples['test'])}.\n",
            encoding="utf-8")
    return dest


def _clean(text: str) -> str:
    return " ".join(str(text).split())
