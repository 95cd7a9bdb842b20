"""The whole run: every stage in order, each skipped when its artifact is current.

``run(config)`` is the Python twin of ``kgtok run``.  A stage's artifact is
reused when its manifest records the same stage config and the same input
hashes; otherwise the stage (and, through the changed hashes, every stage
after it) runs again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kgtok.artifacts import artifact_dir, hash_inputs, manifest_matches, read_manifest, write_json_atomic
from kgtok.config import check_fields, config_to_dict
from kgtok.data.synthetic import SyntheticConfig
from kgtok.embed.config import EmbedConfig
from kgtok.hierarchy.config import HierarchyConfig
from kgtok.llm.evaluate import EvaluateConfig
from kgtok.llm.finetune import FinetuneConfig
from kgtok.llm.instruct import InstructConfig
from kgtok.quantize.config import QuantizeConfig
from kgtok.text.config import TextConfig

# The pipeline's stages in order (METHOD.md).  Each maps to the function that
# runs it once it exists; None marks a stage still to be built.
STAGE_ORDER = ("data", "embed", "text", "hierarchy", "quantize", "instruct", "finetune", "evaluate")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Configuration of a whole run (``kgtok run``)."""

    data: str | None = None  # KG directory; None generates the bundled synthetic KG (offline demo)
    out: str = "runs/default"  # run directory: one artifact subdirectory per stage
    seed: int = 0  # base seed handed to every stage
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used only when data is None
    # Stage 1. The run's default validates often and stops early: right for the small demo
    # graph; for a benchmark graph give a preset's values (kgtok/configs/embed_<name>.yaml).
    embed: EmbedConfig = field(  # stage 1: here eval_every 100, patience 3, max_steps 5000
        default_factory=lambda: EmbedConfig(eval_every=100, patience=3, max_steps=5000))
    text: TextConfig = field(default_factory=TextConfig)  # stage 2
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)  # stage 3
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)  # stage 4
    # Up to 20,000 training queries in ReaLM's short form: an LM trained from scratch learns from them which
    # entities a relation leads to (on the synthetic KG its fused re-rank rises above the retriever).
    instruct: InstructConfig = field(  # stage 5a: here neighbours 3, description_words 15, 20,000 short train queries
        default_factory=lambda: InstructConfig(neighbours=3, description_words=15, train_from_train_queries=True,
                                               train_query_format="query", train_queries=20000))
    finetune: FinetuneConfig = field(  # stage 5b (tiny backbone by default): here epochs 2
        default_factory=lambda: FinetuneConfig(epochs=2))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # stage 5c
    progress: bool = True  # progress bars of the long stages

    def __post_init__(self) -> None:
        check_fields(self, [
            ("out", lambda v: bool(str(v).strip()), "a non-empty directory path"),
            ("seed", lambda v: v >= 0, "a non-negative integer"),
        ])


@dataclass
class StageResult:
    name: str
    path: Path | None
    status: str  # "ran" or "cached"
    metrics: dict[str, Any] = field(default_factory=dict)


