"""``kgtok report``'s stage-5 section: each ranker's paired difference to the retriever, 95% CI as error bars, p."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from kgtok import report
from kgtok.llm.compare import comparison_rows
from kgtok.report import stage5_comparisons, write_report

N = 300


def write_evaluation(path, picks_gold: np.ndarray, stage1: np.ndarray) -> None:
    """A stage-5c artifact's predictions.jsonl: three candidates; the LM picks the gold where ``picks_gold``."""
    path.mkdir(parents=True)
    rows = []
    for i, (right, s) in enumerate(zip(picks_gold, stage1)):
        gold_index = int(s) - 1  # the gold is listed at its stage-1 rank (1..3)
        position = gold_index if right else (gold_index + 1) % 3
        rows.append({"id": f"test-{i}-tail", "direction": "tail", "relation": "r", "gold": 0,
                     "stage1_rank": float(s), "gold_index": gold_index, "pick": 0 if right else 99,
                     "pick_position": position + 1, "scores": [0.0 if j == position else -1.0 for j in range(3)]})
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def ablated_run(tmp_path):
    """A run directory with its evaluation and one ablation without IDs (what ``kgtok ablate`` leaves)."""
    rng = np.random.default_rng(0)
    stage1 = rng.integers(1, 4, N)
    write_evaluation(tmp_path / "run" / "evaluate", rng.random(N) < 0.8, stage1)
    write_evaluation(tmp_path / "run" / "ablate" / "without_codes" / "evaluate", rng.random(N) < 0.3, stage1)
    return tmp_path / "run"


def test_stage5_section_draws_each_ranker_against_the_retriever_with_its_ci(ablated_run, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_png", lambda figure: figures.append(figure) or "<img alt='plot'>")
    page = stage5_comparisons(ablated_run, resamples=500)
    rows = [r for r in comparison_rows({"full": ablated_run / "evaluate",
                                        "without_codes": ablated_run / "ablate" / "without_codes" / "evaluate"},
                                       "without_codes", resamples=500) if r["vs_retriever"]]
    assert f"({N} test queries, paired)" in page and "exact McNemar" in page and "<th>MRR - no IDs</th>" in page
    # One error bar per (run, LM ranker) and measure, at the difference, spanning the bootstrap CI.
    (figure,) = figures
    hits, mrr = figure.axes
    assert [t.get_text() for t in hits.get_yticklabels()] == [f"{r['run']}: {r['label']}" for r in rows]
    for axis, measure in ((hits, "hits_at_1"), (mrr, "mrr")):
        bars = axis.containers
        assert len(bars) == len(rows)
        for bar, row in zip(bars, rows):
            pair = row["vs_retriever"][measure]
            (x,), _ = bar.lines[0].get_data()
            (segment,) = bar.lines[2][0].get_segments()
            assert x == pytest.approx(pair["difference"])
            assert segment[:, 0] == pytest.approx([pair["ci_low"], pair["ci_high"]])
    # The table: each difference with its interval and p-value.
    full_dift = next(r for r in rows if r["run"] == "full" and r["ranker"] == "dift")
    pair = full_dift["vs_no_ids"]["hits_at_1"]
    assert f"<td>{pair['difference']:+.4f}</td><td>[{pair['ci_low']:+.4f}, {pair['ci_high']:+.4f}]</td>" in page
    assert pair["p_value"] < 0.001 and "<td>&lt;0.001</td>" in page  # 80% vs 30% right picks


def test_report_page_has_the_stage5_section_and_renders(ablated_run, tmp_path):
    page = write_report(ablated_run).read_text()
    assert "each ranker against the retriever" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 1
    if shutil.which("chromium"):  # it renders: the screenshot is not a blank page
        import matplotlib.image

        pixels = matplotlib.image.imread(report.screenshot(ablated_run / "report.html", tmp_path / "shot.png",
                                                           height=900))
        assert pixels.shape[:2] == (900, 1200) and pixels[..., :3].std() > 0.05


def test_no_stage5_section_without_a_link_prediction_evaluation(tmp_path):
    assert stage5_comparisons(tmp_path) is None
    classification = tmp_path / "evaluate"
    classification.mkdir()
    (classification / "predictions.jsonl").write_text(json.dumps({"id": "q0", "label": True}) + "\n")
    assert stage5_comparisons(tmp_path) is None


def test_code_tree_labels_follow_the_codes_rows_and_the_runs_loading_options(tmp_path):
    """Labels come by entity name in the quantize artifact's row order, from the KG loaded as the run loaded it
    (a run with skip_header made the report fail; a KG whose files changed order gave wrong labels)."""
    kg = tmp_path / "kg"
    kg.mkdir()
    for split in ("train", "valid", "test"):
        (kg / f"{split}.txt").write_text("head\trelation\ttail\nb\tr\ta\na\tr\tc\n")
    (kg / "entity_text.tsv").write_text("a\tAlice\t\nb\tBob\t\nc\tCarol\t\n")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps(
        {"stage": "data", "config": {"skip_header": True, "strip_whitespace": False}, "metrics": {"kg_dir": str(kg)}}))
    (run / "quantize").mkdir()
    (run / "quantize" / "tokens.txt").write_text("0\tc\t<a_0>\n1\ta\t<a_1>\n2\tb\t<a_2>\n")
    assert report._entity_labels(run) == ["Carol", "Alice", "Bob"]
    (run / "quantize" / "tokens.txt").write_text("0\tc\t<a_0>\n1\tzed\t<a_1>\n")  # no longer the run's KG
    assert report._entity_labels(run) is None


