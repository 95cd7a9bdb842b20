"""Import embeddings trained elsewhere (PyKEEN, the RotatE code) as a stage-1 artifact.

Users who already have vectors skip training: give the entity matrix and the
raw entity id of each row; kgtok reorders the rows to its own ids.  With the
relation matrix and the model name as well, the scoring function is rebuilt
and the artifact gets metrics and candidates exactly as a trained one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok.artifacts import artifact_dir, hash_inputs, write_id_order
from kgtok.config import check_fields, in_range, machine
from kgtok.data.errors import KGFormatError
from kgtok.data.graph import KnowledgeGraph, load_kg
from kgtok.data.reader import read_table
from kgtok.embed.config import EmbedConfig, ModelName
from kgtok.embed.layout import EmbedArtifact
from kgtok.embed.models import build_model
from kgtok.embed.ranking import rank_splits
from kgtok.embed.train import export
from kgtok.runtime import torch_threads


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """How to read foreign embeddings; model fields only matter when relations are given."""

    model: ModelName | None = None  # scoring function of the vectors; None: vectors only, no ranking
    # γ of RotatE/TransE vectors (RotatE's relation phases are scaled by it): a wrong γ ranks RotatE wrongly.
    margin: float | None = None  # None: the γ the source records (DGL-KE's config.json), else EmbedConfig's
    reciprocal: bool = False  # relation matrix holds 2R rows: inverse relations after the originals
    top_k: int = 20  # candidates per query
    export_splits: tuple[str, ...] = ("train", "valid", "test")
    eval_batch_size: int = 512
    threads: int = machine(0)

    def __post_init__(self) -> None:
        check_fields(self, [
            ("margin", lambda v: v is None or v >= 0, ">= 0 (or null: the source's own)"),
            ("top_k", in_range(1), "a positive integer"),
            ("eval_batch_size", in_range(1), "a positive integer"),
            ("threads", in_range(0), ">= 0"),
            ("export_splits", lambda v: set(v) <= {"train", "valid", "test"}, "a subset of train, valid, test"),
        ])


def read_order(path: str | Path) -> list[str]:
    """Raw ids in row order: one name per line, or ``index<TAB>name`` lines (a RotatE .dict)."""
    path = Path(path)
    table = read_table(path, (1, 2), "name, or index<TAB>name")
    if all(len(v) == 0 for v in table.columns[1]):
        return table.columns[0]
    try:
        index = np.asarray([int(i) for i in table.columns[0]])
    except ValueError:
        bad = next(i for i, v in enumerate(table.columns[0]) if not v.lstrip("-").isdigit())
        raise KGFormatError(path, int(table.line_numbers[bad]), "expected an integer row index before the tab") from None
    names = np.asarray(table.columns[1], dtype=object)
    if sorted(index.tolist()) != list(range(len(index))):
        raise KGFormatError(path, None, f"row indices must be 0..{len(index) - 1}, each once")
    ordered = np.empty(len(index), dtype=object)
    ordered[index] = names
    return [str(n) for n in ordered]


def align_rows(vectors: np.ndarray, order: list[str], names: list[str], *, what: str,
               source: str | Path) -> np.ndarray:
    """Reorder ``vectors`` (one row per name of ``order``) to the KG's id order ``names``."""
    if np.ndim(vectors) != 2 or not np.issubdtype(np.asarray(vectors).dtype, np.number):
        raise ValueError(f"{source}: {what} vectors of shape {np.shape(vectors)} and dtype "
                         f"{np.asarray(vectors).dtype}; expected a 2-D array of numbers, one row per {what}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{source}: {int((~np.isfinite(vectors)).any(axis=1).sum())} {what} row(s) hold NaN or "
                         "infinite values")
    if len(vectors) != len(order):
        hint = (" (twice as many: reciprocal relations after the originals, as kgtok's own stage 1 writes them; "
                "give reciprocal=true)") if what == "relation" and len(vectors) == 2 * len(order) else ""
        raise ValueError(f"{source}: {len(vectors)} rows but the order file lists {len(order)} {what}s{hint}")
    position = {name: i for i, name in enumerate(order)}
    rows = np.fromiter((position.get(n, -1) for n in names), dtype=np.int64, count=len(names))
    if (rows < 0).any():
        missing = [names[i] for i in np.flatnonzero(rows < 0)[:5]]
        raise ValueError(f"{source}: {int((rows < 0).sum())} {what}(s) of the KG have no vector, e.g. {missing}")
    return vectors[rows]


@dataclass
class ForeignEmbeddings:
    """Vectors trained by another engine, with the raw name of every row (read by :mod:`kgtok.embed.formats`).

    ``model`` is the kgtok scoring function the relation vectors are laid out
    for (None: none matches, or unknown; the entity vectors still import).
    """

    entity_vectors: np.ndarray  # (N, D)
    entity_names: list[str]  # raw name of each row
    relation_vectors: np.ndarray | None = None  # (R, D_r), or (2R, D_r) with reciprocal relations
    relation_names: list[str] | None = None  # None: rows already in the KG's relation order
    model: str | None = None
    margin: float | None = None  # γ the source's config records (DGL-KE's gamma); None: not recorded
    files: dict[str, Path] = field(default_factory=dict)  # what was read: hashed into the manifest
    source: str = "entity vectors"  # for messages: "PyTorch-BigGraph", "DGL-KE"


