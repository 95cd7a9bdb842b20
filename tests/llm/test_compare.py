"""A-vs-B tables of stage 5c runs: paired by query id, each difference from metrics.paired_comparison."""

from __future__ import annotations

import json

import numpy as np

from kgtok.llm.compare import comparison_markdown, comparison_rows, paired_runs, significant
from kgtok.metrics import paired_comparison


def write_run(path, ids, stage1, picks):
    """A stage-5c artifact's predictions.jsonl: gold 0 at stage-1 rank ``stage1``; ``picks``: LM pick positions."""
    path.mkdir(parents=True)
    rows = [{"id": q, "direction": "tail", "relation": "r", "gold": 0, "stage1_rank": float(s),
             "pick": 0 if p == s else 99, "pick_position": int(p), "gold_index": int(s) - 1 if s <= 3 else -1,
             "scores": [0.0 if j == p - 1 else -1.0 for j in range(3)]}
            for q, s, p in zip(ids, stage1, picks)]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_are_paired_by_query_and_use_the_one_statistics_function(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    ids = [f"test-{i}-tail" for i in range(n)]
    stage1 = rng.integers(1, 4, n)
    good = np.where(rng.random(n) < 0.8, stage1, 1)  # picks the gold (its stage-1 position) 80% of the time
    bad = np.where(rng.random(n) < 0.3, stage1, 1)
    write_run(tmp_path / "codes", ids, stage1, good)
    write_run(tmp_path / "none", ids[::-1], stage1[::-1], bad[::-1])  # another order: pairing is by id
    rows = comparison_rows({"codes": tmp_path / "codes", "none": tmp_path / "none"}, "none", resamples=500)
    assert rows[0]["ranker"] == "retriever" and rows[0]["vs_retriever"] is None
    codes_dift = next(r for r in rows if r["run"] == "codes" and r["ranker"] == "dift")
    none_dift = next(r for r in rows if r["run"] == "none" and r["ranker"] == "dift")
    assert none_dift["vs_no_ids"] is None and codes_dift["queries"] == n
    dift_codes = np.where(good == stage1, 1.0, stage1 + (good > stage1))
    dift_none = np.where(bad == stage1, 1.0, stage1 + (bad > stage1))
    assert codes_dift["hits_at_1"] == np.mean(dift_codes <= 1)
    assert codes_dift["vs_no_ids"] == paired_comparison(dift_codes, dift_none, resamples=500)
    assert codes_dift["vs_retriever"] == paired_comparison(dift_codes, stage1.astype(float), resamples=500)
    assert codes_dift["vs_no_ids"]["hits_at_1"]["p_value"] < 1e-6  # 80% vs 30% right picks
    table = comparison_markdown(rows)
    assert "Hits@1 - no IDs [95% CI] p" in table and "| codes | LM pick (DIFT rule) |" in table
    assert any("codes LM pick (DIFT rule): Hits@1 vs no IDs" in s for s in significant(rows))


def test_paired_runs_can_keep_to_the_queries_of_a_third_run(tmp_path):
    """Two runs on 60 queries set beside one on their first 20: A minus B over those 20 only, paired by id."""
    rng = np.random.default_rng(2)
    n = 60
    ids = [f"test-{i}-tail" for i in range(n)]
    stage1 = rng.integers(1, 4, n)
    picks = {name: np.where(rng.random(n) < share, stage1, 1) for name, share in (("a", 0.9), ("b", 0.2))}
    write_run(tmp_path / "a", ids, stage1, picks["a"])
    write_run(tmp_path / "b", ids[::-1], stage1[::-1], picks["b"][::-1])
    dift = {k: np.where(v == stage1, 1.0, stage1 + (v > stage1)) for k, v in picks.items()}
    assert paired_runs(tmp_path / "a", tmp_path / "b", ("dift",))["dift"] == paired_comparison(dift["a"], dift["b"])
    kept = paired_runs(tmp_path / "a", tmp_path / "b", ("dift",), queries=ids[:20] + ["test-999-head"])["dift"]
    assert kept == paired_comparison(dift["a"][:20], dift["b"][:20])
    assert kept != paired_comparison(dift["a"], dift["b"])


def test_random_ids_column_compares_codes_with_random_ids(tmp_path):
    rng = np.random.default_rng(1)
    n = 150
    ids = [f"test-{i}-tail" for i in range(n)]
    stage1 = rng.integers(1, 4, n)
    picks = {name: np.where(rng.random(n) < share, stage1, 1) for name, share in
             (("codes", 0.8), ("random", 0.5), ("none", 0.3))}
    for name, chosen in picks.items():
        write_run(tmp_path / name, ids, stage1, chosen)
    rows = comparison_rows({k: tmp_path / k for k in picks}, "none", random_ids="random", resamples=500)
    by = {(r["run"], r["ranker"]): r for r in rows}
    dift = {k: np.where(v == stage1, 1.0, stage1 + (v > stage1)) for k, v in picks.items()}
    assert by["codes", "dift"]["vs_random_ids"] == paired_comparison(dift["codes"], dift["random"], resamples=500)
    assert by["random", "dift"]["vs_random_ids"] is None and by["none", "dift"]["vs_random_ids"] is None
    assert by["random", "dift"]["vs_no_ids"] is not None
    table = comparison_markdown(rows)
    assert "Hits@1 - random IDs [95% CI] p" in table
    assert any("codes LM pick (DIFT rule): Hits@1 vs random IDs" in s for s in significant(rows))
    # Without a random-ID run the table keeps its two comparison columns.
    assert "random IDs" not in comparison_markdown(comparison_rows({k: tmp_path / k for k in ("codes", "none")},
                                                                   "none", resamples=200))


def write_scored_run(path, ids, stage1, picks, tops, valid):
    """A stage-5c artifact whose LM pick is at ``picks`` and whose re-rank puts ``tops`` first (positions in the
    3-candidate list), with ``valid``: its LM-valid metrics per ranker (as stage 5c stores them)."""
    write_run(path, ids, stage1, picks)
    rows = [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]
    for row, top in zip(rows, tops):
        row["scores"] = [0.0 if j == top - 1 else -1.0 - j for j in range(3)]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid = {key: {"hits_at_1": h, "mrr": h} for key, h in valid.items()}
    (path / "metrics.json").write_text(json.dumps({"fusion": {"weight": 1.0, "position": "interior",
                                                              "valid_rankers": valid}}))


def test_headline_chooses_rankers_and_the_codes_run_on_lm_valid_only(tmp_path):
    from kgtok.llm.compare import headline, valid_choice

    rng = np.random.default_rng(2)
    n = 300
    ids = [f"test-{i}-tail" for i in range(n)]
    stage1 = rng.integers(1, 4, n)

    def right(share):  # the gold's position in share of the queries, else position 1
        return np.where(rng.random(n) < share, stage1, 1)

    # codes: its pick is good on test but LM-valid prefers its re-rank, so the re-rank must be the one reported;
    # codes_names is better on test but worse on LM-valid, so "codes" must stay the codes run.
    specs = {"codes": (right(0.9), right(0.5), {"dift": 0.4, "rerank": 0.6}),
             "codes_names": (right(0.95), right(0.95), {"dift": 0.5, "rerank": 0.5}),
             "none": (right(0.3), right(0.2), {"dift": 0.5, "rerank": 0.4}),
             "random": (right(0.4), right(0.4), {"dift": 0.3, "rerank": 0.35})}
    for name, (picks, tops, valid) in specs.items():
        write_scored_run(tmp_path / name, ids, stage1, picks, tops, valid)
    out = headline({k: tmp_path / k for k in specs}, ["codes", "codes_names"], no_ids="none", random_ids="random",
                   resamples=500)
    assert out["codes_run"] == "codes" and out["queries"] == n
    assert out["rows"]["codes"]["own_ranker"] == "rerank" and out["rows"]["none"]["own_ranker"] == "dift"

    def ranks(name, key):
        position = specs[name][0 if key == "dift" else 1]
        return np.where(position == stage1, 1.0, stage1 + (position > stage1))

    expected = paired_comparison(ranks("codes", "rerank"), ranks("none", "dift"), resamples=500)["hits_at_1"]
    assert out["codes_vs_none_diff"] == expected["difference"] and out["codes_vs_none_p"] == expected["p_value"]
    assert out["codes_vs_none_rankers"] == ["rerank", "dift"]
    expected = paired_comparison(ranks("codes", "rerank"), ranks("random", "rerank"), resamples=500)["hits_at_1"]
    assert out["codes_vs_random_diff"] == expected["difference"]
    assert out["rows"]["codes"]["hits_at_1"] == np.mean(ranks("codes", "rerank") <= 1)
    assert out["rows"]["retriever"]["hits_at_1"] == np.mean(stage1 <= 1)
    expected = paired_comparison(ranks("codes", "rerank"), stage1.astype(float), resamples=500)["hits_at_1"]
    assert out["lm_vs_retriever_diff"] == expected["difference"] and out["lm_vs_retriever_ranker"] == "rerank"
    assert out["rows"]["codes"]["vs_retriever"] == expected
    assert out["rows"]["none"]["vs_retriever"] == paired_comparison(ranks("none", "dift"), stage1.astype(float),
                                                                    resamples=500)["hits_at_1"]
    assert "generative" not in out["rows"]["codes"] and "codes_vs_random_generative_diff" not in out
    assert out["codes_vs_random_control"] == "random"
    # A codes run whose prompts differ (e.g. codes first) is compared with its own random-ID control.
    twin = headline({k: tmp_path / k for k in specs}, ["codes", "codes_names"], no_ids="none", random_ids="random",
                    controls={"codes": "codes_names"}, resamples=500)
    assert twin["codes_vs_random_control"] == "codes_names"
    expected = paired_comparison(ranks("codes", "rerank"), ranks("codes_names", "dift"), resamples=500)["hits_at_1"]
    assert twin["codes_vs_random_diff"] == expected["difference"] and twin["codes_vs_random_rankers"] == [
        "rerank", "dift"]
    assert twin["codes_vs_none_diff"] == out["codes_vs_none_diff"]
    # The generative ranker (its own beam over every entity; None: the gold is not in it) is reported beside the
    # others, codes run against the random-ID run, where both have it.
    beams = {name: rng.choice([1.0, 2.0, 5.0, None], n, p=[share, 0.2, 0.2, 0.6 - share]).tolist()
             for name, share in (("codes", 0.5), ("codes_names", 0.1), ("random", 0.2))}
    for name, found in beams.items():
        path = tmp_path / name / "predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "generative_rank": g}) + "\n" for r, g in zip(rows, found)))
    out = headline({k: tmp_path / k for k in specs}, ["codes", "codes_names"], no_ids="none", random_ids="random",
                   resamples=500)
    generative = {k: np.array([np.inf if g is None else g for g in v]) for k, v in beams.items()}
    assert out["rows"]["codes"]["generative"] == {
        "hits_at_1": np.mean(generative["codes"] <= 1), "hits_at_3": np.mean(generative["codes"] <= 3),
        "hits_at_10": np.mean(generative["codes"] <= 10), "mrr": np.mean(1 / generative["codes"])}
    assert "generative" not in out["rows"]["none"]
    expected = paired_comparison(generative["codes"], generative["random"], resamples=500)["hits_at_1"]
    assert out["codes_vs_random_generative_diff"] == expected["difference"] and expected["difference"] > 0.2
    assert out["codes_vs_random_generative_p"] == expected["p_value"]
    (tmp_path / "none" / "metrics.json").write_text(json.dumps({"fusion": {"weight": 1.0}}))
    with np.testing.assert_raises_regex(ValueError, "no LM-valid metrics"):
        valid_choice(tmp_path / "none")


def test_headline_breaks_a_tie_of_fused_rankers_with_the_lm_own_ranker(tmp_path):
    """Fused rankers at a high weight are the retriever's order, so every GS-Quant run scores alike with them
    on LM-valid; the codes run is then the one whose own pick or re-rank is best there, not the first listed."""
    from kgtok.llm.compare import headline

    rng = np.random.default_rng(3)
    n = 60
    ids = [f"test-{i}-tail" for i in range(n)]
    stage1 = rng.integers(1, 4, n)
    specs = {"codes": {"fused_rerank": 0.9, "dift": 0.3, "rerank": 0.4},
             "codes_first": {"fused_rerank": 0.9, "dift": 0.6, "rerank": 0.2},
             "none": {"dift": 0.5, "rerank": 0.4}}
    for name, valid in specs.items():
        write_scored_run(tmp_path / name, ids, stage1, np.ones(n, int), np.ones(n, int), valid)
        path = tmp_path / name / "predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "fused_scores": [0.0 if j == s - 1 else -1.0 for j in range(3)]})
                                + "\n" for r, s in zip(rows, stage1)))
    out = headline({k: tmp_path / k for k in specs}, ["codes", "codes_first"], no_ids="none", random_ids=None,
                   resamples=200)
    assert out["rows"]["codes"]["ranker"] == out["rows"]["codes_first"]["ranker"] == "fused_rerank"
    assert out["codes_run"] == "codes_first" and out["rows"]["codes_first"]["own_ranker"] == "dift"
