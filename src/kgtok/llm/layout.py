"""The files of the stage-5 artifacts (instructions, fine-tuned model, evaluation), named once."""

from __future__ import annotations

from pathlib import Path

from kgtok.artifacts import Artifact, File


class InstructArtifact(Artifact):
    """``kgtok instruct`` output: one JSONL file per split (lm_train, lm_valid, test); with ids (codes or
    random), ``entities.jsonl``: every entity's name, ids and answer text as the prompts show them."""

    stage = "instruct"
    title = "stage-5a (instruct)"
    entities = File("entities.jsonl")

    def split(self, name: str) -> Path:
        return self.path / f"{name}.jsonl"


class FinetuneArtifact(Artifact):
    """``kgtok finetune`` output: ``model/`` (opens with AutoModelForCausalLM), ``metrics.json``."""

    stage = "finetune"
    title = "stage-5b (finetune)"
    model = File("model")


class EvaluateArtifact(Artifact):
    """``kgtok evaluate`` output: ``predictions.jsonl`` and ``metrics.json`` (one entry per ranker)."""

    stage = "evaluate"
    title = "stage-5c (evaluate)"
    predictions = File("predictions.jsonl")
