"""Stage 5a: DIFT-format instructions with entity codes, built from stage-1 candidates.

Where the examples come from (DIFT, METHOD.md stage 5): the stage-1 model's
top-k lists for the *validation* queries, both directions, shuffled and split
90% / 10% into LM-train / LM-valid; LM-train keeps a record only when its
confidence 100·p(gold) + 1/rank (rank <= k; else 1/rank) exceeds 0.05, which
drops every record whose gold is outside the list.  The test queries are the
LM's test set.  (On training queries the stage-1 model has seen the answer, so
its lists would teach the LM to copy rank 1; they are an opt-in source.)
Training queries come in one of two forms (``train_query_format``): the full
DIFT prompt with the list in random order, or ReaLM's form, the query line
alone ("(known entity <codes>, relation, ?)" -> the answer).  The second needs
no stage-1 list and is ~10x shorter, so a small LM trained from scratch sees
every training triple in the time the first gives it a few thousand: it learns
which entities a relation leads to, which is what scoring a list needs.

Rules kept here: neighbour triples come from the training graph only, and
never the query triple itself; the gold is never added to a list that lacks
it; names are not unique, so each candidate carries its entity id and the
answer is resolved through the list, never by name.

Output (``dest``): ``lm_train.jsonl``, ``lm_valid.jsonl``, ``test.jsonl`` and
``manifest.json``.  One record per line::

    {"id": "valid-17-tail", "split": "valid", "direction": "tail",
     "triple": ["h raw id", "relation", "t raw id"], "known": 12, "gold": 345,
     "candidates": [345, 9, ...], "candidate_scores": [7.1, 6.4, ...] (stage 1's), "candidate_text": ["dog <ent><a_1><b_7></ent>", ...],
     "gold_in_candidates": true, "stage1_rank": 1.0, "confidence": 98.3,
     "prompt": "...", "answer": "dog <ent><a_1><b_7></ent>"}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kgtok.artifacts import artifact_dir, hash_inputs
from kgtok.config import check_fields, format_config, in_range
from kgtok.data.graph import KnowledgeGraph, load_kg
from kgtok.embed.ranking import RankedQueries
from kgtok.llm.vocab import ENTITY_BEGIN, ENTITY_END


@dataclass(frozen=True, kw_only=True)
class InstructConfig:
    """Stage 5a: which parts go into a prompt, and which queries become examples."""

    task: str = "completion"  # completion (link prediction, DIFT) | classification (true/false, ReaLM)
    top_k: int = 20  # candidates listed per prompt (at most what stage 1 exported)
    neighbours: int = 10  # training-graph triples about the known entity
    description_words: int = 50  # the known entity's description is cut to about this many words
    use_codes: bool = True  # entity codes after names (GS-Quant); false: DIFT without codes
    use_names: bool = True  # entity names; false: codes only (ablation)
    use_descriptions: bool = True
    use_neighbours: bool = True
    train_from_train_queries: bool = False  # also turn training queries into examples (off: DIFT)
    train_queries: int = 0  # with the above: at most this many training queries (0: all)
    train_query_format: str = "dift"  # dift: the full prompt with a candidate list | query: ReaLM's short form,
    # the query line and the answer, no list (from the training graph; no stage-1 candidates needed)
    shuffle_train_query_candidates: bool = True  # dift form: lists in random order: stage 1 has seen these answers
    # and ranks them first, so in stage-1 order they would teach the LM to copy rank 1; shuffled, they teach it
    # to choose by content (a from-scratch LM needs that data; pretrained ones may not)
    lm_valid_fraction: float = 0.1  # share of the validation queries kept for LM validation
    confidence_threshold: float = 0.05  # LM-train keeps records with confidence above this
    classification_train_triples: int = 5000  # classification: training triples sampled for LM-train (0: all)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, [
            ("task", lambda v: v in ("completion", "classification"), "completion or classification"),
            ("train_query_format", lambda v: v in ("dift", "query"), "dift or query"),
            ("classification_train_triples", in_range(0), ">= 0"),
            ("train_queries", in_range(0), ">= 0"),
            ("top_k", in_range(1), ">= 1"),
            ("neighbours", in_range(0), ">= 0"),
            ("description_words", in_range(0), ">= 0"),
            ("lm_valid_fraction", in_range(0.0, 0.9), "in [0, 0.9]"),
            ("confidence_threshold", in_range(0.0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
            ("use_names", lambda v: v or self.use_codes, "names or codes (or both) must be used"),
        ])


def readable_relation(name: str) -> str:
    """'/people/person/profession' -> 'people person profession'; '_hypernym' -> 'hypernym'."""
    return re.sub(r"[\s_/.]+", " ", name).strip()


def cut_words(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


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
        out = []
        for i in order:
            h, r, t = (int(v) for v in self.train[triples[i]])
            if exclude is not None and (h, r, t) == exclude:
                continue
            out.append((h, r, t))
            if len(out) == limit:
                break
        return out


def entity_text(kg: KnowledgeGraph, entity: int, tokens: list[str] | None, config: InstructConfig) -> str:
    parts = []
    if config.use_names:
        parts.append(kg.labels[entity])
    if config.use_codes and tokens is not None:
        parts.append(f"{ENTITY_BEGIN}{tokens[entity]}{ENTITY_END}")
    return " ".join(parts)


def query_lines(relation_name: str, direction: int, known_text: str) -> tuple[str, str]:
    """The query triple with its unknown side marked, and the question (first and last lines of a prompt)."""
    relation = readable_relation(relation_name)
    if direction == 0:
        return (f"Here is a triple with the tail entity unknown: ({known_text}, {relation}, ?).",
                "What is the tail entity?")
    return (f"Here is a triple with the head entity unknown: (?, {relation}, {known_text}).",
            "What is the head entity?")


def sampled_rows(rng: np.random.Generator, total: int, limit: int) -> np.ndarray | None:
    """Sorted ``limit`` of ``total`` query rows drawn without replacement; None (all rows) when no limit bites."""
    return np.sort(rng.choice(total, limit, replace=False)) if 0 < limit < total else None


def query_records(kg: KnowledgeGraph, rows: np.ndarray | None, tokens: list[str] | None, config: InstructConfig
                  ) -> list[dict[str, Any]]:
    """ReaLM's short form for training queries ``rows`` (None: all; indices into train triples, both directions:
    i < n is the tail query of triple i, else the head query of triple i - n): query line, question, answer."""
    train = kg.train.numpy()
    n = len(train)
    records = []
    for i in (range(2 * n) if rows is None else rows.tolist()):  # building text: one pass per query
        h, r, t = (int(v) for v in train[i % n])
        direction = int(i >= n)
        known, gold = (h, t) if direction == 0 else (t, h)
        query, question = query_lines(kg.relation_names[r], direction, entity_text(kg, known, tokens, config))
        records.append({
            "id": f"train-{i % n}-{'tail' if direction == 0 else 'head'}", "split": "train",
            "direction": "tail" if direction == 0 else "head",
            "triple": [kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]],
            "known": known, "gold": gold,
            "prompt": f"{query}\n{question}", "answer": entity_text(kg, gold, tokens, config),
        })
    return records


def build_prompt(kg: KnowledgeGraph, triple: tuple[int, int, int], direction: int, candidates: list[int],
                 neighbours: list[tuple[int, int, int]], tokens: list[str] | None, config: InstructConfig) -> str:
    """The DIFT instruction (GS-Quant adds codes): query, known entity, its triples, the candidate list."""
    h, r, t = triple
    known = h if direction == 0 else t
    known_text = entity_text(kg, known, tokens, config)
    query, question = query_lines(kg.relation_names[r], direction, known_text)
    lines = [query]
    if config.use_descriptions and kg.descriptions[known]:
        lines.append(f"About {known_text}: {cut_words(kg.descriptions[known], config.description_words)}")
    if config.use_neighbours and neighbours:
        facts = "; ".join(
            f"({entity_text(kg, a, tokens, config)}, {readable_relation(kg.relation_names[b])}, "
            f"{entity_text(kg, c, tokens, config)})" for a, b, c in neighbours)
        lines.append(f"Known facts about {known_text}: {facts}.")
    listed = "; ".join(entity_text(kg, c, tokens, config) for c in candidates)
    lines.append(f"{question} Choose one of these candidates: {listed}.")
    return "\n".join(lines)


def load_tokens(quantize_artifact: str | Path | None, kg: KnowledgeGraph) -> list[str] | None:
    """Token strings per entity from a stage-4 artifact's tokens.txt (checked against the KG's order)."""
    if quantize_artifact is None:
        return None
    path = Path(quantize_artifact) / "tokens.txt"
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    if [r[1] for r in rows] != kg.entity_names:
        raise ValueError(f"{path}: entity order differs from the KG's; was it made from another dataset?")
    return [r[2] for r in rows]


def records_for_split(kg: KnowledgeGraph, ranked: RankedQueries, split: str, tokens: list[str] | None,
                      neighbours: NeighbourIndex, config: InstructConfig, rows: np.ndarray | None = None,
                      shuffle: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """One instruction record per ranked query (both directions), or per query in ``rows``.

    ``shuffle``: list each query's candidates in random order (training queries).
    """
    k = min(config.top_k, ranked.candidates.shape[1])
    n = len(ranked.triples) // 2
    records = []
    for i in (range(len(ranked.triples)) if rows is None else rows):  # building text: one pass per query
        h, r, t = (int(v) for v in ranked.triples[i])
        direction = int(ranked.direction[i])
        known = h if direction == 0 else t
        gold = int(ranked.gold[i])
        candidates = [int(c) for c in ranked.candidates[i, :k]]
        scores = ([round(float(v), 5) for v in ranked.candidate_scores[i, :k]]
                  if ranked.candidate_scores is not None else None)
        if shuffle is not None:
            order = shuffle.permutation(k)
            candidates = [candidates[j] for j in order]
            scores = [scores[j] for j in order] if scores is not None else None
        rank = float(ranked.rank[i])
        in_list = gold in candidates
        confidence = 100.0 * float(ranked.gold_probability[i]) + 1.0 / rank if rank <= k else 1.0 / rank
        exclude = (h, r, t) if split == "train" else None
        context = neighbours.for_query(known, r, direction == 0, exclude, config.neighbours)
        records.append({
            "id": f"{split}-{i % n}-{'tail' if direction == 0 else 'head'}",
            "split": split, "direction": "tail" if direction == 0 else "head",
            "triple": [kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]],
            "known": known, "gold": gold, "candidates": candidates, "candidate_scores": scores,
            "candidate_text": [entity_text(kg, c, tokens, config) for c in candidates],
            "gold_in_candidates": in_list, "stage1_rank": rank, "confidence": confidence,
            "prompt": build_prompt(kg, (h, r, t), direction, candidates, context, tokens, config),
            "answer": entity_text(kg, gold, tokens, config),
        })
    return records


def split_examples(records: list[dict[str, Any]], config: InstructConfig) -> tuple[list, list, int]:
    """Shuffle, split into LM-train / LM-valid, filter LM-train by confidence (truncated sampling).

    Returns (LM-train, LM-valid, number of LM-train records dropped by the filter).
    """
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(records))
    cut = int(round(len(records) * (1.0 - config.lm_valid_fraction)))
    candidates = [records[i] for i in order[:cut]]
    # With k = 20 the threshold alone drops every gold outside the list (1/21 < 0.05);
    # with a shorter list it would not, so that condition is stated explicitly.
    train = [r for r in candidates if r["confidence"] > config.confidence_threshold and r["gold_in_candidates"]]
    valid = [records[i] for i in order[cut:]]
    return train, valid, len(candidates) - len(train)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_instruct(
    config: InstructConfig,
    data: str | Path | KnowledgeGraph,
    embeddings: str | Path | None,
    dest: str | Path,
    *,
    codes: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Stage 5a: write LM-train, LM-valid and test instructions (see the module docstring)."""
    kg = data if isinstance(data, KnowledgeGraph) else load_kg(data)
    tokens = load_tokens(codes, kg) if config.use_codes else None
    if config.use_codes and tokens is None:
        raise ValueError("use_codes needs codes (a stage-4 artifact); set use_codes=false for DIFT without codes")
    log(format_config(config))
    if config.task == "classification":
        return _classification_instruct(config, kg, tokens, Path(dest), codes, log)
    if embeddings is None:
        raise ValueError("link-prediction instructions need a stage-1 artifact (embeddings)")
    embeddings = Path(embeddings)
    dift_train_queries = config.train_from_train_queries and config.train_query_format == "dift"
    sources = ["valid", "test"] + (["train"] if dift_train_queries else [])
    ranked = {}
    for split in sources:
        path = embeddings / "candidates" / f"{split}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: export {split} candidates in stage 1 (export_splits)")
        ranked[split] = RankedQueries.load(path)
    neighbours = NeighbourIndex(kg)
    inputs = hash_inputs({"embeddings": embeddings, **({"codes": Path(codes)} if codes else {})})
    with artifact_dir(dest, stage="instruct", config=config, inputs=inputs) as writer:
        valid_records = records_for_split(kg, ranked["valid"], "valid", tokens, neighbours, config)
        lm_train, lm_valid, dropped = split_examples(valid_records, config)
        from_validation = len(lm_train)
        rng = np.random.default_rng(config.seed + 1)
        if dift_train_queries:
            rows = sampled_rows(rng, len(ranked["train"].triples), config.train_queries)
            extra = records_for_split(kg, ranked["train"], "train", tokens, neighbours, config, rows=rows,
                                      shuffle=rng if config.shuffle_train_query_candidates else None)
            lm_train += [r for r in extra if r["confidence"] > config.confidence_threshold and r["gold_in_candidates"]]
        elif config.train_from_train_queries:  # ReaLM's short form, straight from the training graph
            lm_train += query_records(kg, sampled_rows(rng, 2 * len(kg.train), config.train_queries), tokens, config)
        if config.train_from_train_queries:
            lm_train = [lm_train[i] for i in rng.permutation(len(lm_train))]
        test = records_for_split(kg, ranked["test"], "test", tokens, neighbours, config)
        for name, records in (("lm_train", lm_train), ("lm_valid", lm_valid), ("test", test)):
            write_jsonl(writer.path / f"{name}.jsonl", records)
        writer.metrics.update({
            "lm_train": len(lm_train), "lm_valid": len(lm_valid), "test": len(test),
            "validation_queries": len(valid_records),
            "lm_train_dropped": dropped, "lm_train_from_train_queries": len(lm_train) - from_validation,
            "test_gold_in_candidates": float(np.mean([r["gold_in_candidates"] for r in test])) if test else 0.0,
        })
    log(f"instruct: {len(lm_train)} LM-train, {len(lm_valid)} LM-valid, {len(test)} test records -> {dest}")
    return Path(dest)


