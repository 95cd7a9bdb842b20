"""The kgtok command: data commands, `kgtok run` caching, fast --help."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import subprocess
import sys

from click.testing import CliRunner

from conftest import shared_dataset
from kgtok.cli import cli
from kgtok.data.synthetic import SyntheticConfig
from kgtok.embed import EmbedConfig
from kgtok.hierarchy import HierarchyConfig
from kgtok.quantize import QuantizeConfig
from kgtok.text import TextConfig
from kgtok.llm.backbone import TinyBackboneConfig
from kgtok.llm.evaluate import EvaluateConfig
from kgtok.llm.finetune import FinetuneConfig
from kgtok.llm.instruct import InstructConfig
from kgtok.pipeline import STAGE_ORDER, RunConfig, run
from kgtok.stage import ArtifactChangedWarning

FAST_EMBED = EmbedConfig(dim=16, batch_size=256, max_steps=40, eval_every=20, threads=1, top_k=5)
FAST = dict(embed=FAST_EMBED, text=TextConfig(mode="joint", threads=1), hierarchy=HierarchyConfig(levels=3, threads=1),
            quantize=QuantizeConfig(levels=3, codebook_size=16, code_dim=16, encoder_hidden=(32,), epochs=4, threads=1),
            instruct=InstructConfig(top_k=5, neighbours=2, description_words=8),
            finetune=FinetuneConfig(max_steps=3, batch_size=4, threads=1,
                                    tiny=TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=1, heads=2,
                                                            intermediate_size=64)),
            evaluate=EvaluateConfig(max_queries=8, threads=1), progress=False)


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_help_does_not_import_heavy_libraries():
    code = "import sys, kgtok.cli; heavy = {'torch', 'transformers', 'faiss', 'sklearn'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = invoke("--help")
    assert result.exit_code == 0 and "run" in result.output and "data" in result.output


def test_data_list():
    result = invoke("data", "list")
    assert result.exit_code == 0
    for name in ("wn18rr", "fb15k237", "umls", "kinship", "nations"):
        assert name in result.output
    assert "40,943" in result.output and "272,115" in result.output


def test_data_synthetic_then_info(tmp_path):
    dest = tmp_path / "synth"
    result = invoke("data", "synthetic", str(dest), "num_entities=300", "seed=3")
    assert result.exit_code == 0, result.output
    assert (dest / "train.txt").exists() and (dest / "entity_types.tsv").exists()
    result = invoke("data", "info", str(dest), "--json")
    summary = json.loads(result.output)
    assert summary["counts"]["entities"] == 300
    assert summary["has_entity_types"] is True
    assert summary["unseen_entities"] == {"valid": 0, "test": 0}
    result = invoke("data", "info", str(dest), "--relations")
    assert result.exit_code == 0 and "r00_belongs_to" in result.output


def test_bad_override_is_one_line_error(tmp_path):
    result = invoke("data", "synthetic", str(tmp_path / "x"), "num_entitys=300")
    assert result.exit_code == 2
    assert "unknown key(s) ['num_entitys']" in result.output
    result = invoke("data", "synthetic", str(tmp_path / "x"), "num_entities=5")
    assert result.exit_code == 2 and "num_entities=5" in result.output
    result = invoke("data", "fetch", "wn19", str(tmp_path / "y"))
    assert result.exit_code == 2 and "wn18rr" in result.output


def test_fb15k237_info_counts():
    result = invoke("data", "info", str(shared_dataset("fb15k237")), "--json")
    summary = json.loads(result.output)
    assert summary["counts"] == {"entities": 14541, "relations": 237, "train": 272115, "valid": 17535, "test": 20466}
    assert summary["unseen_entities"] == {"valid": 8, "test": 29}
    assert summary["text"]["entities_with_description"] == 13666


def test_run_caches_and_reruns_on_change(tmp_path):
    logs: list[str] = []
    config = RunConfig(out=str(tmp_path / "run"), synthetic=SyntheticConfig(num_entities=300), **FAST)
    results = run(config, log=logs.append)
    assert [r.name for r in results] == list(STAGE_ORDER)
    assert results[1].name == "data" and results[1].status == "ran" and results[1].metrics["entities"] == 300
    assert {r.status for r in results} == {"ran"}
    assert results[-1].metrics["retriever_hits_at_1"] >= 0 and "rerank_mrr" in results[-1].metrics
    stage_lines = [line for line in logs if not line.startswith("warning")]
    assert len(stage_lines) == len(STAGE_ORDER) and "data: ran" in stage_lines[1]  # one line each; rest in run.log
    log_file = (tmp_path / "run" / "run.log").read_text()
    assert "synthetic:" in log_file and "# EmbedConfig" in log_file  # the resolved configs
    again = run(config, log=logs.append)
    assert [r.status for r in again] == ["cached"] * len(STAGE_ORDER)
    # Another thread count computes the same things: nothing re-runs.
    from kgtok.config import _merge, config_from_dict, config_to_dict, parse_overrides

    threaded = config_from_dict(RunConfig, _merge(config_to_dict(config), parse_overrides(
        ["embed.threads=2", "quantize.threads=2", "finetune.threads=2", "evaluate.threads=2"])))
    assert [r.status for r in run(threaded, log=logs.append)] == ["cached"] * len(STAGE_ORDER)
    assert again[2].metrics == results[2].metrics and results[2].metrics["test_mrr"] > 0.05
    # A changed setting of stage 4 re-runs stage 4 and the stages after it, nothing before.
    longer_config = RunConfig(out=config.out, synthetic=config.synthetic,
                              **{**FAST, "quantize": QuantizeConfig(**{**FAST["quantize"].__dict__, "epochs": 2})})
    longer = run(longer_config, log=logs.append)
    assert [r.status for r in longer] == ["cached"] * 5 + ["ran"] * 4
    # The report is one self-contained page: every image inline, every stage's section present.
    result = invoke("report", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "run" / "report.html").read_text()
    import re

    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    for heading in ("Stage 1", "Codebook usage", "Hierarchy alignment", "The code tree", "fine-tuning",
                    "Link prediction", "Per-relation Hits@1", "each ranker against the retriever"):
        assert heading in page
    retriever = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())["retriever"]["both"]
    assert f"<td>{retriever['mrr']:.4f}</td>" in page
    if shutil.which("chromium"):  # it renders: the screenshot is not a blank page
        from kgtok.report import screenshot

        import matplotlib.image

        pixels = matplotlib.image.imread(screenshot(tmp_path / "run" / "report.html", tmp_path / "shot.png",
                                                    height=1500))
        assert pixels.shape[:2] == (1500, 1200) and pixels[..., :3].std() > 0.05
    assert longer[5].metrics["collision_rate_before"] >= 0
    # An artifact file changed by hand is noticed (size and hash in the manifest): the stage runs again.
    generated = tmp_path / "run" / "synthetic" / "test.txt"
    generated.write_text(generated.read_text() + "e00000\tr00_belongs_to\te00001\n")
    repaired = run(longer_config, until="embed", log=logs.append)
    assert any(ArtifactChangedWarning.__name__ in line and "test.txt changed" in line for line in logs)
    assert [r.status for r in repaired] == ["ran", "cached", "cached"]  # regenerated: the same KG again
    # A changed input file re-runs every later stage.
    copy = tmp_path / "kg"
    shutil.copytree(tmp_path / "run" / "synthetic", copy)
    with open(copy / "test.txt", "a") as handle:
        handle.write("e00000\tr00_belongs_to\te00001\n")
    changed = run(dataclasses.replace(longer_config, data=str(copy)), until="embed", log=logs.append)
    assert [r.status for r in changed] == ["ran", "ran"]
    assert changed[0].metrics["test"] == results[1].metrics["test"] + 1


def test_run_command_prints_table(tmp_path):
    result = invoke("run", "--out", str(tmp_path / "r"), "synthetic.num_entities=300", "progress=false",
                    "embed.dim=16", "embed.max_steps=40", "embed.eval_every=20", "embed.threads=1",
                    "text.mode=joint", "text.threads=1", "hierarchy.threads=1", "quantize.epochs=2",
                    "quantize.codebook_size=16", "quantize.threads=1", "instruct.top_k=5", "finetune.max_steps=2",
                    "finetune.threads=1", "finetune.tiny.vocab_size=400", "finetune.tiny.hidden_size=32",
                    "finetune.tiny.layers=1", "finetune.tiny.heads=2", "evaluate.max_queries=6",
                    "evaluate.threads=1")
    assert result.exit_code == 0, result.output
    assert "run.log" in result.output  # the resolved config and the stages' messages are there
    assert "synthetic:" in (tmp_path / "r" / "run.log").read_text()
    assert "data" in result.output and "ran" in result.output and "test_mrr" in result.output
    assert "LM re-rank" in result.output and "stage 1 (retriever)" in result.output


def test_embed_command(tmp_path):
    data = tmp_path / "kg"
    invoke("data", "synthetic", str(data), "num_entities=200")
    result = invoke("embed", "--data", str(data), "--out", str(tmp_path / "e"), "--model", "distmult", "--dim", "8",
                    "--no-progress", "max_steps=20", "eval_every=10", "threads=1", "export_splits=[test]")
    assert result.exit_code == 0, result.output
    assert "model: distmult" in result.output and "test MRR" in result.output
    assert (tmp_path / "e" / "candidates" / "test.npz").exists()
    result = invoke("embed", "--data", str(data), "--out", str(tmp_path / "e2"), "dim=-3")
    assert result.exit_code == 2 and "EmbedConfig.dim=-3" in result.output


def test_ablate_reuses_upstream_stages(tmp_path):
    from kgtok.pipeline import ablate

    config = RunConfig(out=str(tmp_path / "run"), synthetic=SyntheticConfig(num_entities=300), **FAST)
    logs: list[str] = []
    results = ablate(config, ("without_gsr", "without_codes"), log=logs.append)
    assert list(results) == ["full", "without_gsr", "without_codes"]
    for name in ("without_gsr", "without_codes"):
        out = tmp_path / "run" / "ablate" / name
        for stage in ("embed", "hierarchy"):  # the full run's artifacts, linked and current
            assert (out / stage).resolve() == (tmp_path / "run" / stage).resolve()
        # Stage 1-3 reused; the retriever is the same run's, so its metrics agree exactly.
        assert results[name]["retriever_mrr"] == results["full"]["retriever_mrr"]
    assert any("embed: cached" in line for line in logs) and any("hierarchy: cached" in line for line in logs)
    no_gsr = json.loads((tmp_path / "run" / "ablate" / "without_gsr" / "quantize" / "manifest.json").read_text())
    assert no_gsr["config"]["gsr"]["enabled"] is False
    record = json.loads((tmp_path / "run" / "ablate" / "without_codes" / "instruct" / "test.jsonl")
                        .read_text().splitlines()[0])
    assert "<ent>" not in record["prompt"]
    # Without codes stage 4 is unchanged: its artifact is the full run's, not a retrained one.
    assert (tmp_path / "run" / "ablate" / "without_codes" / "quantize").resolve() == (tmp_path / "run" / "quantize")
    assert not (tmp_path / "run" / "ablate" / "without_gsr" / "quantize").is_symlink()


def test_run_until_stops_after_the_named_stage(tmp_path):
    config = RunConfig(out=str(tmp_path / "run"), synthetic=SyntheticConfig(num_entities=200), **FAST)
    results = run(config, until="embed", log=lambda *_: None)
    assert [r.name for r in results] == ["synthetic", "data", "embed"] and not (tmp_path / "run" / "text").exists()
    with pytest.raises(ValueError, match="until='nothing'"):
        run(config, until="nothing", log=lambda *_: None)
    # with data= the synthetic stage is not run: until=synthetic ran the whole pipeline
    with pytest.raises(ValueError, match="until='synthetic': expected one of this run's stages, data, embed"):
        run(dataclasses.replace(config, data=str(tmp_path / "run" / "synthetic")), until="synthetic",
            log=lambda *_: None)


def test_report_code_tree_lists_the_largest_prefixes_with_members():
    import numpy as np

    from kgtok.report import code_tree

    codes = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 0], [1, 0, 0]])
    tree = code_tree(codes, ["dog", "cat", "owl", "oak"], branches=1, depth=2)
    # Level 1: <a_0> holds 3 entities (the largest); level 2 under it: <a_0><b_1> holds dog and cat.
    assert tree == ("<ul><li><code>&lt;a_0&gt;</code> (3): dog, cat, owl<ul><li><code>&lt;a_0&gt;&lt;b_1&gt;</code> "
                    "(2): dog, cat</li></ul></li></ul>")


def test_run_takes_the_users_classes_and_negatives_files(tmp_path):
    """classes=FILE feeds ReaLM's class prefix (and the class constraint), negatives=FILE the classification test."""
    from kgtok.data import load_kg

    config = RunConfig(out=str(tmp_path / "run"), synthetic=SyntheticConfig(num_entities=300), **FAST)
    run(config, until="data", log=lambda *_: None)
    kg = load_kg(tmp_path / "run" / "synthetic")
    classes = tmp_path / "classes.tsv"
    classes.write_text("".join(f"{name}\t{'odd' if i % 2 else 'even'}\n" for i, name in enumerate(kg.entity_names)))
    missing = invoke("run", "--out", str(tmp_path / "run"), f"classes={tmp_path / 'nowhere.tsv'}",
                     "instruct.class_prefix=true")
    assert missing.exit_code == 2 and f"classes={tmp_path / 'nowhere.tsv'}: no such file" in missing.output
    prefixed = dataclasses.replace(config, classes=str(classes),
                                   instruct=dataclasses.replace(FAST["instruct"], class_prefix=True))
    assert prefixed.wired("instruct")["classes"] == prefixed.wired("evaluate")["classes"] == classes
    run(prefixed, until="instruct", log=lambda *_: None)
    records = [json.loads(line) for split in ("lm_train", "test")
               for line in (tmp_path / "run" / "instruct" / f"{split}.jsonl").read_text().splitlines()]
    assert records and all(r["gold_class"] == r["gold"] % 2 for r in records)  # even: class 0, odd: class 1
    assert all(r["answer"].startswith(f"<cls_{r['gold'] % 2}> ") for r in records)
    # Without the file, class_prefix keeps its fallback: the hierarchy's level-1 clusters.
    fallback = dataclasses.replace(prefixed, classes=None)
    assert fallback.wired("instruct")["classes"] == tmp_path / "run" / "hierarchy"

    rng = np.random.default_rng(0)
    known = {tuple(t) for t in kg.all_triples.tolist()}
    given = [(h, r, int(t)) for h, r, _ in kg.test.numpy()[:6].tolist()
             for t in rng.permutation(kg.num_entities)[:1] if (h, r, int(t)) not in known]
    negatives = tmp_path / "negatives.tsv"
    negatives.write_text("".join(f"{kg.entity_names[h]}\t{kg.relation_names[r]}\t{kg.entity_names[t]}\n"
                                 for h, r, t in given))
    classification = dataclasses.replace(config, negatives=str(negatives),
                                         instruct=dataclasses.replace(FAST["instruct"], task="classification"))
    results = run(classification, until="instruct", log=lambda *_: None)
    assert [r.status for r in results][-2:] == ["cached", "ran"]
    test = [json.loads(line) for line in (tmp_path / "run" / "instruct" / "test.jsonl").read_text().splitlines()]
    named = {(kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]) for h, r, t in given}
    assert sorted(tuple(r["triple"]) for r in test if not r["label"]) == sorted(named)


