"""The stage contract: what every pipeline stage declares, and the one executor that runs it.

A stage is a :class:`Stage`: its name, its config class, its named inputs
(artifacts of earlier stages, or plain files) and one function

    run(config, inputs, dest, ctx) -> metrics

that writes its files into ``dest`` (a temporary directory, renamed into
place when ``run`` returns) and returns the summary metrics for the
manifest.  :func:`run_stage` does everything around it, the same way for
every stage and for both ``kgtok <stage>`` and ``kgtok run``:

- checks that each input is a finished artifact of the declared stage;
- hashes the inputs (upstream manifests, the KG's files) into one record
  ``{stage, config, inputs}``; fields marked ``machine`` in the config
  (:func:`kgtok.config.machine`) never count;
- reuses ``dest`` when its manifest holds the same record and its files
  match their recorded sizes and hashes (else says which file changed);
- holds one lock per output folder, so two processes never write it;
- gives the stage one resumable work folder, ``<dest>.work``, kept across
  kills while the record is unchanged up to ``resumable`` fields, removed
  once the artifact is written;
- sets torch's threads from ``config.threads`` (0 = all cores);
- writes the artifact atomically with its manifest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kgtok.artifacts import (
    Artifact,
    artifact_dir,
    clean_leftovers,
    folder_lock,
    hash_inputs,
    manifest_matches,
    read_json,
    read_manifest,
    refuse_foreign_dir,
    timed,
    verify_files,
    write_json_atomic,
)
from kgtok.config import config_changes, config_to_dict

if TYPE_CHECKING:
    from kgtok.data.graph import KnowledgeGraph
    from kgtok.data.stage import DataConfig

KG_SUFFIXES = (".txt", ".tsv", ".dict")  # the files of a KG directory that stages read


class ResumeWarning(UserWarning):
    """Saved work of a killed run is resumed under changed values, or dropped because the config changed."""


class ArtifactChangedWarning(UserWarning):
    """A finished artifact's files no longer match its manifest, so the stage runs again."""


@dataclass(frozen=True)
class Input:
    """One named input of a stage: an upstream stage's artifact, or a plain file (``stage=None``)."""

    name: str  # the run function's key and the CLI flag (--name)
    stage: str | None  # the stage that makes it; None: a file given by the user
    layout: type[Artifact] | None = None  # the upstream layout, to check the directory is one
    help: str = ""


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: name, config class, inputs and the function that runs it."""

    name: str
    title: str  # for people: "stage 1: KG embeddings"
    config: type
    run: Callable[[Any, dict[str, Path], Path, Context], dict[str, Any]]
    inputs: tuple[Input, ...] = ()
    # Which inputs a given config needs (names); default: every artifact input.
    needs: Callable[[Any], tuple[str, ...]] | None = None
    uses_kg: bool = True  # reads the KG (ctx.kg); its files are then hashed as an input
    # A stage that reads the KG only under some configs, when given (evaluate's classes file, its generative
    # ranker's filter): then its files are hashed too, and another KG runs the stage again.
    reads_kg: Callable[[Any], bool] | None = None
    # Hashes of what the config points to outside the inputs (e.g. the text encoder's files).
    fingerprint: Callable[[Any], dict[str, str]] | None = None
    summary: tuple[str, ...] = ()  # manifest metrics shown in the run's table

    def hashes_kg(self, config: Any) -> bool:
        """Whether the KG (when there is one) counts as an input of this config's artifact."""
        return self.uses_kg or (self.reads_kg is not None and self.reads_kg(config))

    def needed_inputs(self, config: Any) -> tuple[str, ...]:
        if self.needs is not None:
            return self.needs(config)
        return tuple(i.name for i in self.inputs if i.stage is not None)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)