def test_a_dollar_in_a_name_is_shown_as_it_is():
    """A relation named price_$_in_$ opened matplotlib's mathtext and the report failed."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    figure, axis = plt.subplots()
    axis.set_yticks([0], [report.plain("price_$_in_$")])
    figure.savefig(io.BytesIO(), format="png")
    plt.close(figure)
    assert report.plain("a$b") == "a\\$b"


def test_stage_folders_are_found_by_manifest_whatever_their_names(ablated_run, tmp_path):
    """Stage commands take any --out (the docs use codes/, lm/, eval/): the report showed only the folders named
    as kgtok run names them, and said nothing of the rest."""
    run = tmp_path / "walkthrough"
    shutil.copytree(ablated_run / "evaluate", run / "eval")
    (run / "eval" / "manifest.json").write_text(json.dumps({"stage": "evaluate", "config": {}, "inputs": {}}))
    (run / "notes").mkdir()
    assert report.stage_folder(run, "evaluate") == run / "eval"
    assert report.stage_folder(run, "quantize") == run / "quantize"  # none: the conventional name, absent
    page = write_report(run).read_text()
    assert "Artifacts read: evaluate: eval" in page and "each ranker against the retriever" in page
    (run / "eval" / "metrics.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"eval/metrics.json: not readable JSON"):
        write_report(run)


def test_a_run_folder_of_mixed_chains_is_named(ablated_run):
    """kgtok run with a changed setting, killed after its first stages, leaves later artifacts of the old
    chain beside new earlier ones: the report set their numbers side by side without a word."""
    import hashlib

    run = ablated_run
    (run / "finetune").mkdir()
    (run / "finetune" / "manifest.json").write_text(json.dumps({"stage": "finetune", "config": {"epochs": 2}}))
    model_hash = hashlib.sha256((run / "finetune" / "manifest.json").read_bytes()).hexdigest()
    (run / "evaluate" / "manifest.json").write_text(json.dumps(
        {"stage": "evaluate", "config": {}, "inputs": {"model": model_hash}}))
    assert report.mixed_artifacts(run) == []
    assert "not of one chain" not in write_report(run).read_text()
    (run / "hierarchy").mkdir()  # classes=FILE records the file's hash, not hierarchy's manifest: no alarm
    (run / "hierarchy" / "manifest.json").write_text(json.dumps({"stage": "hierarchy"}))
    (run / "evaluate" / "manifest.json").write_text(json.dumps(
        {"stage": "evaluate", "config": {}, "inputs": {"model": model_hash, "classes": "0" * 64}}))
    assert report.mixed_artifacts(run) == []
    (run / "finetune" / "manifest.json").write_text(json.dumps({"stage": "finetune", "config": {"epochs": 1}}))
    assert report.mixed_artifacts(run) == ["evaluate was made from another finetune artifact than finetune "
                                           "holds now"]
    with pytest.warns(report.MixedRunWarning, match="evaluate was made from another finetune artifact"):
        assert "not of one chain" in write_report(run).read_text()
