"""Stage 2 as a pipeline stage: embed every entity's label and description with a sentence encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kgtok.stage import Context, Stage, run_stage
from kgtok.text.config import TextConfig

if TYPE_CHECKING:
    from kgtok.data.graph import KnowledgeGraph


def run(config: TextConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Encode labels and descriptions (mode separate) or "label: description" (joint); write the artifact."""
    from kgtok.artifacts import write_id_order
    from kgtok.config import format_config
    from kgtok.runtime import precision_line
    from kgtok.text.encode import embed_texts, entity_texts, joint_texts
    from kgtok.text.layout import TextArtifact

    kg = ctx.kg
    texts = entity_texts(kg)
    n = kg.num_entities
    out = TextArtifact(dest)
    with ctx.timed("encode"):
        if config.mode == "separate":
            # One call for labels and descriptions: a fallback description is its label, encoded once.
            encoding = embed_texts(texts.labels + texts.descriptions, config, progress=ctx.progress)
            label_vectors, description_vectors = encoding.vectors[:n], encoding.vectors[n:]  # (N, 384) each
            vectors = np.concatenate([label_vectors, description_vectors], axis=1)  # (N, 2 x 384)
            np.save(out.label_embeddings, np.ascontiguousarray(label_vectors))
            np.save(out.description_embeddings, np.ascontiguousarray(description_vectors))
        else:
            encoding = embed_texts(joint_texts(kg), config, progress=ctx.progress)
            vectors = encoding.vectors  # (N, 384)
    np.save(out.text_embeddings, np.ascontiguousarray(vectors, dtype=np.float32))
    write_id_order(out.entities, kg.entity_names)
    out.config_yaml.write_text(format_config(config), encoding="utf-8")
    encoded = encoding.unique_texts - encoding.resumed_texts
    source = "cache" if encoding.cache_hit else f"{encoded / max(encoding.seconds, 1e-9):.0f} texts/s"
    if encoding.resumed_texts:
        source += f"; resumed: {encoding.resumed_texts} texts read from an interrupted run's chunks"
    if encoding.precision_ms:
        ctx.log(precision_line("text", encoding.precision, encoding.precision_ms, "a batch of 8 texts"))
    ctx.log(f"text: {n} entities -> ({n}, {vectors.shape[1]}) in {encoding.seconds:.1f}s ({source}); "
            f"{encoding.unique_texts} unique texts; missing_label={texts.missing_label} "
            f"missing_description={texts.missing_description}")
    return {
        "num_entities": n, "dim": int(vectors.shape[1]), "missing_label": texts.missing_label,
        "missing_description": texts.missing_description, "unique_texts": encoding.unique_texts,
        "seconds": round(encoding.seconds, 3), "cache_hit": encoding.cache_hit, "resumed_texts": encoding.resumed_texts,
        "precision": encoding.precision, "precision_batch_ms": encoding.precision_ms,
    }


def model_fingerprint(config: TextConfig) -> dict[str, str]:
    """The encoder's files stand as an input: another model under the same name re-runs the stage.

    A bad model name fails here, before the KG is read.
    """
    from kgtok.text.encode import check_model, model_identity

    return {"model": model_identity(check_model(config))}


STAGE = Stage(name="text", title="stage 2: text embeddings", config=TextConfig, run=run,
              fingerprint=model_fingerprint, summary=("dim", "missing_description"))


def run_text(config: TextConfig, data: str | Path | KnowledgeGraph, dest: str | Path, *,
             progress: bool = True, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Stage 2 into ``dest`` (reused when current, unless ``force``)."""
    return run_stage(STAGE, config, dest, data=data, progress=progress, log=log, reuse=not force).path
