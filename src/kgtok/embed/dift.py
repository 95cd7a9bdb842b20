"""DIFT's candidate files: kgtok's stage-1 candidates written in them, and theirs read into kgtok's.

GS-Quant and SSQR evaluate on the candidate lists DIFT released (from stronger
retrievers than a CPU can train); DIFT's own code reads one JSON list per
split, built by its ``data_construct.py``.  Per triple i of a split it holds
the tail query, then the head query:

    {"triplet": [h, r, t],            # the head query stores [t, r, h]
     "inverse": false,                # true for the head query
     "rank": 3,                       # filtered rank of the answer (> len(topk) when it is not listed)
     "topk_ents": ["/m/0x", ...],     # raw entity ids, best first
     "topk_names": ["dog", ...],
     "topk_scores": [0.71, ...],
     "query_id": 1,                   # 2i + 1 for the tail query, 2i for the head query
     "entity_ids": [17, ...]}         # the candidates' row ids (here: kgtok's entity ids)

``write_dift`` turns a stage-1 artifact's ``candidates/{split}.npz`` into
``{split}.json`` files in that layout (DIFT's prompts are built from them by its
own code); ``import_dift`` reads such files back into a stage-1 artifact that
holds only candidates, which ``kgtok instruct --embeddings`` takes like any
stage-1 artifact, so the LM stage (with codes) runs on the papers' candidates.
Extra keys DIFT adds later (``input``, ``output``, ``choices``) are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.artifacts import artifact_dir, check_id_order, hash_inputs, write_id_order, write_json_atomic
from kgtok.config import check_fields
from kgtok.data.graph import KnowledgeGraph, load_kg
from kgtok.embed.layout import EmbedArtifact
from kgtok.embed.ranking import RankedQueries


def dift_records(ranked: RankedQueries, kg: KnowledgeGraph) -> list[dict[str, Any]]:
    """DIFT's list for one split: per triple its tail query, then its head query."""
    n = len(ranked.triples) // 2
    ents, rels = kg.entity_names, kg.relation_names
    records = []
    for i in range(n):
        for row, inverse in ((i, False), (n + i, True)):  # RankedQueries: tails first, then heads
            h, r, t = (int(x) for x in ranked.triples[row])
            # Stage 1 pads a short list with filtered entities scored -inf (other true answers): never listed.
            listed = np.isfinite(ranked.candidate_scores[row])
            candidates = [int(c) for c in ranked.candidates[row][listed]]
            records.append({
                "triplet": [ents[t], rels[r], ents[h]] if inverse else [ents[h], rels[r], ents[t]],
                "inverse": inverse,
                "rank": int(round(float(ranked.rank[row]))),
                "topk_ents": [ents[c] for c in candidates],
                "topk_names": [kg.labels[c] for c in candidates],
                "topk_scores": [float(s) for s in ranked.candidate_scores[row][listed]],
                "query_id": 2 * i if inverse else 2 * i + 1,
                "entity_ids": candidates,
            })
    return records


def write_dift(embeddings: str | Path, data: str | Path | KnowledgeGraph, dest: str | Path, *,
               splits: Sequence[str] = ("valid", "test")) -> list[Path]:
    """``dest/{split}.json`` in DIFT's layout from a stage-1 artifact's candidate files."""
    kg = data if isinstance(data, KnowledgeGraph) else load_kg(data)
    artifact = EmbedArtifact(embeddings).checked("--embeddings")
    check_id_order(artifact.entities, kg.entity_names)  # its candidate lists hold its own ids
    check_id_order(artifact.relations, kg.relation_names, "relation")
    unknown = [split for split in splits if split not in ("train", "valid", "test")]
    if unknown:
        raise ValueError(f"--splits: {', '.join(unknown)}: expected some of train, valid, test")
    missing = [str(artifact.candidates(split)) for split in splits if not artifact.candidates(split).exists()]
    if missing:  # checked for every split before the first file is written
        raise FileNotFoundError(f"{', '.join(missing)} not found: export those splits' candidates in stage 1 "
                                "(export_splits)")
    return [write_json_atomic(Path(dest) / f"{split}.json",
                              dift_records(RankedQueries.load(artifact.candidates(split)), kg)) for split in splits]


