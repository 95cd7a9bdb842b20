"""``kgtok report RUN_DIR``: one self-contained HTML page (plots inlined as PNG) about a run.

Sections appear for the stages whose artifacts exist: stage-1 metrics; codebook
usage per level; quantizer loss and held-out entropy curves; hierarchy
alignment (NMI) per level; a 2-D PCA of the fused entity vectors coloured by
level-1 code; fine-tuning loss; the final metrics table (retriever, DIFT rule,
re-rank, class constraint, and ablations found under ``RUN_DIR/ablate``);
per-relation Hits@1; and the stage-5 comparisons: every LM ranker's paired
difference to the retriever (and to the run without IDs, when ``kgtok ablate``
made one) with its 95% bootstrap CI drawn as an error bar, and a table with the
p-values ([`stage5_comparisons`][kgtok.report.stage5_comparisons], from
[`kgtok.llm.compare`][kgtok.llm.compare]).
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.artifacts import MANIFEST, hash_inputs, read_manifest, write_text_atomic
from kgtok.embed.layout import EmbedArtifact
from kgtok.hierarchy.layout import HierarchyArtifact
from kgtok.llm.layout import EvaluateArtifact, FinetuneArtifact
from kgtok.quantize.layout import QuantizeArtifact


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); make that stage's artifact again") from None


def stage_folder(run: Path, stage: str) -> Path:
    """The run's artifact of ``stage``: ``run/<stage>`` as ``kgtok run`` names it, else the subfolder whose
    manifest says that stage made it (stage commands take any --out: codes/, lm/, eval/), the newest of several."""
    conventional = run / stage
    if conventional.is_dir() or not run.is_dir():
        return conventional
    found = [p for p in run.iterdir() if p.is_dir() and (read_manifest(p) or {}).get("stage") == stage]
    return max(found, key=lambda p: (p / MANIFEST).stat().st_mtime) if found else conventional


class MixedRunWarning(UserWarning):
    """A run folder's artifacts come from different chains (see :func:`mixed_artifacts`)."""


def mixed_artifacts(run: Path) -> list[str]:
    """Artifacts of ``run`` made from another upstream artifact than the one the run holds now (a ``kgtok run``
    with a changed setting, killed after its first stages, leaves such a mix): the report would set numbers of
    different chains side by side."""
    import dataclasses

    from kgtok.pipeline import STAGE_ORDER, STAGES, RunConfig

    found = {stage: stage_folder(run, stage) for stage in STAGE_ORDER if stage not in ("synthetic", "data")}
    files = {f.name for f in dataclasses.fields(RunConfig)}  # classes=FILE: the file's hash, not a manifest's
    mixed = []
    for stage, folder in found.items():
        recorded = (read_manifest(folder) or {}).get("inputs") or {}
        for spec in STAGES[stage].inputs:
            upstream = found.get(str(spec.stage))
            if spec.name in files or upstream is None or spec.name not in recorded or \
                    not (upstream / MANIFEST).exists():
                continue
            if hash_inputs({spec.name: upstream})[spec.name] != recorded[spec.name]:  # as the stage recorded it
                mixed.append(f"{folder.relative_to(run)} was made from another {spec.stage} artifact than "
                             f"{upstream.relative_to(run)} holds now")
    return mixed


def _stage1(run: Path) -> str | None:
    metrics = _read(EmbedArtifact(stage_folder(run, "embed")).metrics_path)
    if metrics is None:
        return None
    keys = ["mrr", "hits_at_1", "hits_at_3", "hits_at_10", "mr"]
    rows = [[f"{split} {side}", *[metrics[split][side][k] for k in keys]]
            for split in ("valid", "test") for side in ("both", "head", "tail")]
    return "<h2>Stage 1: KG embeddings (filtered)</h2>" + _table(["split", *keys], rows)


