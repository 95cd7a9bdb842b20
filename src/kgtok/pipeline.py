"""The whole run: every registered stage in order, each skipped when its artifact is current.

``run(config)`` is the Python twin of ``kgtok run``.  The pipeline is built
from the stages' declarations (:class:`kgtok.stage.Stage`): each stage's
artifact is ``<out>/<stage name>``, and each declared input is wired to the
artifact of the stage that makes it.  Whether a stage is current, resumes
or runs is decided by :func:`kgtok.stage.run_stage`, the same for every
stage and for the stage commands.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kgtok.artifacts import folder_lock, read_manifest, refuse_unmarked_dir, write_json_atomic
from kgtok.config import check_fields, config_to_dict, format_config
from kgtok.data.stage import DATA, SYNTHETIC, DataConfig
from kgtok.data.synthetic import SyntheticConfig
from kgtok.embed.config import EmbedConfig
from kgtok.embed.stage import STAGE as EMBED
from kgtok.hierarchy.config import HierarchyConfig
from kgtok.hierarchy.stage import STAGE as HIERARCHY
from kgtok.llm.config import EvaluateConfig, FinetuneConfig, InstructConfig
from kgtok.llm.evaluate import STAGE as EVALUATE
from kgtok.llm.finetune import STAGE as FINETUNE
from kgtok.llm.instruct import STAGE as INSTRUCT
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.stage import STAGE as QUANTIZE
from kgtok.stage import Context, Stage, StageResult, check_kg_dir, run_stage
from kgtok.text.config import TextConfig
from kgtok.text.stage import STAGE as TEXT

# Every stage of a run, in order (METHOD.md).  A new stage is one folder plus one line here.
STAGES: dict[str, Stage] = {s.name: s for s in (SYNTHETIC, DATA, EMBED, TEXT, HIERARCHY, QUANTIZE, INSTRUCT,
                                                 FINETUNE, EVALUATE)}
STAGE_ORDER = tuple(STAGES)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Configuration of a whole run (``kgtok run``)."""

    data: str | None = None  # KG directory; None generates the bundled synthetic KG (offline demo)
    load: DataConfig = field(default_factory=DataConfig)  # stage 0: how the KG is loaded (header line, whitespace)
    out: str = "runs/default"  # run directory: one artifact subdirectory per stage, and run.log
    seed: int | None = None  # when set, replaces the seed of every stage (and of the synthetic KG)
    threads: int | None = None  # when set, replaces the torch threads of every stage (0: all cores)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used only when data is None
    # Stage 1. The run's default validates often and stops early: right for the small demo
    # graph; for a benchmark graph give a preset's values (kgtok/configs/embed_<name>.yaml).
    embed: EmbedConfig = field(  # stage 1: here eval_every 100, patience 3, max_steps 5000
        default_factory=lambda: EmbedConfig(eval_every=100, patience=3, max_steps=5000))
    text: TextConfig = field(default_factory=TextConfig)  # stage 2
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)  # stage 3
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)  # stage 4
    # Up to 20,000 training queries in ReaLM's short form: an LM trained from scratch learns from them which
    # entities a relation leads to (the DIFT examples alone are a few hundred). The compact template: the tiny
    # LM reads no English, and DIFT's sentences were a third of a short example's tokens (chosen on LM-valid,
    # bench/results/llm_synthetic_first_run_choice.md); presets for a pretrained LM set template: dift.
    instruct: InstructConfig = field(  # stage 5a: neighbours 3, description_words 15, 20,000 short queries, compact
        default_factory=lambda: InstructConfig(neighbours=3, description_words=15, train_from_train_queries=True,
                                               train_query_format="query", train_queries=20000, template="compact"))
    finetune: FinetuneConfig = field(  # stage 5b (tiny backbone by default): here epochs 2
        default_factory=lambda: FinetuneConfig(epochs=2))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # stage 5c
    # Files of the user, in place of what the run makes (kgtok instruct --classes, --negatives):
    classes: str | None = None  # entity<TAB>class file (class_prefix, class_constraint); None: hierarchy level 1
    negatives: str | None = None  # head<TAB>relation<TAB>tail test negatives (classification); None: corrupted
    progress: bool = True  # progress bars of the long stages (drawn only on a terminal)

    def __post_init__(self) -> None:
        check_fields(self, [
            ("out", lambda v: bool(str(v).strip()), "a non-empty directory path"),
            ("seed", lambda v: v is None or v >= 0, "null or a non-negative integer"),
            ("threads", lambda v: v is None or v >= 0, "null or a non-negative integer (0: all cores)"),
            ("classes", lambda v: v is None or self.instruct.class_prefix or self.evaluate.class_constraint,
             "null unless instruct.class_prefix or evaluate.class_constraint is true (nothing else reads it)"),
            ("negatives", lambda v: v is None or self.instruct.task == "classification",
             "null unless instruct.task is classification (nothing else reads it)"),
        ])

    def stage_config(self, name: str) -> Any:
        """The config of stage ``name`` in this run (with ``seed`` and ``threads`` applied when they are set)."""
        config = self.load if name == "data" else getattr(self, name)
        names = {f.name for f in dataclasses.fields(config)}
        given = {key: value for key, value in (("seed", self.seed), ("threads", self.threads))
                 if value is not None and key in names}
        return dataclasses.replace(config, **given) if given else config

    def kg_dir(self) -> Path:
        """The KG directory the stages read: ``data``, else the synthetic stage's artifact."""
        return Path(self.data) if self.data is not None else Path(self.out) / "synthetic"

    def check_files(self) -> None:
        """The KG directory (``data``) and the user's files (``classes``, ``negatives``) exist: checked before
        any stage runs and before the run folder is written."""
        if self.data is not None:
            check_kg_dir(self.data)
        for name in ("classes", "negatives"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"{name}={value}: no such file (the run config's {name} field)")

    def stages(self) -> tuple[str, ...]:
        """The stages this run has: the synthetic KG only when no KG directory is given."""
        return tuple(n for n in STAGE_ORDER if n != "synthetic" or self.data is None)

    def wired(self, name: str) -> dict[str, Path]:
        """Stage ``name``'s inputs: each declared input wired to ``<out>/<stage that makes it>``, or to the
        user's file of the same name (``classes``, ``negatives``) when the run config gives one."""
        out = Path(self.out)
        unused = {("instruct", "codes"), ("finetune", "codes")} if not self.instruct.use_codes else set()
        unused |= {("instruct", "classes")} if not self.instruct.class_prefix else set()
        files = {key: Path(value) for key, value in (("classes", self.classes), ("negatives", self.negatives))
                 if value is not None}
        return {i.name: files.get(i.name, out / str(i.stage)) for i in STAGES[name].inputs
                if (i.name in files or (i.stage is not None and i.stage in self.stages()))
                and (name, i.name) not in unused}