def _data_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    """Resolve the KG directory (generating the synthetic KG if asked), validate it, record its summary."""
    from kgtok.data.graph import load_kg
    from kgtok.data.stats import summarize

    if config.data is None:
        from kgtok.data.synthetic import write_synthetic

        kg_dir = write_synthetic(config.synthetic, run_dir / "synthetic_kg")
    else:
        kg_dir = Path(config.data)
    dest = run_dir / "data"
    stage_config = {"data": str(kg_dir.resolve())}
    inputs = hash_inputs({
        p.name: p for p in sorted(kg_dir.iterdir()) if p.is_file() and p.suffix in (".txt", ".tsv", ".dict")
    })
    if manifest_matches(dest, "data", stage_config, inputs):
        return StageResult("data", dest, "cached", read_manifest(dest)["metrics"])
    log(f"data: loading {kg_dir}")
    kg = load_kg(kg_dir)
    summary = summarize(kg)
    with artifact_dir(dest, stage="data", config=stage_config, inputs=inputs) as writer:
        (writer.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        writer.metrics.update(summary["counts"])
        writer.extra["kg_dir"] = str(kg_dir.resolve())
    return StageResult("data", dest, "ran", dict(summary["counts"]))


def _embed_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    """Stage 1 on the KG recorded by the data stage; reused while config and data are unchanged."""
    from kgtok.embed import run_embed

    kg_dir, dest = _kg_dir(run_dir), run_dir / "embed"
    inputs = {f"{s}.txt": kg_dir / f"{s}.txt" for s in ("train", "valid", "test")}
    return _stage("embed", config.embed, inputs, dest,
                  lambda: run_embed(config.embed, kg_dir, dest, progress=config.progress, log=log),
                  ("test_mrr", "test_hits_at_1", "test_hits_at_10"))


# Settings that say how to run, not what to compute: changing them never re-runs a stage.
MACHINE_FIELDS = frozenset({"threads"})


def _stage(name: str, stage_config: Any, inputs: dict[str, Path], dest: Path,
           execute: Callable[[], Path], metric_keys: tuple[str, ...]) -> StageResult:
    """Run a stage unless it already ran with this config on inputs with these hashes.

    The pipeline keeps its own record (``.cache/<stage>.json`` in the run
    directory: config and input hashes) beside the artifact, so the check does
    not depend on what each stage writes into its manifest.  Upstream
    artifacts are hashed by their manifests, so a re-run upstream re-runs
    everything after it.  ``threads`` is left out of the record: a run
    started again with another thread count reuses what is done.
    """
    record_path = dest.parent / ".cache" / f"{name}.json"
    record = _without_machine_fields({"config": config_to_dict(stage_config), "inputs": hash_inputs(inputs)})
    cached = (read_manifest(dest) is not None and record_path.exists()
              and _without_machine_fields(json.loads(record_path.read_text(encoding="utf-8")))
              == json.loads(json.dumps(record)))
    if not cached:
        execute()
        write_json_atomic(record_path, record)
    metrics = read_manifest(dest)["metrics"]
    shown = {k: (round(metrics[k], 4) if isinstance(metrics[k], float) else metrics[k])
             for k in metric_keys if k in metrics}
    return StageResult(name, dest, "cached" if cached else "ran", shown)


def _without_machine_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A cache record without the machine fields: how records are written and compared (older ones kept them)."""
    config = record.get("config")
    if isinstance(config, dict):
        record = {**record, "config": {k: v for k, v in config.items() if k not in MACHINE_FIELDS}}
    return record


def _kg_dir(run_dir: Path) -> Path:
    return Path(read_manifest(run_dir / "data")["kg_dir"])


def _text_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.text import run_text

    kg_dir, dest = _kg_dir(run_dir), run_dir / "text"
    return _stage("text", config.text, {"kg": kg_dir}, dest,
                  lambda: run_text(config.text, kg_dir, dest, progress=config.progress, log=log),
                  ("dim", "missing_description"))


def _hierarchy_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.hierarchy import run_hierarchy

    kg_dir, dest = _kg_dir(run_dir), run_dir / "hierarchy"
    inputs = {"embeddings": run_dir / "embed", "text": run_dir / "text"}
    return _stage("hierarchy", config.hierarchy, inputs, dest,
                  lambda: run_hierarchy(config.hierarchy, kg_dir, dest, embeddings=inputs["embeddings"],
                                        text=inputs["text"], progress=config.progress, log=log),
                  ("counts", "nmi_level_1", "nmi_level_2"))


def _quantize_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.quantize import run_quantize

    kg_dir, dest = _kg_dir(run_dir), run_dir / "quantize"
    inputs = {"hierarchy": run_dir / "hierarchy", "embeddings": run_dir / "embed"}
    return _stage("quantize", config.quantize, inputs, dest,
                  lambda: run_quantize(config.quantize, kg_dir, dest, hierarchy=inputs["hierarchy"],
                                       embeddings=inputs["embeddings"], progress=config.progress, log=log),
                  ("collision_rate_before", "nmi_hierarchy_level_1", "nmi_types_level_1"))


def _instruct_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.llm import run_instruct

    kg_dir, dest = _kg_dir(run_dir), run_dir / "instruct"
    inputs = {"embeddings": run_dir / "embed", **({"codes": run_dir / "quantize"} if config.instruct.use_codes else {})}
    return _stage("instruct", config.instruct, inputs, dest,
                  lambda: run_instruct(config.instruct, kg_dir, inputs["embeddings"], dest, codes=inputs.get("codes"),
                                       log=log),
                  ("lm_train", "lm_valid", "test"))


def _finetune_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.llm.finetune import run_finetune

    dest = run_dir / "finetune"
    inputs = {"instructions": run_dir / "instruct",
              **({"codes": run_dir / "quantize"} if config.instruct.use_codes else {})}
    return _stage("finetune", config.finetune, inputs, dest,
                  lambda: run_finetune(config.finetune, inputs["instructions"], dest, codes=inputs.get("codes"),
                                       progress=config.progress, log=log),
                  ("steps", "train_loss", "valid_loss", "train_tokens_per_second"))


def _evaluate_stage(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> StageResult:
    from kgtok.data.graph import load_kg
    from kgtok.llm.evaluate import run_evaluate

    dest = run_dir / "evaluate"
    inputs = {"model": run_dir / "finetune", "instructions": run_dir / "instruct", "hierarchy": run_dir / "hierarchy"}

    def execute() -> Path:
        names = load_kg(_kg_dir(run_dir)).entity_names if config.evaluate.class_constraint else None
        return run_evaluate(config.evaluate, inputs["model"], inputs["instructions"], dest,
                            classes=inputs["hierarchy"], entity_names=names, progress=config.progress, log=log)

    return _stage("evaluate", config.evaluate, inputs, dest, execute,
                  ("retriever_hits_at_1", "dift_hits_at_1", "rerank_hits_at_1", "retriever_mrr", "dift_mrr",
                   "rerank_mrr", "queries_per_second"))


STAGES: dict[str, Callable[[RunConfig, Path, Callable[[str], None]], StageResult]] = {
    "data": _data_stage,
    "embed": _embed_stage,
    "text": _text_stage,
    "hierarchy": _hierarchy_stage,
    "quantize": _quantize_stage,
    "instruct": _instruct_stage,
    "finetune": _finetune_stage,
    "evaluate": _evaluate_stage,
}


def run(config: RunConfig, *, until: str | None = None, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run every stage in order (or up to and including ``until``), each skipped when current.

    Returns one :class:`StageResult` per stage run.
    """
    if until is not None and until not in STAGE_ORDER:
        raise ValueError(f"until={until!r}: expected one of {', '.join(STAGE_ORDER)}")
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n", encoding="utf-8")
    results = []
    for name in STAGE_ORDER:
        result = STAGES[name](config, run_dir, log)
        log(f"{name}: {result.status} -> {result.path}")
        results.append(result)
        if name == until:
            break
    return results


# The paper's ablation set (GS-Quant, Table 4): name -> dotted overrides of the run config.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "without_l1": ("quantize.gse.l1=false",),
    "without_l2": ("quantize.gse.l2=false",),
    "without_gsr": ("quantize.gsr.enabled=false",),
    "without_codes": ("instruct.use_codes=false",),
}