@pytest.mark.parametrize("out", ["runs/exp #2", "2024-01-05", "12345"])
def test_run_paths_are_taken_as_typed_not_as_yaml(out):
    """--out "exp #2" wrote to "exp" (# starts a YAML comment); 2024-01-05 and 12345 were refused as a date and a
    number."""
    from kgtok.cli import _run_config

    assert _run_config(None, None, out, ()).out == out


def test_run_refuses_an_out_that_is_not_a_run_folder(tmp_path):
    """kgtok run --out KG wrote run.log, run_config.json and data/ into the KG folder (exit 0)."""
    kg = tmp_path / "kg"
    result = invoke("data", "synthetic", str(kg), "num_entities=200")
    assert result.exit_code == 0, result.output
    before = sorted(p.name for p in kg.iterdir())
    result = invoke("run", "--data", str(kg), "--out", str(kg), "--until", "data")
    assert result.exit_code == 2 and "has no run_config.json, so it is not a kgtok run folder" in result.output
    assert sorted(p.name for p in kg.iterdir()) == before
    project = tmp_path / "project"  # a folder holding the KG as data/: named like a stage, but no artifact
    shutil.copytree(kg, project / "data")
    result = invoke("run", "--data", str(project / "data"), "--out", str(project), "--until", "data")
    assert result.exit_code == 2 and "not a kgtok run folder" in result.output
    assert sorted(p.name for p in project.iterdir()) == ["data"]


