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

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok.artifacts import artifact_dir, hash_inputs, load_entity_vectors, write_json_atomic
from kgtok.config import format_config
from kgtok.data.graph import KnowledgeGraph, load_kg
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.metrics import alignment, code_usage, collision_rate
from kgtok.quantize.tokenizer import EntityTokenizer
from kgtok.runtime import torch_threads


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
    """Stage 4: ``gsquant``/``rq``/``flat`` read stage 3's fused vectors; ``realm`` stage 1's vectors."""
    from kgtok.hierarchy.stage import load_hierarchy

    kg = data if isinstance(data, KnowledgeGraph) else load_kg(data)
    arrays = load_hierarchy(hierarchy) if hierarchy is not None else None
    if config.variant == "realm":
        if embeddings is None:
            raise ValueError("variant realm quantizes the KG embeddings: give embeddings (a stage-1 artifact)")
        vectors = load_entity_vectors(embeddings, "entity_embeddings.npy", kg.entity_names)
    else:
        if arrays is None:
            raise ValueError(f"variant {config.variant!r} quantizes the fused vectors: give hierarchy (a stage-3 artifact)")
        load_entity_vectors(hierarchy, "fused_vectors.npy", kg.entity_names)  # checks the entity order
        vectors = arrays["fused_vectors"]
    log(format_config(config))
    inputs = hash_inputs({k: v for k, v in {"hierarchy": hierarchy, "embeddings": embeddings}.items() if v})
    work = Path(f"{dest}.work")  # resumable training state; removed once the artifact is written
    with torch_threads(config.threads), artifact_dir(dest, stage="quantize", config=config, inputs=inputs) as writer:
        with writer.timed("fit"):
            tokenizer = EntityTokenizer(config=config).fit(vectors, arrays, progress=progress, log=log,
                                                           checkpoint=work / "train.pt")
        codes = tokenizer.codes_
        base = tokenizer.base_codes_
        metrics: dict[str, Any] = {
            "levels": tokenizer.levels_, "codebook_size": tokenizer.codebook_size_, "width": tokenizer.width_,
            "collision_rate_before": tokenizer.collision_rate_before_,
            "collision_rate_after": collision_rate(codes),
            **code_usage(base, tokenizer.codebook_size_),
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
        np.save(writer.path / "codes.npy", codes)
        tokens = tokenizer.token_strings(codes)
        (writer.path / "tokens.txt").write_text(
            "".join(f"{i}\t{n}\t{t}\n" for i, (n, t) in enumerate(zip(kg.entity_names, tokens))), encoding="utf-8")
        tokenizer.save(writer.path / "tokenizer")
        write_json_atomic(writer.path / "metrics.json", {**metrics, "history": tokenizer.record_.history})
        writer.metrics.update({k: v for k, v in metrics.items()})
    shutil.rmtree(work, ignore_errors=True)
    log(f"quantize: {config.variant}, {tokenizer.levels_} levels x {tokenizer.codebook_size_} codes, "
        f"utilisation {[round(u, 3) for u in metrics['utilization']]}, collisions before fix "
        f"{metrics['collision_rate_before']:.4f} -> {dest}")
    return Path(dest)
