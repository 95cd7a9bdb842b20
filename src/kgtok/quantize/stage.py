"""Stage 4 recipe: fit the EntityTokenizer on stage-3 (or stage-1) vectors, measure, write.

Artifact layout::

    manifest.json     stage, config, input hashes, metrics, timings
    codes.npy         (N, width) int64 codes in entity-id order (the comparison format:
                      one row per entity, one column per level, the disambiguation last)
    tokens.txt        id<TAB>raw name<TAB>token string, one line per entity
    metrics.json      per-level entropy, utilisation, perplexity; collision rate before the fix;
                      reconstruction MSE and cosine; NMI with the hierarchy (and true types);
                      training history (losses, held-out entropy per evaluation)
    tokenizer/        EntityTokenizer.save_pretrained(): reload with EntityTokenizer.from_pretrained
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok.artifacts import load_entity_vectors, write_json_atomic
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.layout import EmbedArtifact
from kgtok.hierarchy.layout import HierarchyArtifact
from kgtok.quantize.config import L1_NEGATIVES, QuantizeConfig
from kgtok.quantize.layout import QuantizeArtifact
from kgtok.quantize.metrics import alignment, code_usage, collision_rate
from kgtok.quantize.tokenizer import EntityTokenizer
from kgtok.stage import Context, Input, Stage, run_stage


def tokenizer_metrics(tokenizer: EntityTokenizer, vectors: np.ndarray) -> dict[str, Any]:
    """Code usage per level, collisions before and after the fix, reconstruction, training record."""
    codes = tokenizer.codes_
    metrics: dict[str, Any] = {
        "levels": tokenizer.levels_, "codebook_size": tokenizer.codebook_size_, "width": tokenizer.width_,
        "collision_rate_before": tokenizer.collision_rate_before_,
        "collision_rate_after": collision_rate(codes),
        **code_usage(tokenizer.base_codes_, tokenizer.codebook_size_),
        "best_epoch": tokenizer.record_.best_epoch,
        "best_seconds": round(tokenizer.record_.best_seconds, 1),
        "stopped_epoch": tokenizer.record_.stopped_epoch, "restarted_codes": tokenizer.record_.restarted_codes,
    }
    x = torch.as_tensor(vectors, dtype=torch.float32)
    if tokenizer.model_ is not None:
        rebuilt = tokenizer.model_.decode(torch.as_tensor(tokenizer.base_codes_))
    else:
        rebuilt = torch.as_tensor(tokenizer.vectors_of(codes))
    metrics["reconstruction_mse"] = float((rebuilt - x).pow(2).sum(1).mean())
    metrics["reconstruction_cosine"] = float(torch.nn.functional.cosine_similarity(rebuilt, x, dim=1).mean())
    return metrics


def run(config: QuantizeConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Fit the tokenizer (``gsquant``/``rq``/``flat`` on stage 3's fused vectors; ``realm`` on stage 1's)."""
    from kgtok.hierarchy.stage import load_hierarchy

    kg = ctx.kg
    # its rows (paths for GSE, GSR and realm's alignment metrics; fused vectors) checked to be in the KG's order
    arrays = load_hierarchy(inputs["hierarchy"], kg.entity_names) if "hierarchy" in inputs else None
    if config.variant == "realm":
        vectors = load_entity_vectors(EmbedArtifact(inputs["embeddings"]).entity_embeddings, kg.entity_names)
    else:
        vectors = arrays["fused_vectors"]
    out = QuantizeArtifact(dest)
    with ctx.timed("fit"):
        tokenizer = EntityTokenizer(config=config).fit(vectors, arrays, progress=ctx.progress, log=ctx.log,
                                                       checkpoint=ctx.work / "train.pt")
    codes = tokenizer.codes_
    metrics = tokenizer_metrics(tokenizer, vectors)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # trained data-parallel under accelerate launch / torchrun (kgtok.quantize.train.Processes)
        metrics["processes"] = processes
    metrics.update(alignment(tokenizer.base_codes_, arrays["paths"] if arrays is not None else None, "hierarchy"))
    metrics.update(alignment(tokenizer.base_codes_, kg.entity_types, "types"))
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


def default_rules(config: QuantizeConfig) -> dict[str, str]:
    """Defaults the code resolves from the graph, in the cache record: an artifact made when GSE's L1 took
    every centre of every level is not reused for ``gse.l1_negatives: null``, which draws 8,192 where a level
    has more (graphs over ~65k entities)."""
    return {"quantize/l1_negatives": f"{L1_NEGATIVES} drawn"} if config.uses_gse and config.gse.l1 and \
        config.gse.l1_negatives is None else {}


STAGE = Stage(
    name="quantize", title="stage 4: entity codes", config=QuantizeConfig, run=run, fingerprint=default_rules,
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
    force: bool = False,
) -> Path:
    """Stage 4 into ``dest`` (reused when current, unless ``force``; a killed training resumes from
    ``<dest>.work``)."""
    return run_stage(STAGE, config, dest, data=data, inputs={"hierarchy": hierarchy, "embeddings": embeddings},
                     progress=progress, log=log, reuse=not force).path
