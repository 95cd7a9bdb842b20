"""Stage 1 as a pipeline stage: train, evaluate (filtered, both sides), export candidates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kgtok.embed.config import N3_FLOOR, SPARSE_FROM, EmbedConfig
from kgtok.stage import Context, Stage, run_stage

if TYPE_CHECKING:
    from kgtok.data.graph import KnowledgeGraph


def run(config: EmbedConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Train with early stopping in ``ctx.work`` (resumable), rank every split, write the artifact."""
    from kgtok.embed.ranking import rank_splits
    from kgtok.embed.train import export, train_model

    kg = ctx.kg
    with ctx.timed("train"):
        model, state = train_model(kg, config, ctx.work, progress=ctx.progress, log=ctx.log)
    with ctx.timed("evaluate"):
        ranked, metrics = rank_splits(
            model, kg, reciprocal=config.resolved_reciprocal, batch_size=config.eval_batch_size,
            top_k=config.top_k, export_splits=config.export_splits, progress=ctx.progress,
        )
    export(dest, model, kg, config, state, metrics, ranked)
    test = metrics["test"]["both"]
    ctx.log(f"embed: test MRR {test['mrr']:.4f}  H@1 {test['hits_at_1']:.4f}  H@10 {test['hits_at_10']:.4f}")
    return {
        "best_step": state.best_step, "steps": state.step, "precision": state.precision,
        **({"precision_step_ms": state.precision_ms} if state.precision_ms else {}),
        **{f"{split}_{name}": metrics[split]["both"][name]
           for split in ("valid", "test") for name in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")},
    }


def default_rules(config: EmbedConfig) -> dict[str, str]:
    """Defaults the code computes from the graph: in the cache record, so that an artifact made under an
    earlier rule (the fixed N3 weight 0.05 before the density rule, the floor 0.001 before 0.005) is not
    reused for ``regularizer_weight: null``, nor one trained with dense updates for ``sparse: null``."""
    rules = ({"embed/n3_weight": f"0.2/density in [{N3_FLOOR}, 0.1]"}
             if config.n3_weight(1.0) != config.n3_weight(100.0) else {})
    if config.sparse is None and config.resolved_loss == "nssa":
        rules["embed/sparse"] = f"from {SPARSE_FROM} entities"
    return rules


STAGE = Stage(name="embed", title="stage 1: KG embeddings and candidates", config=EmbedConfig, run=run,
              fingerprint=default_rules, summary=("test_mrr", "test_hits_at_1", "test_hits_at_10"))


def run_embed(config: EmbedConfig, data: str | Path | KnowledgeGraph, dest: str | Path, *,
              progress: bool = True, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Stage 1 into ``dest`` (reused when current, unless ``force``; a killed run resumes from ``<dest>.work``)."""
    return run_stage(STAGE, config, dest, data=data, progress=progress, log=log, reuse=not force).path