def work_dir(dest: str | Path) -> Path:
    """The one resumable work folder of the artifact ``dest``: ``<dest>.work``."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".work")


@dataclass
class Context:
    """What a stage's run function gets besides its config and inputs.

    ``kg`` is loaded once (with the options ``kg_options``) and shared by every
    stage of a run; ``work`` is the stage's resumable folder; ``log`` and
    ``progress`` say where messages go and whether bars are drawn.
    """

    log: Callable[[str], None] = print
    progress: bool = True
    kg_dir: Path | None = None
    kg_options: DataConfig | None = None  # how the KG is loaded (skip_header, strip_whitespace); None: defaults
    work: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _kg: KnowledgeGraph | None = None

    @property
    def kg(self) -> KnowledgeGraph:
        if self._kg is None:
            if self.kg_dir is None:
                raise ValueError("this stage reads a KG: give --data (a KG directory)")
            from kgtok.data.stage import DataConfig

            self._kg = (self.kg_options or DataConfig()).load(self.kg_dir)
        return self._kg

    @property
    def has_kg(self) -> bool:
        """A KG is given (a directory, or one already loaded): :attr:`kg` can be read."""
        return self.kg_dir is not None or self._kg is not None

    def timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Add the wall time of the block to the manifest's ``timings[name]`` (seconds)."""
        return timed(self.timings, name)

    def for_stage(self, work: Path) -> Context:
        """A context for one stage: same KG, log and progress; its own work folder and timings."""
        return Context(log=self.log, progress=self.progress, kg_dir=self.kg_dir, kg_options=self.kg_options,
                       work=work, _kg=self._kg)


def kg_hashes(kg_dir: Path | None) -> dict[str, str]:
    """Hashes of the files of a KG directory that stages read (splits, dicts, text, types)."""
    if kg_dir is None:
        return {}
    files = {f"kg/{p.name}": p for p in sorted(Path(kg_dir).iterdir()) if p.is_file() and p.suffix in KG_SUFFIXES}
    return hash_inputs(files)


def kg_content_hash(kg: KnowledgeGraph) -> dict[str, str]:
    """A hash of what a KG object holds (its directory's files may not be what it holds): ids, triples, text,
    types."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for names in (kg.entity_names, kg.relation_names, kg.labels, kg.descriptions):
        digest.update("\x00".join(map(str, names)).encode("utf-8") + b"\x01")
    for split in sorted(kg.triples):
        digest.update(split.encode() + np.ascontiguousarray(kg.triples[split].numpy()).tobytes())
    if kg.entity_types is not None:
        digest.update(np.ascontiguousarray(kg.entity_types).tobytes())
    return {"kg/in_memory": digest.hexdigest()}


def input_record(reads_kg: bool, inputs: Mapping[str, Path], kg_dir: Path | None,
                 fingerprint: Mapping[str, str], kg_options: DataConfig | None = None,
                 kg: KnowledgeGraph | None = None) -> dict[str, str]:
    """The hashes that decide whether ``dest`` is current: every input, the KG's files (or ``kg``'s content:
    a KnowledgeGraph object given to a stage may have been built or changed in memory) and loading options if
    it reads them, and the stage's fingerprint of what its config points to."""
    hashes = hash_inputs(inputs)
    if reads_kg and (kg_dir is not None or kg is not None):
        hashes.update(kg_hashes(kg_dir) if kg is None else kg_content_hash(kg))
        hashes.update(kg_options.record() if kg_options is not None else {})
    hashes.update(fingerprint)
    return hashes


@dataclass
class StageResult:
    """What :func:`run_stage` did: ``status`` is "ran" or "cached"."""

    name: str
    path: Path
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def check_inputs(stage: Stage, config: Any, inputs: Mapping[str, str | Path | None]) -> dict[str, Path]:
    """The inputs the config needs, each checked to exist and (for artifacts) to be of the declared stage."""
    known = {i.name for i in stage.inputs}
    unknown = sorted(set(k for k, v in inputs.items() if v is not None) - known)
    if unknown:
        raise ValueError(f"{stage.name}: unknown input(s) {unknown}; it takes {sorted(known) or 'none'}")
    given = {k: Path(v) for k, v in inputs.items() if v is not None}
    for name in stage.needed_inputs(config):
        if name not in given:
            spec = stage.input(name)
            raise ValueError(f"{stage.name} needs --{name} ({spec.help or 'an artifact of stage ' + str(spec.stage)})")
    for name, path in given.items():
        spec = stage.input(name)
        if spec.layout is not None and not (spec.stage is None and not path.is_dir()):
            spec.layout(path).checked(f"--{name}")
            # Sizes and sampled hashes: a truncated file fails deep in numpy without its name, so it is named
            # first. A warning, not an error: an input edited on purpose (a few test queries kept) still runs.
            damaged = verify_files(path)
            if damaged:
                warnings.warn(f"--{name} {path}: {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''} "
                              "missing or not as its manifest records (damaged or edited since it was written); "
                              "if the stage fails reading it, make that artifact again",
                              ArtifactChangedWarning, stacklevel=3)
        elif not path.exists():
            raise FileNotFoundError(f"--{name} {path}: no such file or directory")
    return given


