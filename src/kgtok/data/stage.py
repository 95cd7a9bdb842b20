"""The pipeline's first stages: generate the synthetic KG (when no --data is given), check and summarise the KG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kgtok.data.synthetic import SyntheticConfig
from kgtok.stage import Context, Stage


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data stage has no settings: it loads the KG (every file check of the loader) and summarises it."""


def run_synthetic(config: SyntheticConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Generate the KG of ``config`` and write its directory (splits, text, true types)."""
    from kgtok.data.synthetic import generate, write_kg_files

    kg = generate(config)
    write_kg_files(kg, config, dest)
    return {"entities": len(kg.entity_names), "train": len(kg.train), "valid": len(kg.valid), "test": len(kg.test)}


def run_data(config: DataConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Load and validate the KG (warnings name file and line), write ``summary.json``."""
    from kgtok.artifacts import write_json_atomic
    from kgtok.data.layout import DataArtifact
    from kgtok.data.stats import summarize

    ctx.log(f"data: loading {ctx.kg_dir}")
    summary = summarize(ctx.kg)
    write_json_atomic(DataArtifact(dest).summary, summary)
    return {**summary["counts"], "kg_dir": str(Path(ctx.kg_dir).resolve()) if ctx.kg_dir else None}


SYNTHETIC = Stage(name="synthetic", title="synthetic KG", config=SyntheticConfig, run=run_synthetic,
                  uses_kg=False, summary=("entities", "train"))
DATA = Stage(name="data", title="stage 0: the KG", config=DataConfig, run=run_data,
             summary=("entities", "relations", "train", "valid", "test"))
