"""Stage 5 as three pipeline stages: instruct (5a), finetune (5b), evaluate (5c)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kgtok.artifacts import read_manifest
from kgtok.embed.layout import EmbedArtifact
from kgtok.llm.layout import InstructArtifact
from kgtok.quantize.layout import QuantizeArtifact
from kgtok.stage import Context, Input, Stage


def _config_class(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


def run_instruct_stage(config: Any, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    from kgtok.llm.instruct import run_instruct

    run_instruct(config, ctx.kg, inputs.get("embeddings"), dest, codes=inputs.get("codes"), log=ctx.log)
    return read_manifest(dest)["metrics"]


def run_finetune_stage(config: Any, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    from kgtok.llm.finetune import run_finetune

    run_finetune(config, inputs["instructions"], dest, codes=inputs.get("codes"), progress=ctx.progress,
                 log=ctx.log)
    return read_manifest(dest)["metrics"]


def run_evaluate_stage(config: Any, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    from kgtok.llm.evaluate import run_evaluate

    names = ctx.kg.entity_names if config.class_constraint and (ctx.kg_dir or ctx._kg) else None
    run_evaluate(config, inputs["model"], inputs["instructions"], dest, classes=inputs.get("classes"),
                 entity_names=names, progress=ctx.progress, log=ctx.log)
    return read_manifest(dest)["metrics"]


def _instruct_needs(config: Any) -> tuple[str, ...]:
    return (("embeddings",) if config.task == "completion" else ()) + (("codes",) if config.use_codes else ())


INSTRUCT = Stage(
    name="instruct", title="stage 5a: instructions", config=_config_class("kgtok.llm.instruct", "InstructConfig"),
    run=run_instruct_stage,
    inputs=(Input("embeddings", "embed", EmbedArtifact, "a stage-1 artifact (candidates)"),
            Input("codes", "quantize", QuantizeArtifact, "a stage-4 artifact (entity codes)")),
    needs=_instruct_needs, summary=("lm_train", "lm_valid", "test"),
)
FINETUNE = Stage(
    name="finetune", title="stage 5b: fine-tuning", config=_config_class("kgtok.llm.finetune", "FinetuneConfig"),
    run=run_finetune_stage, uses_kg=False,
    inputs=(Input("instructions", "instruct", InstructArtifact, "a stage-5a directory"),
            Input("codes", "quantize", QuantizeArtifact,
                  "the stage-4 artifact whose code tokens the instructions use")),
    needs=lambda config: ("instructions",), summary=("steps", "train_loss", "valid_loss", "train_tokens_per_second"),
)
EVALUATE = Stage(
    name="evaluate", title="stage 5c: evaluation", config=_config_class("kgtok.llm.evaluate", "EvaluateConfig"),
    run=run_evaluate_stage, uses_kg=False,
    inputs=(Input("model", "finetune", None, "a stage-5b artifact or a Hugging Face model directory"),
            Input("instructions", "instruct", InstructArtifact, "a stage-5a directory"),
            Input("classes", "hierarchy", None, "entity<TAB>class file or a stage-3 artifact")),
    needs=lambda config: ("model", "instructions"),
    summary=("retriever_hits_at_1", "dift_hits_at_1", "rerank_hits_at_1", "retriever_mrr", "dift_mrr", "rerank_mrr",
             "queries_per_second"),
)