def work_changes(saved: Mapping[str, Any], record: Mapping[str, Any], config: Any) -> tuple[list[str], list[str]]:
    """``(resumable, other)``: where the record of saved work differs from this run's ``record``
    (``{stage, config, inputs}``; ``other`` ends in "inputs" when the stage or the inputs differ)."""
    resumable, other = config_changes(saved.get("config") or {}, config)
    if saved.get("stage") != record["stage"] or saved.get("inputs") != record["inputs"]:
        other = [*other, "inputs"]
    return resumable, other


def open_work(work: Path, record: dict[str, Any], config: Any) -> Path:
    """The stage's work folder, kept when its saved record allows a resume, else emptied (with a warning).

    The record is ``{stage, config, inputs}``; a resume is allowed when the
    inputs and every field not marked ``resumable`` (or ``machine``) are
    unchanged; then the new values of the resumable fields win.
    """
    saved_path = work / "record.json"
    saved = read_json(saved_path)
    if saved is not None:
        resumable, other = work_changes(saved, record, config)
        if other:
            warnings.warn(f"{work}: saved work of a run with a different config ({', '.join(other)}); "
                          "the new config wins and the stage starts afresh", ResumeWarning, stacklevel=3)
            shutil.rmtree(work, ignore_errors=True)
        elif resumable:
            values = ", ".join(f"{k}: {_dotted(saved['config'], k)!r} -> {_dotted(config_to_dict(config), k)!r}"
                               for k in resumable)
            warnings.warn(f"{work}: resuming with new values ({values}); the new values win",
                          ResumeWarning, stacklevel=3)
    elif work.exists():
        shutil.rmtree(work, ignore_errors=True)  # made before records existed: nothing says what it holds
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, record)
    return work