class RunLog:
    """Where a run's messages go: everything to ``<out>/run.log``, a line per stage to the console."""

    def __init__(self, path: Path, console: Callable[[str], None]) -> None:
        self.path, self.console = path, console
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115  closed by close()
        self.seen: set[str] = set()

    def file(self, message: str) -> None:
        self.handle.write(message.rstrip("\n") + "\n")
        self.handle.flush()

    def say(self, message: str) -> None:
        self.file(message)
        self.console(message)

    def warn(self, message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        """Each distinct warning once per run, on the console and in the log."""
        text = f"warning ({category.__name__}): {message}"
        if text not in self.seen:
            self.seen.add(text)
            self.say(text)

    def close(self) -> None:
        self.handle.close()


@contextmanager
def _run_log(run_dir: Path, console: Callable[[str], None]) -> Iterator[RunLog]:
    log = RunLog(run_dir / "run.log", console)
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("default")
            warnings.showwarning = log.warn  # type: ignore[assignment]
            yield log
    finally:
        log.close()


def is_run_folder(folder: Path) -> bool:
    """A run's folder: it has its run_config.json, or (an ablation or a candidate being set up) stage folders
    only, linked from another run (a project folder holding a KG in data/ is not one)."""
    return (folder / "run_config.json").exists() or all(
        p.name in STAGES and (p.is_symlink() or read_manifest(p) is not None) for p in folder.iterdir())


def run(config: RunConfig, *, until: str | None = None, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run every stage in order (or up to and including ``until``), each skipped when current.

    ``log`` gets one line per stage (and warnings); everything the stages say
    goes to ``<out>/run.log``.  Returns one :class:`StageResult` per stage.
    """
    if until is not None and until not in config.stages():  # e.g. synthetic with data= (it is not run)
        raise ValueError(f"until={until!r}: expected one of this run's stages, {', '.join(config.stages())}")
    config.check_files()
    stages = config.stages()
    for name in stages[: stages.index(until) + 1 if until is not None else None]:
        if STAGES[name].fingerprint is not None:  # it may refuse its config (a backbone not there): say so now
            STAGES[name].fingerprint(config.stage_config(name))
    run_dir = Path(config.out)
    # a KG folder (or anyone's) as --out would get run.log and stage folders written into it
    refuse_unmarked_dir(run_dir, is_run_folder, "has no run_config.json, so it is not a kgtok run folder (a KG "
                        "folder?): give another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with folder_lock(run_dir), _run_log(run_dir, log) as run_log:
        write_json_atomic(run_dir / "run_config.json", config_to_dict(config))
        run_log.file(f"--- kgtok run {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) ---")
        run_log.file(format_config(config))
        ctx = Context(log=run_log.file, progress=config.progress and sys.stderr.isatty(), kg_dir=config.kg_dir(),
                      kg_options=config.load)
        for name in config.stages():
            stage = STAGES[name]
            try:
                result = run_stage(stage, config.stage_config(name), run_dir / name, inputs=config.wired(name),
                                   ctx=ctx)
            except BaseException as error:  # the log says where the run stopped (the console had only "Aborted!")
                run_log.file(f"{name}: stopped ({type(error).__name__}: {error})" if str(error) else
                             f"{name}: stopped ({type(error).__name__})")
                raise
            result.metrics = {k: _rounded(result.metrics[k]) for k in stage.summary if k in result.metrics}
            took = f" in {result.seconds:.1f} s" if result.status == "ran" else ""
            run_log.say(f"{name}: {result.status}{took} -> {result.path}")
            results.append(result)
            if name == until:
                break
    return results


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def link_unchanged(base: RunConfig, variant: RunConfig, stages: tuple[str, ...]) -> list[str]:
    """Link ``base``'s artifacts of ``stages`` (in order) into ``variant``'s run directory up to the first stage
    whose config differs: those are current for the variant, so :func:`run` reuses them.  Returns the linked."""
    linked = []
    for stage in stages:
        if config_to_dict(variant.stage_config(stage)) != config_to_dict(base.stage_config(stage)):
            break
        link = Path(variant.out) / stage
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((Path(base.out) / stage).resolve(), link)
        linked.append(stage)
    return linked


# The paper's ablation set (GS-Quant, Table 4): name -> dotted overrides of the run config.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "without_l1": ("quantize.gse.l1=false",),
    "without_l2": ("quantize.gse.l2=false",),
    "without_gsr": ("quantize.gsr.enabled=false",),
    "without_codes": ("instruct.ids=none",),
    "random_ids": ("instruct.ids=random",),  # unique IDs without the codes' content: do codes or uniqueness help?
}


def ablate(config: RunConfig, names: tuple[str, ...] = tuple(ABLATIONS), *,
           log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the full pipeline, then each ablation in ``<out>/ablate/<name>``, reusing the unchanged stages.

    An ablation run links the full run's artifacts up to the first stage
    whose config the ablation changes, so only that stage and those after it
    run again (stage 4 for the GSE/GSR ablations, stage 5 for the one without
    codes): a linked artifact is current for the ablation's config, and
    :func:`run_stage` reuses it.  Returns ``{name: evaluate metrics}`` with ``full`` first.
    """
    from kgtok.config import _merge, config_from_dict, parse_overrides

    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; expected some of {sorted(ABLATIONS)}")
    run(config, log=log)
    run_dir = Path(config.out)
    results = {"full": read_manifest(run_dir / "evaluate")["metrics"]}
    base = config_to_dict(config)
    for name in names:
        out = run_dir / "ablate" / name
        out.mkdir(parents=True, exist_ok=True)
        variant = config_from_dict(RunConfig, _merge({**base, "out": str(out), "data": str(config.kg_dir())},
                                                     parse_overrides(ABLATIONS[name])))
        link_unchanged(config, variant, ("data", "embed", "text", "hierarchy", "quantize"))
        log(f"ablation {name}: {', '.join(ABLATIONS[name])}")
        run(variant, log=log)
        results[name] = read_manifest(out / "evaluate")["metrics"]
    return results