def _quantizer(run: Path) -> str | None:
    quantized = QuantizeArtifact(stage_folder(run, "quantize"))
    metrics = _read(quantized.metrics_path)
    if metrics is None:
        return None
    codes = np.load(quantized.codes)
    parts = ["<h2>Stage 4: codes</h2>", "<h3>Codebook usage per level</h3>" + _usage_plot(codes, metrics)]
    if metrics.get("history"):
        parts.append("<h3>Training: losses and held-out entropy (dotted: selected checkpoint)</h3>"
                     + _training_plot(metrics))
    rows = [[level, metrics.get(f"nmi_hierarchy_level_{level}", float("nan")),
             metrics.get(f"homogeneity_hierarchy_level_{level}", float("nan")),
             metrics.get(f"nmi_types_level_{level}", "-"), metrics["entropy"][level - 1],
             metrics["utilization"][level - 1]] for level in range(1, metrics["levels"] + 1)]
    parts.append("<h3>Hierarchy alignment per level</h3>" + _table(
        ["level", "NMI (hierarchy)", "homogeneity", "NMI (true types)", "entropy", "utilisation"], rows))
    parts.append(_table(["collisions before fix", "after", "reconstruction cosine"],
                        [[metrics["collision_rate_before"], metrics["collision_rate_after"],
                          metrics["reconstruction_cosine"]]]))
    fused = HierarchyArtifact(stage_folder(run, "hierarchy")).fused_vectors
    if fused.exists():
        parts.append("<h3>Entity vectors by level-1 code</h3>" + _pca_plot(np.load(fused), codes))
    parts.append("<h3>The code tree: prefixes and example members</h3>" + code_tree(codes, _entity_labels(run)))
    return "".join(parts)


