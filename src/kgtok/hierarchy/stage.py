"""Stage 3 recipe: load vectors, fuse, build the tree, write the artifact.

Artifact layout::

    manifest.json          stage, config, input hashes, metrics (counts, silhouette, NMI vs true types)
    fused_vectors.npy      (N, D) float32 unit rows s_x: the quantizer's input
    hierarchy.npz          paths (N, levels) int64; for each level l: parents_l (k_l,),
                           centroids_l (k_l, D) fused-space unit means μ, text_centroids_l
                           (k_l, D_text) when text vectors exist, neighbours_l (k_l, n) (-1 pads)
    hierarchy.json         for people: per cluster its size, parent, member labels nearest
                           the centroid, top words, children
    entities.tsv           id<TAB>raw name: the row order
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.artifacts import check_id_order, load_entity_vectors, write_id_order, write_json_atomic
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.layout import EmbedArtifact
from kgtok.hierarchy.build import SemanticHierarchy, cluster_means, fuse, normalize_rows
from kgtok.hierarchy.config import HierarchyConfig
from kgtok.hierarchy.layout import HierarchyArtifact
from kgtok.stage import Context, Input, Stage, run_stage
from kgtok.text.layout import TextArtifact

READABLE_TREE = 100_000  # entities up to which hierarchy.json is indented (larger: one line, written 7x faster)


def word_matrix(texts: list[str]) -> tuple[Any, np.ndarray] | None:
    """(N, V) sparse binary word occurrences of the entities' texts and the vocabulary; None: no word
    occurs twice. Built once and read by every level's :func:`top_words`."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(stop_words="english", min_df=2, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b",
                                 binary=True)
    try:
        words = vectorizer.fit_transform(texts)
    except ValueError:  # no word occurs twice
        return None
    return words, np.asarray(vectorizer.get_feature_names_out())


def top_words(texts: list[str] | tuple[Any, np.ndarray] | None, labels: np.ndarray, k: int,
              count: int = 8) -> list[list[str]]:
    """Words most over-represented in each cluster's texts (lift over the whole KG).

    ``texts``: the texts, or their :func:`word_matrix` (one vectorizer pass for all levels).
    Kept sparse: a dense (clusters x vocabulary) matrix is GBs at WN18RR's finest level.
    """
    from scipy.sparse import csr_matrix

    matrix = word_matrix(texts) if isinstance(texts, list) else texts
    if matrix is None:
        return [[] for _ in range(k)]
    words, vocabulary = matrix
    indicator = csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    per_cluster = (indicator @ words).tocsr()  # (k, V) sparse: documents containing the word
    sizes = np.asarray(indicator.sum(axis=1)).ravel()
    overall = np.asarray(words.sum(axis=0)).ravel() / len(labels)
    rows = np.repeat(np.arange(k), np.diff(per_cluster.indptr))
    hits = per_cluster.data
    lift = (hits / np.maximum(sizes[rows], 1)) / np.maximum(overall[per_cluster.indices], 1e-12)
    score = np.where(hits >= np.minimum(2, sizes[rows]), lift * np.log1p(hits), 0.0)
    out = []
    for cluster in range(k):  # a loop over clusters, each over its own nonzero words
        span = slice(per_cluster.indptr[cluster], per_cluster.indptr[cluster + 1])
        best = np.argsort(-score[span], kind="stable")[:count]
        out.append([str(vocabulary[per_cluster.indices[span][j]]) for j in best if score[span][j] > 0])
    return out


def describe(hierarchy: SemanticHierarchy, vectors: np.ndarray, kg: KnowledgeGraph, top_labels: int) -> dict[str, Any]:
    """The readable tree: level-1 clusters with nested children, labels nearest their centroid."""
    texts = word_matrix([f"{label} {description}" for label, description in zip(kg.labels, kg.descriptions)])
    levels = []
    for level, k in enumerate(hierarchy.counts_):
        labels = hierarchy.paths_[:, level]
        similarity = np.einsum("nd,nd->n", vectors, hierarchy.centroids_[level][labels])
        order = np.lexsort((-similarity, labels))  # by cluster, nearest the centroid first
        starts = np.searchsorted(labels[order], np.arange(k))
        sizes = np.bincount(labels, minlength=k)
        words = top_words(texts, labels, k)
        levels.append([
            {
                "level": level + 1, "cluster": c, "parent": int(hierarchy.parents_[level][c]), "size": int(sizes[c]),
                "top_words": words[c],
                "members": [kg.labels[i] for i in order[starts[c] : starts[c] + min(top_labels, sizes[c])]],
                "member_ids": [kg.entity_names[i] for i in order[starts[c] : starts[c] + min(top_labels, sizes[c])]],
                "neighbours": [int(n) for n in hierarchy.neighbours_[level][c] if n >= 0],
            }
            for c in range(k)
        ])
    for level in range(len(levels) - 1, 0, -1):  # nest children under parents, largest first
        for node in sorted(levels[level], key=lambda n: -n["size"]):
            levels[level - 1][node["parent"]].setdefault("children", []).append(node)
    return {"levels": len(levels), "counts": hierarchy.counts_,
            "clusters": sorted(levels[0], key=lambda n: -n["size"])}


def alignment_with_types(paths: np.ndarray, types: np.ndarray | None) -> dict[str, float]:
    """NMI of each tree level with the same level of a known taxonomy (synthetic KG)."""
    from sklearn.metrics import normalized_mutual_info_score

    if types is None:
        return {}
    known = (types >= 0).all(axis=1)
    out = {}
    for level in range(min(paths.shape[1], types.shape[1])):
        out[f"nmi_level_{level + 1}"] = float(normalized_mutual_info_score(types[known, level], paths[known, level]))
    return out