def ranked_from_dift(records: list[dict[str, Any]], kg: KnowledgeGraph, source: Path) -> RankedQueries:
    """kgtok's candidates of one split from DIFT's records (tail queries first, then head queries)."""
    entity_id, relation_id = kg.entity_to_id, kg.relation_to_id

    def ids(names: list[str], table: dict[str, int], where: str) -> list[int]:
        unknown = [x for x in names if x not in table]
        if unknown:
            raise ValueError(f"{source}: {where}: {unknown[0]!r} is not in the KG; was the file made for "
                             "another dataset?")
        return [table[x] for x in names]

    rows = []
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: record {number}: {record!r} is not a JSON object (DIFT's records are)")
        where = f"record {number} (query_id {record.get('query_id')})"
        try:
            first, relation, second = record["triplet"]
            inverse = bool(record["inverse"])
            h, t = (second, first) if inverse else (first, second)
            triple = ids([h], entity_id, where) + ids([relation], relation_id, where) + ids([t], entity_id, where)
            candidates = ids(list(record["topk_ents"]), entity_id, where)
            scores = [float(s) for s in record["topk_scores"]]
            rank = float(record["rank"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith(str(source)):
                raise
            raise ValueError(f"{source}: {where}: expected DIFT's keys triplet, inverse, rank, topk_ents, "
                             f"topk_scores ({e})") from None
        rows.append((int(inverse), triple, candidates, scores, rank))
    bad = next((n for n, r in enumerate(rows) if len(r[2]) != len(r[3])), None)
    if bad is not None:
        raise ValueError(f"{source}: record {bad}: {len(rows[bad][2])} topk_ents but {len(rows[bad][3])} topk_scores")
    # A list shorter than the longest (the filter left fewer than k entities) is padded as stage 1 pads one:
    # scores -inf, which instruct never lists (the padding repeats the list's last entity, or the known one).
    width = max((len(r[2]) for r in rows), default=0)
    rows = [(d, triple, cands + [(cands or [triple[2 * d]])[-1]] * (width - len(cands)),
             scores + [-np.inf] * (width - len(scores)), rank) for d, triple, cands, scores, rank in rows]
    # kgtok pairs the queries of a triple (row i its tail query, row n + i its head query): keep the triples
    # whose two queries are both there (DIFT's train.json drops some by its confidence threshold).
    by_triple: dict[tuple[int, ...], dict[int, tuple]] = {}
    for row in rows:
        by_triple.setdefault(tuple(row[1]), {})[row[0]] = row
    paired = [queries for queries in by_triple.values() if len(queries) == 2]
    ordered = [queries[0] for queries in paired] + [queries[1] for queries in paired]
    triples = np.array([r[1] for r in ordered], dtype=np.int64).reshape(-1, 3)
    direction = np.array([r[0] for r in ordered], dtype=np.int8)
    gold = np.where(direction == 0, triples[:, 2], triples[:, 0]).astype(np.int64)
    rank = np.array([r[4] for r in ordered], dtype=np.float64)
    candidates = np.array([r[2] for r in ordered], dtype=np.int64).reshape(len(ordered), width)
    scores = np.array([r[3] for r in ordered], dtype=np.float32).reshape(len(ordered), width)
    # DIFT's confidence uses the listed answer's score (data_construct.divide_valid): it stands in for the
    # probability kgtok's own stage 1 records; NaN where the answer is not listed.
    listed = (rank >= 1) & (rank <= width)
    gold_score = np.full(len(ordered), np.nan, dtype=np.float32)
    gold_score[listed] = scores[listed, rank[listed].astype(np.int64) - 1]
    gold_score[~np.isfinite(gold_score)] = np.nan  # a rank that falls on a short list's padding
    return RankedQueries(triples=triples, direction=direction, gold=gold, rank=rank, gold_score=gold_score,
                         gold_probability=np.nan_to_num(gold_score, nan=0.0), candidates=candidates,
                         candidate_scores=scores)


@dataclass(frozen=True, kw_only=True)
class DiftImportConfig:
    """Which of DIFT's split files become which kgtok candidate split."""

    # DIFT's train.json and valid.json both come from the validation queries (its LM-train/LM-valid):
    # together they are kgtok's valid candidates, from which `kgtok instruct` makes its own split.
    valid_files: tuple[str, ...] = ("train.json", "valid.json")
    test_files: tuple[str, ...] = ("test.json",)

    def __post_init__(self) -> None:
        check_fields(self, [
            ("valid_files", lambda v: all(isinstance(f, str) and f for f in v), "file names"),
            ("test_files", lambda v: len(v) > 0, "at least one file name"),
        ])


def import_dift(data: str | Path | KnowledgeGraph, dift_dir: str | Path, dest: str | Path, *,
                config: DiftImportConfig = DiftImportConfig(),
                log: Callable[[str], None] = print) -> Path:
    """A stage-1 artifact holding DIFT's candidates (``candidates/{valid,test}.npz``), no embeddings."""
    kg = data if isinstance(data, KnowledgeGraph) else load_kg(data)
    dift_dir = Path(dift_dir)
    files = {"valid": [dift_dir / f for f in config.valid_files if (dift_dir / f).exists()],
             "test": [dift_dir / f for f in config.test_files]}
    missing = [str(p) for p in files["test"] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: no such DIFT split file")
    inputs = hash_inputs({p.name: p for paths in files.values() for p in paths})
    counts = {}
    with artifact_dir(dest, stage="embed", config=config, inputs=inputs) as writer:
        out = EmbedArtifact(writer.path)
        for split, paths in files.items():
            if not paths:
                continue
            records = []
            for path in paths:
                try:
                    loaded = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}: not a JSON list of DIFT records ({e})") from None
                if not isinstance(loaded, list):
                    raise ValueError(f"{path}: expected a JSON list of DIFT records, got {type(loaded).__name__}")
                records += loaded
            ranked = ranked_from_dift(records, kg, paths[0])
            ranked.save(out.candidates(split))
            if split == "valid":  # DIFT's lists as given serve LM-train and LM-valid alike (one filter)
                ranked.save(out.candidates("valid_eval"))
            counts[split] = len(ranked.triples)
            writer.metrics[f"{split}_unpaired_dropped"] = len(records) - len(ranked.triples)
            ranks = ranked.rank
            writer.metrics.update({f"{split}_queries": len(ranks), f"{split}_mrr": float(np.mean(1 / ranks)),
                                   f"{split}_hits_at_1": float(np.mean(ranks <= 1))})
        write_id_order(out.entities, kg.entity_names)
        write_id_order(out.relations, kg.relation_names)
    log(f"dift import: {counts} queries -> {dest}")
    return Path(dest)