def _classification_instruct(config: InstructConfig, kg: KnowledgeGraph, tokens: list[str] | None, dest: Path,
                             codes: str | Path | None, log: Callable[[str], None]) -> Path:
    """True/false instructions (:mod:`kgtok.llm.classify`): a training-triple sample, valid, test."""
    from kgtok.llm.classify import classification_records

    rng = np.random.default_rng(config.seed)
    neighbours = NeighbourIndex(kg)
    train = kg.train.numpy()
    if config.classification_train_triples and len(train) > config.classification_train_triples:
        train = train[np.sort(rng.choice(len(train), config.classification_train_triples, replace=False))]
    splits = {"lm_train": train, "lm_valid": kg.valid.numpy(), "test": kg.test.numpy()}
    inputs = hash_inputs({**({"kg": Path(kg.source)} if kg.source else {}),
                          **({"codes": Path(codes)} if codes else {})})
    with artifact_dir(dest, stage="instruct", config=config, inputs=inputs) as writer:
        for name, triples in splits.items():
            records = classification_records(kg, triples, name, tokens, neighbours, config, rng)
            write_jsonl(writer.path / f"{name}.jsonl", records)
            writer.metrics[name] = len(records)
    log(f"instruct (classification): {writer.metrics} records -> {dest}")
    return dest
