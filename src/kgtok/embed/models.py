"""KG embedding models: RotatE, TransE, DistMult, ComplEx.

Each model turns a query into one vector and compares it with candidate
entities, so one code path serves training, filtered ranking and export:

* ``tail_query(h, r)``  -> q such that score(h, r, t) = compare(q, t)
* ``head_query(r, t)``  -> q such that score(h, r, t) = compare(q, h)
* ``compare(q, E)``     -> (batch, K) scores against shared candidates E (K, width)
* ``compare_each(q, E)``-> (batch, K) scores against per-query candidates E (batch, K, width)

For DistMult and ComplEx ``compare`` is a matmul; for the distance models it
is a chunked L1 distance.  Complex vectors are stored as ``[re | im]`` halves,
which is also the real-valued layout exported for later stages.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Distance scoring materialises (batch, chunk, width); keep it near this many floats.
_CHUNK_FLOATS = 1 << 24
# Bilinear ranking scores this many candidates per matmul (no gradient, CPU).
_SCORE_BLOCK = 2048


class KGEModel(nn.Module):
    """Entity and relation tables plus the scoring function of one model."""

    complex_valued = False
    distance_based = False

    def __init__(self, num_entities: int, num_relations: int, dim: int, *, margin: float = 9.0) -> None:
        super().__init__()
        self.num_entities = num_entities
        self.num_relations = num_relations  # includes reciprocal relations when used
        self.dim = dim
        self.margin = margin
        width = 2 * dim if self.complex_valued else dim
        self.entity = nn.Parameter(torch.empty(num_entities, width))
        self.relation = nn.Parameter(torch.empty(num_relations, self.relation_width))

        # Row gradients (sparse=True in F.embedding) for sampled negatives on big graphs: a step then touches
        # the rows of its batch, not the whole table (set by kgtok.embed.train.build; see EmbedConfig.sparse).
        self.sparse = False

    @property
    def relation_width(self) -> int:
        return 2 * self.dim if self.complex_valued else self.dim

    def entity_rows(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.entity, sparse=self.sparse)

    def relation_rows(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.relation, sparse=self.sparse)

    def reset_parameters(self, generator: torch.Generator, *, scale: float | None = None) -> None:
        """Normal(0, scale) init (1-vs-all), or RotatE's uniform range when scale is None."""
        with torch.no_grad():
            if scale is not None:
                self.entity.normal_(0.0, scale, generator=generator)
                self.relation.normal_(0.0, scale, generator=generator)
            else:
                bound = (self.margin + 2.0) / self.dim  # RotatE: (γ + ε) / d, ε = 2
                self.entity.uniform_(-bound, bound, generator=generator)
                self.relation.uniform_(-bound, bound, generator=generator)

    # --- the scoring function -------------------------------------------------
    def tail_query(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_query(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compare(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(batch, width) x (K, width) -> (batch, K)."""
        raise NotImplementedError

    def compare_each(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(batch, width) x (batch, K, width) -> (batch, K)."""
        raise NotImplementedError

    def factors(self, triples: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-coordinate magnitudes of h, r, t for the N3 regulariser."""
        h, r, t = self.entity_rows(triples[:, 0]), self.relation_rows(triples[:, 1]), self.entity_rows(triples[:, 2])
        if self.complex_valued:
            return tuple(_modulus(x) for x in (h, r, t))
        return h.abs(), r.abs(), t.abs()

    # --- conveniences -----------------------------------------------------------
    def score_triples(self, triples: torch.Tensor) -> torch.Tensor:
        """(n, 3) -> (n,) scores of given triples."""
        q = self.tail_query(triples[:, 0], triples[:, 1])
        return self.compare_each(q, self.entity_rows(triples[:, 2]).unsqueeze(1)).squeeze(1)

    def score_all_tails(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self.compare(self.tail_query(heads, relations), self.entity)

    def score_all_heads(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        return self.compare(self.head_query(relations, tails), self.entity)

    def entity_embeddings(self) -> torch.Tensor:
        """(N, width) real-valued vectors (complex models: [re | im])."""
        return self.entity.detach().clone()

    def relation_embeddings(self) -> torch.Tensor:
        return self.relation.detach().clone()


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    re, im = x.chunk(2, dim=-1)
    return re, im


def _modulus(x: torch.Tensor) -> torch.Tensor:
    re, im = _halves(x)
    return torch.sqrt(re * re + im * im + 1e-12)


class _Bilinear(KGEModel):
    def query_from(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The tail query of head vectors ``h`` and relation vectors ``r`` (rows already gathered)."""
        raise NotImplementedError

    def one_vs_all_terms(self, triples: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Tail queries (batch, width), to ``compare`` with every entity, and the N3 factors, from one gather.

        Equal to ``tail_query`` and ``factors``; gathering heads and
        tails once saves the backward pass two zero-filled copies of the
        whole entity table (about a tenth of a WN18RR step).
        """
        n = len(triples)
        rows = self.entity_rows(torch.cat([triples[:, 0], triples[:, 2]]))
        h, t = rows[:n], rows[n:]
        r = self.relation_rows(triples[:, 1])
        magnitude = _modulus if self.complex_valued else torch.abs
        return self.query_from(h, r), (magnitude(h), magnitude(r), magnitude(t))

    def compare(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or queries.device.type != "cpu" or len(candidates) <= _SCORE_BLOCK:
            return queries @ candidates.t()
        # Ranking on a CPU: one (batch, N) product with N large runs far below the matmul rate (its output
        # leaves the cache); a block of candidates at a time stays in it (see ranking._CPU_SCORE_FLOATS).
        scores = queries.new_empty(len(queries), len(candidates))
        for start in range(0, len(candidates), _SCORE_BLOCK):
            block = candidates[start:start + _SCORE_BLOCK]
            scores[:, start:start + len(block)] = queries @ block.t()
        return scores

    def compare_each(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return torch.bmm(candidates, queries.unsqueeze(2)).squeeze(2)


class DistMult(_Bilinear):
    """score = <h, r, t> (Yang et al. 2015)."""

    def tail_query(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self.query_from(self.entity_rows(heads), self.relation_rows(relations))

    def query_from(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return h * r

    def head_query(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        return self.entity_rows(tails) * self.relation_rows(relations)


class ComplEx(_Bilinear):
    """score = Re(<h, r, conj(t)>) (Trouillon et al. 2016)."""

    complex_valued = True

    def tail_query(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self.query_from(self.entity_rows(heads), self.relation_rows(relations))

    def query_from(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        h_re, h_im = _halves(h)
        r_re, r_im = _halves(r)
        # h * r, so that Re((h r) conj(t)) = q_re t_re + q_im t_im
        return torch.cat([h_re * r_re - h_im * r_im, h_re * r_im + h_im * r_re], dim=-1)

    def head_query(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        r_re, r_im = _halves(self.relation_rows(relations))
        t_re, t_im = _halves(self.entity_rows(tails))
        # Re(h a) with a = r conj(t) = h_re a_re - h_im a_im
        a_re = r_re * t_re + r_im * t_im
        a_im = r_im * t_re - r_re * t_im
        return torch.cat([a_re, -a_im], dim=-1)


class _Distance(KGEModel):
    """score = γ - Σ_i |q_i - e_i| (L1 over coordinates, or over complex moduli)."""

    distance_based = True

    def _distance(self, diff: torch.Tensor) -> torch.Tensor:
        if self.complex_valued:
            re, im = _halves(diff)
            return torch.sqrt(re * re + im * im + 1e-12).sum(dim=-1)
        return diff.abs().sum(dim=-1)

    def compare(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        batch, width = queries.shape
        chunk = max(1, _CHUNK_FLOATS // max(1, batch * width))
        parts = [
            self.margin - self._distance(queries.unsqueeze(1) - candidates[start : start + chunk].unsqueeze(0))
            for start in range(0, candidates.shape[0], chunk)
        ]
        return torch.cat(parts, dim=1)

    def compare_each(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.margin - self._distance(queries.unsqueeze(1) - candidates)


class TransE(_Distance):
    """score = γ - ||h + r - t||_1 (Bordes et al. 2013)."""

    def tail_query(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self.entity_rows(heads) + self.relation_rows(relations)

    def head_query(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        return self.entity_rows(tails) - self.relation_rows(relations)


class RotatE(_Distance):
    """score = γ - Σ_i |h_i r_i - t_i| with |r_i| = 1 (Sun et al. 2019)."""

    complex_valued = True

    @property
    def relation_width(self) -> int:
        return self.dim  # one phase per complex dimension

    def phases(self, relations: torch.Tensor) -> torch.Tensor:
        # Stored like the RotatE code, on the entity init range, scaled to [-π, π].
        bound = (self.margin + 2.0) / self.dim
        return self.relation_rows(relations) / (bound / math.pi)

    def _rotate(self, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        re, im = _halves(x)
        cos, sin = torch.cos(phase), torch.sin(phase)
        return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)

    def tail_query(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self._rotate(self.entity_rows(heads), self.phases(relations))

    def head_query(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        # |h r - t| = |h - t conj(r)| because |r| = 1.
        return self._rotate(self.entity_rows(tails), -self.phases(relations))

    def factors(self, triples: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, t = self.entity_rows(triples[:, 0]), self.entity_rows(triples[:, 2])
        return _modulus(h), _modulus(t)

    def relation_embeddings(self) -> torch.Tensor:
        """(R, dim) rotation phases in radians."""
        return self.phases(torch.arange(self.num_relations)).detach().clone()


MODELS: dict[str, type[KGEModel]] = {"rotate": RotatE, "transe": TransE, "distmult": DistMult, "complex": ComplEx}


def build_model(name: str, num_entities: int, num_relations: int, dim: int, *, margin: float) -> KGEModel:
    if name not in MODELS:
        raise ValueError(f"unknown KGE model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](num_entities, num_relations, dim, margin=margin)
