"""Training-graph facts around an entity, most related to a query relation first (DIFT's neighbour selection)."""

from __future__ import annotations

import numpy as np

from kgtok.data.graph import KnowledgeGraph


class NeighbourIndex:
    """Training triples of each entity, ranked for a query relation by relation co-occurrence (DIFT).

    Relations are directed: (e, r, x) counts as relation r, (x, r, e) as r⁻¹.
    ``co[r, r']`` is the number of entities that have both; a query about
    relation r lists the entity's triples with the highest ``co[r, r']`` first.
    """

    def __init__(self, kg: KnowledgeGraph) -> None:
        from scipy.sparse import csr_matrix

        train = kg.train.numpy()
        h, r, t = train[:, 0], train[:, 1], train[:, 2]
        num_r = kg.num_relations
        # One row per (entity, directed relation, other entity, triple index), grouped by entity.
        entity = np.concatenate([h, t])
        relation = np.concatenate([r, r + num_r])
        other = np.concatenate([t, h])
        triple = np.concatenate([np.arange(len(train)), np.arange(len(train))])
        order = np.argsort(entity, kind="stable")
        self.entity, self.relation, self.other, self.triple = entity[order], relation[order], other[order], triple[order]
        self.starts = np.searchsorted(self.entity, np.arange(kg.num_entities + 1))
        incidence = csr_matrix((np.ones(len(entity)), (entity, relation)), shape=(kg.num_entities, 2 * num_r))
        incidence.data[:] = 1.0  # presence, not counts
        incidence.sum_duplicates()
        incidence.data[:] = 1.0
        self.co = np.asarray((incidence.T @ incidence).todense())  # (2R, 2R)
        self.num_relations = num_r
        self.train = train

    def for_query(self, entity: int, relation: int, entity_is_head: bool, exclude: tuple[int, int, int] | None,
                  limit: int) -> list[tuple[int, int, int]]:
        """Up to ``limit`` training triples (h, r, t) around ``entity``, most related to the query first."""
        rows = slice(self.starts[entity], self.starts[entity + 1])
        relations, triples = self.relation[rows], self.triple[rows]
        query = relation if entity_is_head else relation + self.num_relations
        score = self.co[query, relations]
        order = np.lexsort((triples, -score))  # by co-occurrence, then by triple index (deterministic)
        out, taken = [], set()
        for i in order:
            if triples[i] in taken:  # a self-loop (e, r, e) is indexed twice around e: listed once
                continue
            taken.add(triples[i])
            h, r, t = (int(v) for v in self.train[triples[i]])
            if exclude is not None and (h, r, t) == exclude:
                continue
            out.append((h, r, t))
            if len(out) == limit:
                break
        return out