def _dotted(data: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def is_current(dest: Path, stage: Stage, config: Any, hashes: Mapping[str, str]) -> bool:
    """``dest`` holds this stage's artifact for this config and these inputs, with its files intact."""
    if not manifest_matches(dest, stage.name, config, hashes):
        return False
    bad = verify_files(dest)
    if bad:
        warnings.warn(f"{dest}: {', '.join(bad[:5])} changed since the artifact was written (size or content "
                      f"differs from {dest / 'manifest.json'}); running {stage.name} again",
                      ArtifactChangedWarning, stacklevel=3)
        return False
    return True


def _work_of(work: Path, record: Mapping[str, Any], config: Any) -> bool:
    """``work`` holds the saved work of a run with exactly this ``record`` (not that of another run, killed,
    with a resumable field changed: that one is still to be resumed)."""
    saved = read_json(work / "record.json")
    return isinstance(saved, dict) and work_changes(saved, record, config) == ([], [])


def run_stage(
    stage: Stage,
    config: Any,
    dest: str | Path,
    *,
    inputs: Mapping[str, str | Path | None] | None = None,
    data: str | Path | KnowledgeGraph | None = None,
    load: DataConfig | None = None,
    ctx: Context | None = None,
    reuse: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run ``stage`` with ``config`` on ``inputs`` into ``dest``, or reuse ``dest`` when it is current.

    ``data`` is the KG (a directory, or a loaded KnowledgeGraph), ``load``
    how a directory is loaded (skip_header, strip_whitespace); a pipeline
    passes its shared ``ctx`` instead, which holds the KG loaded once.
    """
    from kgtok.config import format_config
    from kgtok.data.graph import KnowledgeGraph
    from kgtok.data.stage import DataConfig
    from kgtok.runtime import preserved_global_rng, torch_threads

    if not isinstance(config, stage.config):  # another stage's config fails deep inside, on a missing field
        raise TypeError(f"{stage.name}: config is a {type(config).__name__}, expected a {stage.config.__name__}")
    dest = Path(dest)
    fingerprint = stage.fingerprint(config) if stage.fingerprint is not None else {}  # may refuse the config
    if ctx is None:
        ctx = Context(log=log, progress=progress, kg_options=load)
        if isinstance(data, KnowledgeGraph):
            ctx._kg, ctx.kg_dir = data, Path(data.source) if data.source else None
            ctx.kg_options = DataConfig.of(data)
        elif data is not None:
            ctx.kg_dir = check_kg_dir(data)
    if stage.uses_kg and not ctx.has_kg:
        raise ValueError(f"{stage.name} reads a KG: give --data (a KG directory)")
    given = check_inputs(stage, config, inputs or {})
    refuse_dest_of_inputs(dest, given, stage.name)
    started = time.perf_counter()
    if not is_main_process():
        return _run_as_helper_process(stage, config, given, dest, ctx)
    with folder_lock(dest):
        hashes = input_record(stage.hashes_kg(config), given, ctx.kg_dir, fingerprint, ctx.kg_options,
                              data if isinstance(data, KnowledgeGraph) else None)
        record = {"stage": stage.name, "config": config_to_dict(config), "inputs": hashes}
        if manifest_matches(dest, stage.name, config, hashes) and _work_of(work_dir(dest), record, config):
            # the finished run's work folder, left by a kill between the artifact's rename and its removal:
            # reused (the cache) or resumed (--force, at its final step) it would only mislead
            shutil.rmtree(work_dir(dest), ignore_errors=True)
        if reuse and is_current(dest, stage, config, hashes):
            return StageResult(stage.name, dest, "cached", read_manifest(dest).get("metrics", {}))
        clean_leftovers(dest.parent, dest.name)
        ctx.log(format_config(config))
        work = open_work(work_dir(dest), record, config)
        stage_ctx = ctx.for_stage(work)
        try:
            with torch_threads(getattr(config, "threads", 0)), preserved_global_rng():
                with artifact_dir(dest, stage=stage.name, config=config, inputs=hashes) as writer:
                    metrics = stage.run(config, given, writer.path, stage_ctx)
                    writer.metrics.update(metrics or {})
                    writer.timings.update(stage_ctx.timings)
        except BaseException:
            if {p.name for p in work.iterdir()} <= {"record.json"}:  # nothing to resume from: no leftover folder
                shutil.rmtree(work, ignore_errors=True)
            raise
        ctx._kg = stage_ctx._kg  # a KG the stage loaded serves the stages after it
        shutil.rmtree(work, ignore_errors=True)
    return StageResult(stage.name, dest, "ran", read_manifest(dest).get("metrics", {}),
                       time.perf_counter() - started)


def refuse_dest_of_inputs(dest: Path, inputs: Mapping[str, Path], stage: str) -> None:
    """An --out that is one of the inputs (or holds one) would replace what the stage reads: refused before any
    work, as is an --out that holds another stage's artifact or someone's files."""
    target = dest.resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise FileExistsError(f"--out {dest} is (or holds) the {name} input {path}: the new artifact would "
                                  "replace it; give another --out")
    refuse_foreign_dir(dest, stage)


def is_main_process() -> bool:
    """False in the second and later processes of ``accelerate launch`` (``RANK`` > 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_as_helper_process(stage: Stage, config: Any, inputs: dict[str, Path], dest: Path,
                           ctx: Context) -> StageResult:
    """A non-main process of a distributed stage: it computes with the others (same work folder, which the
    main process keeps), writes its copy of the outputs to a private folder, and leaves ``dest`` alone."""
    import tempfile

    from kgtok.runtime import preserved_global_rng, torch_threads

    work = work_dir(dest)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.rank{os.environ.get('RANK')}-", dir=dest.parent) as tmp:
        with torch_threads(getattr(config, "threads", 0)), preserved_global_rng():
            stage.run(config, inputs, Path(tmp), ctx.for_stage(work))
    return StageResult(stage.name, dest, "helper")


def check_kg_dir(data: str | Path) -> Path:
    """``--data``: a KG directory (checked before any work starts)."""
    from kgtok.data.graph import kg_dir_problem

    problem = kg_dir_problem(data)
    if problem:
        raise ValueError(f"--data {data}: {problem}")
    return Path(data)
