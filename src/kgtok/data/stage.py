"""The pipeline's first stages: generate the synthetic KG (when no --data is given), check and summarise the KG."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kgtok.config import check_fields
from kgtok.data.synthetic import SyntheticConfig
from kgtok.stage import Context, Stage, run_stage

if TYPE_CHECKING:
    from kgtok.data.graph import KnowledgeGraph


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How the KG is loaded (:func:`kgtok.data.graph.load_kg`), for the data stage and every stage after it.

    Both options change what the stages see, so a stage that reads the KG
    counts them in its cache record (:meth:`record`).
    """

    skip_header: bool = False  # skip a header line (head<TAB>relation<TAB>tail) of a split file instead of refusing it
    strip_whitespace: bool = False  # strip whitespace around ids instead of refusing them

    def __post_init__(self) -> None:
        check_fields(self, [])  # the types (skip_header="no" is truthy)

    def load(self, path: str | Path) -> KnowledgeGraph:
        """The KG directory ``path`` loaded with these options."""
        from kgtok.data.graph import load_kg

        return load_kg(path, skip_header=self.skip_header, strip_whitespace=self.strip_whitespace)

    def record(self) -> dict[str, str]:
        """The options' entry in a stage's cache record; none with the defaults, so artifacts made before
        these options existed stay current."""
        on = [name for name in ("skip_header", "strip_whitespace") if getattr(self, name)]
        return {"kg/load": ",".join(on)} if on else {}

    @classmethod
    def of(cls, kg: KnowledgeGraph) -> DataConfig:
        """The options that matter for a KG loaded elsewhere: those its load report shows took effect."""
        return cls(skip_header=bool(kg.report.skipped_headers), strip_whitespace=bool(kg.report.stripped_ids))


def _generate(config: SyntheticConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Generate the KG of ``config`` and write its directory (splits, text, true types)."""
    from kgtok.data.synthetic import generate, write_kg_files

    kg = generate(config)
    write_kg_files(kg, config, dest)
    return {"entities": len(kg.entity_names), "train": len(kg.train), "valid": len(kg.valid), "test": len(kg.test)}


def _check(config: DataConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Load and validate the KG (warnings name file and line), write ``summary.json``."""
    from kgtok.artifacts import write_json_atomic
    from kgtok.data.layout import DataArtifact
    from kgtok.data.stats import summarize

    ctx.log(f"data: loading {ctx.kg_dir}")
    # run_stage(DATA, DataConfig(skip_header=True), ...) alone: the stage's own options decide how it loads.
    kg = ctx.kg if (ctx.kg_options or DataConfig()) == config or ctx.kg_dir is None else config.load(ctx.kg_dir)
    summary = summarize(kg)
    write_json_atomic(DataArtifact(dest).summary, summary)
    return {**summary["counts"], "kg_dir": str(Path(ctx.kg_dir).resolve()) if ctx.kg_dir else None}


SYNTHETIC = Stage(name="synthetic", title="synthetic KG", config=SyntheticConfig, run=_generate,
                  uses_kg=False, summary=("entities", "train"))
DATA = Stage(name="data", title="stage 0: the KG", config=DataConfig, run=_check,
             summary=("entities", "relations", "train", "valid", "test"))


def run_synthetic(config: SyntheticConfig, dest: str | Path, *, log: Callable[[str], None] = print,
                  force: bool = False) -> Path:
    """The synthetic KG of ``config`` into ``dest``, a KG directory every stage reads (reused when current,
    unless ``force``)."""
    return run_stage(SYNTHETIC, config, dest, progress=False, log=log, reuse=not force).path


def run_data(config: DataConfig, data: str | Path | KnowledgeGraph, dest: str | Path, *,
             log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Stage 0 into ``dest``: the KG ``data`` loaded with ``config``'s options and checked (warnings name file
    and line), its summary in ``summary.json`` (reused when current, unless ``force``)."""
    return run_stage(DATA, config, dest, data=data, progress=False, log=log, reuse=not force).path