def _entity_labels(run: Path) -> list[str] | None:
    """Labels of the codes' entities, in the codes' row order (the quantize artifact's ``tokens.txt`` names
    them), from the run's KG loaded as the run loaded it; None when it is not at hand or no longer matches
    (the tree then shows entity ids)."""
    import warnings

    from kgtok.data.layout import DataArtifact
    from kgtok.data.stage import DataConfig
    from kgtok.quantize.layout import QuantizeArtifact

    manifest = DataArtifact(stage_folder(run, "data")).manifest
    kg_dir = manifest.get("metrics", {}).get("kg_dir")
    tokens = QuantizeArtifact(stage_folder(run, "quantize")).tokens
    if not kg_dir or not Path(kg_dir).is_dir() or not tokens.exists():
        return None
    names = [line.split("\t")[1] for line in tokens.read_text(encoding="utf-8").splitlines()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run already showed the data warnings
            kg = DataConfig(**manifest.get("config", {})).load(kg_dir)
    except (OSError, ValueError, TypeError):  # the KG moved on since the run: ids rather than wrong labels
        return None
    label = dict(zip(kg.entity_names, kg.labels))
    return [label[name] for name in names] if all(name in label for name in names) else None


def plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` would open mathtext (``price_$_in_$`` failed)."""
    return text.replace("$", r"\$")


def code_tree(codes: np.ndarray, labels: list[str] | None, *, branches: int = 3, examples: int = 4,
              depth: int = 3) -> str:
    """Nested lists: the largest code prefixes level by level (``<a_3>`` → ``<a_3><b_17>`` → ...), each with
    its entity count and a few members: what a semantic ID means, as users of such IDs ask to see."""
    from kgtok.quantize.tokenizer import level_namespace

    names = labels if labels is not None else [str(i) for i in range(len(codes))]

    def level(rows: np.ndarray, l: int, prefix: str) -> str:
        if l >= min(depth, codes.shape[1]) or len(rows) == 0:
            return ""
        values, counts = np.unique(codes[rows, l], return_counts=True)
        items = []
        for value in values[np.argsort(-counts, kind="stable")][:branches]:
            members = rows[codes[rows, l] == value]
            token = f"{prefix}<{level_namespace(l)}_{value}>"
            shown = ", ".join(html.escape(names[i]) for i in members[:examples])
            items.append(f"<li><code>{html.escape(token)}</code> ({len(members)}): {shown}"
                         f"{level(members, l + 1, token)}</li>")
        return "<ul>" + "".join(items) + "</ul>"

    return level(np.arange(len(codes)), 0, "")


def _usage_plot(codes: np.ndarray, metrics: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    levels = metrics["levels"]
    figure, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 2.6), squeeze=False)
    for level in range(levels):
        counts = np.sort(np.bincount(codes[:, level], minlength=metrics["codebook_size"]))[::-1]
        axes[0, level].bar(np.arange(len(counts)), counts, width=1.0)
        axes[0, level].set_title(f"level {level + 1}: {metrics['utilization'][level]:.0%} used")
        axes[0, level].set_xlabel("code (by frequency)")
    axes[0, 0].set_ylabel("entities")
    return _png(figure)


def _training_plot(metrics: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    history = metrics["history"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
    for key in sorted({k for h in history for k in h if k.startswith("loss_")}):
        left.plot(*zip(*[(h["epoch"], h[key]) for h in history if key in h]), label=key)
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.legend(fontsize=7)
    points = [(h["epoch"], h["heldout_entropy"]) for h in history if "heldout_entropy" in h]
    if points:
        right.plot(*zip(*points), marker=".")
        right.axvline(metrics.get("best_epoch", 0), color="grey", linestyle=":")
    right.set_xlabel("epoch")
    right.set_ylabel("held-out code entropy (bits)")
    return _png(figure)


def _pca_plot(vectors: np.ndarray, codes: np.ndarray) -> str:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    shown = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 5000), replace=False)
    xy = PCA(n_components=2, random_state=0).fit_transform(vectors[shown])
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.scatter(xy[:, 0], xy[:, 1], c=codes[shown, 0], cmap="tab20", s=4)
    axis.set_title("fused entity vectors (PCA), colour = level-1 code")
    return _png(figure)


def _finetune(run: Path) -> str | None:
    import matplotlib.pyplot as plt

    metrics = _read(FinetuneArtifact(stage_folder(run, "finetune")).metrics_path)
    if metrics is None:
        return None
    points = [(h["step"], h["loss"]) for h in metrics["history"] if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in metrics["history"] if "eval_loss" in h]
    figure, axis = plt.subplots(figsize=(6, 3))
    if points:
        axis.plot(*zip(*points), label="LM-train")
    if evals:
        axis.plot(*zip(*evals), marker="o", label="LM-valid")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (answer tokens)")
    axis.legend()
    summary = _table(["backbone", "adapter", "steps", "train tokens/s", "trainable parameters"],
                     [[Path(metrics["backbone"]).name, metrics["adapter"], metrics["steps"],
                       metrics["train_tokens_per_second"], metrics["trainable_parameters"]]])
    return "<h2>Stage 5: fine-tuning</h2>" + summary + _png(figure)


def _final(run: Path) -> str | None:
    import matplotlib.pyplot as plt

    from kgtok.llm.rankers import MEASURES, rankers

    metrics = _read(EvaluateArtifact(stage_folder(run, "evaluate")).metrics_path)
    if metrics is None or "retriever" not in metrics:
        return None
    keys = list(MEASURES)
    rows = [[r.label, *[metrics[r.key]["both"][k] for k in keys]] for r in rankers() if r.key in metrics]
    for ablation in sorted(EvaluateArtifact(p).metrics_path for p in (run / "ablate").glob("*/evaluate")):
        other = _read(ablation)
        for r in rankers():
            if r.key != "retriever" and r.key in other:  # an ablation keeps stage 1: only the LM's rankers differ
                rows.append([f"ablation {ablation.parent.parent.name}: {r.label}",
                             *[other[r.key]["both"][k] for k in keys]])
    parts = [f"<h2>Link prediction ({metrics['queries']} queries, filtered)</h2>", _table(["ranker", *keys], rows),
             f"<p>{metrics['queries_per_second']:.1f} queries/s; gold among the candidates: "
             f"{metrics['gold_in_candidates']:.1%}</p>"]
    per_relation = metrics.get("per_relation", {})
    if per_relation.get("dift"):
        names = sorted(per_relation["dift"], key=lambda r: -per_relation["dift"][r]["count"])[:30]
        figure, axis = plt.subplots(figsize=(8, 0.25 * len(names) + 1))
        y = np.arange(len(names))
        axis.barh(y - 0.2, [per_relation["retriever"][r]["hits_at_1"] for r in names], height=0.4, label="retriever")
        axis.barh(y + 0.2, [per_relation["dift"][r]["hits_at_1"] for r in names], height=0.4, label="LM pick")
        axis.set_yticks(y, [plain(n[-40:]) for n in names], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("Hits@1")
        axis.legend()
        parts.append("<h3>Per-relation Hits@1 (most frequent relations)</h3>" + _png(figure))
    return "".join(parts)


def _evaluate_runs(run: Path) -> dict[str, Path]:
    """The run's link-prediction evaluation and its ablations' (``kgtok ablate``), by name, ``full`` first."""
    evaluated = stage_folder(run, "evaluate")
    runs = {"full": evaluated} if (evaluated / "predictions.jsonl").exists() else {}
    if runs:
        for predictions in sorted((run / "ablate").glob("*/evaluate/predictions.jsonl")):
            runs[predictions.parent.parent.name] = predictions.parent
    return runs


def stage5_comparisons(run_dir: str | Path, *, resamples: int = 10_000, seed: int = 0) -> str | None:
    """The report's section on stage 5's comparisons, or None when the run has no link-prediction evaluation.

    Per LM ranker of the run (and of each ablation under ``RUN_DIR/ablate``): its paired difference
    to the retriever in Hits@1 and MRR, with the 95% percentile-bootstrap CI as an error bar, and a
    table of the differences, CIs and p-values (exact McNemar for Hits@1, paired sign-flip
    permutation for MRR), also against the run without IDs (``without_codes``) when there is one.
    The rows come from [`comparison_rows`][kgtok.llm.compare.comparison_rows], as ``kgtok ablate`` prints them.

    Parameters
    ----------
    run_dir : str or Path
        A ``kgtok run`` directory.
    resamples : int, default 10000
        Bootstrap resamples (and random sign flips) per comparison.
    seed : int, default 0
        Seed of the resampling.

    Returns
    -------
    str or None
        The HTML of the section (figure inlined as PNG).
    """
    from kgtok.llm.compare import comparison_rows

    runs = _evaluate_runs(Path(run_dir))
    if not runs:
        return None
    try:
        rows = comparison_rows(runs, "without_codes" if "without_codes" in runs else None, resamples=resamples,
                               seed=seed)
    except ValueError:  # triple classification: no ranks to compare
        return None
    compared = [row for row in rows if row["vs_retriever"]]
    if not compared:
        return None
    several = len(runs) > 1
    names = [f"{row['run']}: {row['label']}" if several else row["label"] for row in compared]
    versus_retriever = [[row["run"], row["label"], *_comparison_cells(row, "vs_retriever", with_value=True)]
                        for row in compared]
    versus_no_ids = [[row["run"], row["label"], *_comparison_cells(row, "vs_no_ids", with_value=False)]
                     for row in compared if row["vs_no_ids"]]
    retriever = rows[0]
    parts = [f"<h2>Stage 5: each ranker against the retriever ({retriever['queries']} test queries, paired)</h2>",
             _comparison_plot(names, compared),
             f"<p>Retriever: Hits@1 {retriever['hits_at_1']:.4f}, MRR {retriever['mrr']:.4f}. Points: the "
             f"ranker's mean minus the retriever's over the same queries; bars: 95% percentile bootstrap CI over "
             f"the queries ({resamples:,} resamples). Green or red: the interval excludes 0; grey: no measurable "
             "difference. p: exact McNemar test (Hits@1), paired sign-flip permutation test (MRR).</p>",
             _table(["run", "ranker", "Hits@1", "- retriever", "95% CI", "p", "MRR", "- retriever", "95% CI", "p"],
                    versus_retriever)]
    if versus_no_ids:
        parts += ["<h3>Against the same ranker without IDs (ablation without_codes)</h3>",
                  _table(["run", "ranker", "Hits@1 - no IDs", "95% CI", "p", "MRR - no IDs", "95% CI", "p"],
                         versus_no_ids)]
    return "".join(parts)


def _comparison_cells(row: dict[str, Any], other: str, *, with_value: bool) -> list[Any]:
    """Per measure: (the ranker's value,) its difference to ``other``, the 95% CI and the p-value."""
    cells: list[Any] = []
    for measure in ("hits_at_1", "mrr"):
        pair = row[other][measure]
        cells += [row[measure]] if with_value else []
        cells += [f"{pair['difference']:+.4f}", f"[{pair['ci_low']:+.4f}, {pair['ci_high']:+.4f}]",
                  _p_value(pair["p_value"])]
    return cells


def _p_value(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _comparison_plot(names: list[str], rows: list[dict[str, Any]]) -> str:
    """Horizontal error bars: per ranker, the difference to the retriever and its 95% CI, one panel per measure."""
    import matplotlib.pyplot as plt

    y = np.arange(len(names))
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.4), sharey=True)
    for axis, measure, title in zip(axes, ("hits_at_1", "mrr"), ("Hits@1", "MRR")):
        pairs = [row["vs_retriever"][measure] for row in rows]
        difference = np.array([p["difference"] for p in pairs])
        errors = np.array([[p["difference"] - p["ci_low"] for p in pairs],
                           [p["ci_high"] - p["difference"] for p in pairs]])  # (2, rankers)
        colours = ["tab:green" if p["ci_low"] > 0 else "tab:red" if p["ci_high"] < 0 else "tab:grey" for p in pairs]
        axis.axvline(0.0, color="black", linewidth=0.8)
        for i in range(len(names)):
            axis.errorbar(difference[i], y[i], xerr=errors[:, i: i + 1], fmt="o", color=colours[i], capsize=4)
        axis.set_title(f"{title}: ranker - retriever (95% CI)")
        axis.set_xlabel(f"difference in {title}")
    axes[0].set_yticks(y, [plain(n) for n in names], fontsize=8)
    axes[0].invert_yaxis()
    return _png(figure)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td:first-child{text-align:left}img{max-width:100%}"""


def write_report(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run directory; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    sections = [s for s in (_stage1(run), _quantizer(run), _finetune(run), _final(run),
                             stage5_comparisons(run)) if s]
    if not sections:
        raise ValueError(f"{run}: no stage artifacts found (subfolders made by kgtok embed, quantize, finetune or "
                         "evaluate)")
    found = {stage: stage_folder(run, stage) for stage in ("embed", "hierarchy", "quantize", "finetune", "evaluate")}
    read = [f"{stage}: {html.escape(str(folder.relative_to(run)))}" for stage, folder in found.items()
            if (folder / MANIFEST).exists()]
    sections.insert(0, f"<p>Artifacts read: {'; '.join(read)}</p>")
    mixed = mixed_artifacts(run)
    if mixed:  # said on the page and to the caller: the numbers below come from different chains
        warnings.warn(f"{run}: {'; '.join(mixed)} (run the later stages again)", MixedRunWarning, stacklevel=2)
        sections.insert(0, "<p><b>Warning: the artifacts are not of one chain.</b> "
                        + html.escape("; ".join(mixed)) + ". Run the later stages again.</p>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kgtok report: {html.escape(run.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>kgtok report: {html.escape(str(run))}</h1>"
            + "".join(sections) + "</body></html>")
    dest = Path(dest) if dest else run / "report.html"
    return write_text_atomic(dest, page)


def screenshot(page: str | Path, png: str | Path, *, width: int = 1200, height: int = 4000,
               timeout: float = 120.0) -> Path:
    """Render ``page`` in headless Chromium (Debian package ``chromium``) to a PNG, to check it displays."""
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    png = Path(png).resolve()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", Path(page).resolve().as_uri()],
                   check=True, capture_output=True, timeout=timeout)
    return png