def run(config: HierarchyConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Fuse stage-1 and stage-2 vectors and build (or import, with ``tree``) the tree."""
    kg = ctx.kg
    graph_vectors = (load_entity_vectors(EmbedArtifact(inputs["embeddings"]).entity_embeddings, kg.entity_names)
                     if "embeddings" in inputs else None)
    text_vectors = (load_entity_vectors(TextArtifact(inputs["text"]).text_embeddings, kg.entity_names)
                    if "text" in inputs else None)
    if graph_vectors is None and text_vectors is None:
        raise ValueError("the hierarchy needs --embeddings (a stage-1 artifact), --text (a stage-2 artifact) or both")
    metrics: dict[str, Any] = {}
    out = HierarchyArtifact(dest)
    with ctx.timed("fuse"):
        rho = config.rho if graph_vectors is not None and text_vectors is not None else (
            1.0 if text_vectors is None else 0.0)
        fused = fuse(graph_vectors, text_vectors, rho, config.width, config.seed)
    with ctx.timed("build"):
        hierarchy = SemanticHierarchy(config)
        if "tree" in inputs:
            from kgtok.hierarchy.kgfit import import_kgfit_tree

            paths, report = import_kgfit_tree(inputs["tree"], kg, fused, config.levels)
            hierarchy.builder_ = "kgfit-import"
            hierarchy.top_silhouettes_ = {}
            hierarchy.set_paths(paths, fused)
            metrics.update(report)
        else:
            hierarchy.fit(fused)
    np.save(out.fused_vectors, fused.astype(np.float32))
    arrays: dict[str, np.ndarray] = {"paths": hierarchy.paths_}
    for level in range(config.levels):
        arrays[f"parents_{level}"] = hierarchy.parents_[level]
        arrays[f"centroids_{level}"] = hierarchy.centroids_[level]
        arrays[f"neighbours_{level}"] = hierarchy.neighbours_[level]
        if text_vectors is not None:
            arrays[f"text_centroids_{level}"] = cluster_means(
                normalize_rows(text_vectors.astype(np.float32)), hierarchy.paths_[:, level],
                hierarchy.counts_[level], normalize=True)
    np.savez(out.arrays, **arrays)
    with ctx.timed("describe"):
        write_json_atomic(out.tree_json, describe(hierarchy, fused, kg, config.top_labels),
                          indent=2 if len(fused) <= READABLE_TREE else None)
    write_id_order(out.entities, kg.entity_names)
    sizes = np.bincount(hierarchy.paths_[:, 0])
    metrics.update({
        "builder": hierarchy.builder_, "counts": hierarchy.counts_, "rho": rho,
        "top_silhouettes": {str(k): round(v, 4) for k, v in hierarchy.top_silhouettes_.items()},
        "level_1_largest_share": float(sizes.max() / sizes.sum()),
        **alignment_with_types(hierarchy.paths_, kg.entity_types),
    })
    ctx.log(f"hierarchy: {hierarchy.builder_}, clusters per level {hierarchy.counts_}")
    return metrics


STAGE = Stage(
    name="hierarchy", title="stage 3: semantic hierarchy", config=HierarchyConfig, run=run,
    inputs=(Input("embeddings", "embed", EmbedArtifact, "a stage-1 artifact (graph vectors)"),
            Input("text", "text", TextArtifact, "a stage-2 artifact (text vectors)"),
            Input("tree", None, None, "a KG-FIT seed_hierarchy.json / llm_hierarchy.json to import")),
    needs=lambda config: (), summary=("counts", "nmi_level_1", "nmi_level_2"),
)


def run_hierarchy(
    config: HierarchyConfig,
    data: str | Path | KnowledgeGraph,
    dest: str | Path,
    *,
    embeddings: str | Path | None = None,
    text: str | Path | None = None,
    tree: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Stage 3 into ``dest`` (reused when current, unless ``force``)."""
    return run_stage(STAGE, config, dest, data=data, inputs={"embeddings": embeddings, "text": text, "tree": tree},
                     progress=progress, log=log, reuse=not force).path


def load_hierarchy(artifact: str | Path, entity_names: list[str] | None = None) -> dict[str, Any]:
    """The arrays of a hierarchy artifact: paths, and per level parents/centroids/neighbours.

    ``entity_names``: the KG's; the artifact's rows (paths, fused vectors) are checked to be in its order
    (first: the folder of another graph is named as such)."""
    if entity_names is not None:
        check_id_order(HierarchyArtifact(artifact).entities, entity_names)
    artifact = HierarchyArtifact(artifact).checked()
    fused = np.load(artifact.fused_vectors) if entity_names is None else load_entity_vectors(
        artifact.fused_vectors, entity_names)
    with np.load(artifact.arrays) as data:
        arrays = {k: data[k] for k in data.files}
    levels = arrays["paths"].shape[1]
    return {
        "paths": arrays["paths"],
        "parents": [arrays[f"parents_{l}"] for l in range(levels)],
        "centroids": [arrays[f"centroids_{l}"] for l in range(levels)],
        "neighbours": [arrays[f"neighbours_{l}"] for l in range(levels)],
        "text_centroids": [arrays.get(f"text_centroids_{l}") for l in range(levels)],
        "fused_vectors": fused,
    }
