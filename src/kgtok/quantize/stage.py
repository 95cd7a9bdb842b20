"""Stage 4 recipe: fit the EntityTokenizer on stage-3 (or stage-1) vectors, measure, write.

Artifact layout::

    manifest.json     stage, config, input hashes, metrics, timings
    codes.npy         (N, width) int64 codes in entity-id order (the comparison format:
                      one row per entity, one column per level, the disambiguation last)
    tokens.txt        id<TAB>raw name<TAB>token string, one line per entity
    metrics.json      per-level entropy, utilisation, perplexity; collision rate before the fix;
                      reconstruction MSE and cosine; NMI with the hierarchy (and true types);
                      training history (losses, held-out entropy per evaluation)
    tokenizer/        EntityTokenizer.save(): reload with EntityTokenizer.load
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok.artifacts import load_entity_vectors, write_json_atomic
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.layout import EmbedArtifact
from kgtok.hierarchy.layout import HierarchyArtifact
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.layout import QuantizeArtifact
from kgtok.quantize.tokenizer import EntityTokenizer
from kgtok.stage import Context, Input, Stage, run_stage


def code_metrics(codes: np.ndarray, codebook_size: int) -> dict[str, list[float]]:
    """Per level: entropy (nats), utilisation (share of codes used), perplexity (exp entropy)."""
    entropy, utilisation = [], []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / len(codes)
        entropy.append(float(-(p * np.log(p)).sum()))
        utilisation.append(float((counts > 0).mean()))
    return {"entropy": entropy, "utilization": utilisation, "perplexity": [float(np.exp(h)) for h in entropy]}


def alignment(codes: np.ndarray, reference: np.ndarray | None, prefix: str) -> dict[str, float]:
    """NMI and homogeneity between level-l codes and level-l reference labels (clusters or true types).

    With K codes per level and far fewer clusters, NMI is capped by the codes'
    own entropy even when every code is pure; homogeneity (1 - H(cluster|code)/H(cluster))
    is 1 exactly when each code holds one cluster's entities: codes refine the tree.
    """
    from sklearn.metrics import homogeneity_score, normalized_mutual_info_score

    if reference is None:
        return {}
    known = (reference >= 0).all(axis=1)
    out = {}
    for level in range(min(codes.shape[1], reference.shape[1])):
        truth, predicted = reference[known, level], codes[known, level]
        out[f"nmi_{prefix}_level_{level + 1}"] = float(normalized_mutual_info_score(truth, predicted))
        out[f"homogeneity_{prefix}_level_{level + 1}"] = float(homogeneity_score(truth, predicted))
    return out


def run(config: QuantizeConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Fit the tokenizer (``gsquant``/``rq``/``flat`` on stage 3's fused vectors; ``realm`` on stage 1's)."""
    from kgtok.hierarchy.stage import load_hierarchy

    kg = ctx.kg
    arrays = load_hierarchy(inputs["hierarchy"]) if "hierarchy" in inputs else None
    if config.variant == "realm":
        vectors = load_entity_vectors(EmbedArtifact(inputs["embeddings"]).entity_embeddings, kg.entity_names)
    else:
        load_entity_vectors(HierarchyArtifact(inputs["hierarchy"]).fused_vectors, kg.entity_names)  # the order
        vectors = arrays["fused_vectors"]
    out = QuantizeArtifact(dest)
    with ctx.timed("fit"):
        tokenizer = EntityTokenizer(config=config).fit(vectors, arrays, progress=ctx.progress, log=ctx.log,
                                                       checkpoint=ctx.work / "train.pt")
    codes = tokenizer.codes_
    base = tokenizer.base_codes_
    metrics: dict[str, Any] = {
        "levels": tokenizer.levels_, "codebook_size": tokenizer.codebook_size_, "width": tokenizer.width_,
        "collision_rate_before": tokenizer.collision_rate_before_,
        "collision_rate_after": float(1.0 - len(np.unique(codes, axis=0)) / len(codes)),
        **code_metrics(base, tokenizer.codebook_size_),
        "best_epoch": tokenizer.record_.best_epoch,
        "best_seconds": round(tokenizer.record_.best_seconds, 1),
        "stopped_epoch": tokenizer.record_.stopped_epoch, "restarted_codes": tokenizer.record_.restarted_codes,
    }
    x = torch.as_tensor(vectors, dtype=torch.float32)
    if tokenizer.model_ is not None:
        rebuilt = tokenizer.model_.reconstruct(x)
    else:
        rebuilt = torch.as_tensor(tokenizer.vectors_of(codes))
    metrics["reconstruction_mse"] = float((rebuilt - x).pow(2).sum(1).mean())
    metrics["reconstruction_cosine"] = float(torch.nn.functional.cosine_similarity(rebuilt, x, dim=1).mean())
    metrics.update(alignment(base, arrays["paths"] if arrays is not None else None, "hierarchy"))
    metrics.update(alignment(base, kg.entity_types, "types"))
    np.save(out.codes, codes)
    tokens = tokenizer.token_strings(codes)
    out.tokens.write_text(
        "".join(f"{i}\t{n}\t{t}\n" for i, (n, t) in enumerate(zip(kg.entity_names, tokens))), encoding="utf-8")
    tokenizer.save(out.tokenizer)
    write_json_atomic(out.metrics_path, {**metrics, "history": tokenizer.record_.history})
    ctx.log(f"quantize: {config.variant}, {tokenizer.levels_} levels x {tokenizer.codebook_size_} codes, "
            f"utilisation {[round(u, 3) for u in metrics['utilization']]}, collisions before fix "
            f"{metrics['collision_rate_before']:.4f}")
    return metrics


STAGE = Stage(
    name="quantize", title="stage 4: entity codes", config=QuantizeConfig, run=run,
    inputs=(Input("hierarchy", "hierarchy", HierarchyArtifact, "a stage-3 artifact (fused vectors, tree): "
                  "variants gsquant, rq, flat"),
            Input("embeddings", "embed", EmbedArtifact, "a stage-1 artifact: variant realm")),
    needs=lambda config: ("embeddings",) if config.variant == "realm" else ("hierarchy",),
    summary=("collision_rate_before", "nmi_hierarchy_level_1", "nmi_types_level_1"),
)


def run_quantize(
    config: QuantizeConfig,
    data: str | Path | KnowledgeGraph,
    dest: str | Path,
    *,
    hierarchy: str | Path | None = None,
    embeddings: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Stage 4 into ``dest`` (reused when current; a killed training resumes from ``<dest>.work``)."""
    return run_stage(STAGE, config, dest, data=data, inputs={"hierarchy": hierarchy, "embeddings": embeddings},
                     progress=progress, log=log).path