def ablate(config: RunConfig, names: tuple[str, ...] = tuple(ABLATIONS), *,
           log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the full pipeline, then each ablation in ``<out>/ablate/<name>``, reusing stages 0-3.

    The ablation runs link the full run's artifacts up to the first stage
    whose config the ablation changes and copy their cache records, so only
    that stage and those after it run again (stage 4 for the GSE/GSR
    ablations, stage 5 for the one without codes).  Returns ``{name: evaluate metrics}`` with ``full`` first.
    """
    import os
    import shutil

    from kgtok.config import _merge, config_from_dict, parse_overrides

    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; expected some of {sorted(ABLATIONS)}")
    run(config, log=log)
    run_dir = Path(config.out)
    kg_dir = _kg_dir(run_dir)
    results = {"full": read_manifest(run_dir / "evaluate")["metrics"]}
    base = config_to_dict(config)
    for name in names:
        out = run_dir / "ablate" / name
        out.mkdir(parents=True, exist_ok=True)
        (out / ".cache").mkdir(exist_ok=True)
        variant = config_from_dict(RunConfig, _merge({**base, "out": str(out), "data": str(kg_dir)},
                                                     parse_overrides(ABLATIONS[name])))
        for stage in ("embed", "text", "hierarchy", "quantize"):  # shared until the first changed stage
            if config_to_dict(getattr(variant, stage)) != config_to_dict(getattr(config, stage)):
                break
            link = out / stage
            if not link.exists():
                os.symlink((run_dir / stage).resolve(), link)
            shutil.copyfile(run_dir / ".cache" / f"{stage}.json", out / ".cache" / f"{stage}.json")
        log(f"ablation {name}: {', '.join(ABLATIONS[name])}")
        run(variant, log=log)
        results[name] = read_manifest(out / "evaluate")["metrics"]
    return results