def test_falsy_shortcut_values_are_checked_not_dropped(tmp_path):
    """--dim 0 trained at the default dim (the 0 was dropped as falsy); --only '' ran every ablation."""
    assert invoke("data", "synthetic", str(tmp_path / "kg"), "num_entities=200").exit_code == 0
    result = invoke("embed", "--data", str(tmp_path / "kg"), "--out", str(tmp_path / "e"), "--dim", "0")
    assert result.exit_code == 2 and "EmbedConfig.dim=0" in result.output, result.output
    result = invoke("ablate", "--out", str(tmp_path / "r"), "--only", "")
    assert result.exit_code == 2 and "--only: no ablation named" in result.output, result.output


def test_run_refuses_a_missing_backbone_before_stage_1(tmp_path):
    """finetune.backbone=/no/such/model ran data, embed, ... instruct (an hour on WN18RR) before the error."""
    result = invoke("run", "--out", str(tmp_path / "run"), "finetune.backbone=" + str(tmp_path / "no-model"))
    assert result.exit_code == 2 and "no-model" in result.output and "expected tiny" in result.output, result.output
    assert not (tmp_path / "run").exists()
    # a run that stops before fine-tuning is not refused for it
    result = invoke("run", "--out", str(tmp_path / "run"), "--until", "synthetic", "synthetic.num_entities=200",
                    "finetune.backbone=" + str(tmp_path / "no-model"))
    assert result.exit_code == 0, result.output


def test_run_threads_sets_every_stage_and_seed_still_applies():
    """kgtok run threads=1 was an unknown key: six overrides (embed.threads=1 ...) were needed."""
    from kgtok.cli import _run_config
    from kgtok.pipeline import STAGE_ORDER

    config = _run_config(None, None, "runs/x", ("threads=1", "seed=3", "embed.threads=2"))
    for name in STAGE_ORDER:
        stage = config.stage_config(name)
        if hasattr(stage, "threads"):
            assert stage.threads == 1, name
        if hasattr(stage, "seed"):
            assert stage.seed == 3, name
    assert _run_config(None, None, "runs/x", ()).stage_config("embed").threads == 0  # unset: each stage's own