def import_embeddings(
    data: str | Path | KnowledgeGraph,
    entity_vectors: str | Path,
    entity_order: str | Path,
    dest: str | Path,
    *,
    relation_vectors: str | Path | None = None,
    relation_order: str | Path | None = None,
    config: ImportConfig = ImportConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a stage-1 artifact from foreign ``.npy`` vectors and their row orders (see module docstring)."""
    entity_vectors = Path(entity_vectors)
    files = {"entity_vectors": entity_vectors}
    relations = relation_names = None
    if relation_vectors is not None:
        relation_vectors = Path(relation_vectors)
        files["relation_vectors"] = relation_vectors
        relations = np.load(relation_vectors)
        relation_names = read_order(relation_order) if relation_order is not None else None
    foreign = ForeignEmbeddings(entity_vectors=np.load(entity_vectors), entity_names=read_order(entity_order),
                                relation_vectors=relations, relation_names=relation_names, files=files,
                                source=str(entity_vectors))
    return import_foreign(data, foreign, dest, config=config, progress=progress, log=log)


def resolve_margin(given: float | None, foreign: ForeignEmbeddings, model: str,
                   log: Callable[[str], None]) -> float:
    """The γ to score with: the one given, else the source's recorded one, else EmbedConfig's default."""
    if given is None:
        return foreign.margin if foreign.margin is not None else EmbedConfig().margin
    if model == "rotate" and foreign.margin is not None and foreign.margin != given:  # elsewhere γ only offsets
        log(f"embed import: warning: margin={given} as given, but {foreign.source} was trained with "
            f"gamma={foreign.margin}; RotatE's phases are scaled by it, so its ranks change (omit margin to use it)")
    return given


def rank_imported(path: Path, kg: KnowledgeGraph, config: ImportConfig, margin: float, entities: np.ndarray,
                  relations: np.ndarray, relation_source: str, progress: bool) -> dict[str, Any]:
    """The scoring function rebuilt from imported vectors, every split ranked and exported into ``path`` as
    stage 1 does; returns the metrics."""
    complex_valued = config.model in ("complex", "rotate")
    dim = entities.shape[1] // 2 if complex_valued else entities.shape[1]
    model = build_model(config.model, kg.num_entities, relations.shape[0], dim, margin=margin)
    expected = tuple(model.relation.shape)
    if relations.shape != expected:
        raise ValueError(f"{relation_source}: relation matrix has shape {relations.shape}; {config.model} "
                         f"with these entity vectors expects {expected}")
    with torch.no_grad():
        model.entity.copy_(torch.as_tensor(entities, dtype=torch.float32))
        model.relation.copy_(torch.as_tensor(relations, dtype=torch.float32))
    ranked, metrics = rank_splits(model, kg, reciprocal=config.reciprocal, batch_size=config.eval_batch_size,
                                  top_k=config.top_k, export_splits=config.export_splits, progress=progress)
    embed_config = EmbedConfig(
        model=config.model, dim=dim, margin=margin, reciprocal=config.reciprocal,
        loss="1vsall" if config.reciprocal else "nssa", top_k=config.top_k, export_splits=config.export_splits,
    )
    export(path, model, kg, embed_config, None, metrics, ranked)
    return metrics


def import_foreign(
    data: str | Path | KnowledgeGraph,
    foreign: ForeignEmbeddings,
    dest: str | Path,
    *,
    config: ImportConfig = ImportConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a stage-1 artifact from vectors trained elsewhere: rows reordered to the KG's ids; with
    ``config.model`` the scoring function is rebuilt and every split ranked, as after training."""
    kg = data if isinstance(data, KnowledgeGraph) else load_kg(data)
    relation_source = next((str(p) for k, p in foreign.files.items() if "relation" in k), foreign.source)
    entities = align_rows(foreign.entity_vectors, foreign.entity_names, kg.entity_names,
                          what="entity", source=foreign.source)
    relations = None
    if foreign.relation_vectors is not None:
        matrix = foreign.relation_vectors
        names = list(kg.relation_names)
        if foreign.relation_names is not None:
            order = list(foreign.relation_names)
            if config.reciprocal:  # inverse rows follow the originals in the same order
                order = order + [f"{n}\u207b\u00b9" for n in order]
                names = names + [f"{n}\u207b\u00b9" for n in names]
            relations = align_rows(matrix, order, names, what="relation", source=relation_source)
        else:
            relations = matrix
    if config.model is not None and relations is None:
        raise ValueError("ranking imported vectors needs relation_vectors as well as model")
    if config.model is not None and foreign.model is not None and config.model != foreign.model:
        raise ValueError(f"{foreign.source}: its relation parameters score as model={foreign.model}, not "
                         f"model={config.model}")
    inputs = hash_inputs(foreign.files)
    with torch_threads(config.threads), artifact_dir(dest, stage="embed", config=config, inputs=inputs) as writer:
        if config.model is None:
            out = EmbedArtifact(writer.path)
            np.save(out.entity_embeddings, entities.astype(np.float32))
            if relations is not None:
                np.save(out.relation_embeddings, relations.astype(np.float32))
            write_id_order(out.entities, kg.entity_names)
            done = f"{entities.shape[0]} x {entities.shape[1]} entity vectors, no ranking (needs model= and relations)"
        else:
            margin = resolve_margin(config.margin, foreign, config.model, log)
            metrics = rank_imported(writer.path, kg, config, margin, entities, relations, relation_source, progress)
            writer.metrics.update({f"{s}_mrr": metrics[s]["both"]["mrr"] for s in ("valid", "test")})
            done = f"test MRR {metrics['test']['both']['mrr']:.4f}"
    log(f"embed import: {done} -> {dest}")
    return Path(dest)
