"""Every registered stage keeps the stage contract (kgtok.stage): one parametrised test per promise.

A small run of the whole pipeline is made once; each stage is then checked
against it: its declared inputs come from earlier stages, its config
round-trips through YAML, a second run is a cache hit, and a run killed at
the end of its work leaves no artifact, keeps its work folder, and when
started again finishes with the artifact an uninterrupted run wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from test_cli import FAST

from kgtok.artifacts import read_manifest
from kgtok.config import MACHINE, config_from_dict, config_to_dict, fields_with_effect
from kgtok.data.synthetic import SyntheticConfig
from kgtok.pipeline import STAGE_ORDER, STAGES, RunConfig, run
from kgtok.stage import ArtifactChangedWarning, Context, run_stage, work_dir


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> RunConfig:
    config = RunConfig(out=str(tmp_path_factory.mktemp("contract") / "run"), synthetic=SyntheticConfig(num_entities=300),
                       **FAST)
    run(config, log=lambda *_: None)
    return config


def stage_call(config: RunConfig, name: str, dest: Path, **kwargs):
    return run_stage(STAGES[name], config.stage_config(name), dest, inputs=config.wired(name),
                     ctx=Context(log=lambda *_: None, progress=False, kg_dir=config.kg_dir()), **kwargs)


def data_files(dest: Path) -> dict[str, str]:
    """Content hashes of an artifact's data files (the JSON records hold wall times too)."""
    return {name: record["hash"] for name, record in read_manifest(dest)["files"].items()
            if not name.endswith(".json")}


def test_registry_is_in_order_and_inputs_come_from_earlier_stages():
    assert STAGE_ORDER[:2] == ("synthetic", "data") and STAGE_ORDER[-1] == "evaluate"
    for position, name in enumerate(STAGE_ORDER):
        stage = STAGES[name]
        assert stage.name == name
        for spec in stage.inputs:
            if spec.stage is not None:
                assert spec.stage in STAGE_ORDER[:position], (name, spec.name)
            if spec.layout is not None and spec.stage is not None:
                assert spec.layout.stage == spec.stage
        assert set(stage.needed_inputs(stage.config())) <= {i.name for i in stage.inputs}


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_config_round_trips_through_yaml(name):
    config = STAGES[name].config()
    text = yaml.safe_dump(config_to_dict(config))
    assert config_from_dict(STAGES[name].config, yaml.safe_load(text)) == config


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_second_run_is_a_cache_hit(small_run, name):
    dest = Path(small_run.out) / name
    before = read_manifest(dest)
    result = stage_call(small_run, name, dest)
    assert result.status == "cached" and read_manifest(dest) == before


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_killed_run_resumes_to_the_same_artifact(small_run, name, tmp_path, monkeypatch):
    reference = Path(small_run.out) / name
    dest = tmp_path / name
    stage = STAGES[name]
    seen: dict[str, list[str]] = {}

    def killed_at_the_end(config, inputs, out, ctx):
        stage.run(config, inputs, out, ctx)
        seen["work"] = sorted(str(p.relative_to(ctx.work)) for p in ctx.work.rglob("*"))
        raise KeyboardInterrupt  # as a kill after the work is done, before the artifact is in place

    monkeypatch.setitem(STAGES, name, dataclasses.replace(stage, run=killed_at_the_end))
    with pytest.raises(KeyboardInterrupt):
        stage_call(small_run, name, dest)
    # the work folder stays when it holds something to resume from; with its record alone it goes too
    kept = [f"{name}.work"] if set(seen["work"]) - {"record.json"} else []
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == kept
    monkeypatch.setitem(STAGES, name, stage)

    def resumed(config, inputs, out, ctx):
        found = sorted(str(p.relative_to(ctx.work)) for p in ctx.work.rglob("*"))
        assert set(seen["work"]) <= set(found)  # what the killed run saved is there to resume from
        return stage.run(config, inputs, out, ctx)

    monkeypatch.setitem(STAGES, name, dataclasses.replace(stage, run=resumed))
    assert stage_call(small_run, name, dest).status == "ran"
    assert not work_dir(dest).exists()
    assert data_files(dest) == data_files(reference)
    if name == "finetune":  # resumed at its final checkpoint, the Trainer skipped LM-valid and took a step too many
        same = ("steps", "train_loss", "valid_loss", "valid_code_token_loss")
        assert {k: read_manifest(dest)["metrics"].get(k) for k in same} == \
            {k: read_manifest(reference)["metrics"].get(k) for k in same}


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_threads_is_a_machine_field_everywhere(name):
    if "threads" in config_to_dict(STAGES[name].config()):
        assert "threads" in fields_with_effect(STAGES[name].config, MACHINE)


def test_a_kg_built_in_memory_is_hashed_by_its_content(tmp_path):
    """A KnowledgeGraph with no directory: another graph into the same destination runs the stage again (it was
    reused: nothing but the config was hashed)."""
    import numpy as np

    from kgtok.data.graph import KnowledgeGraph
    from kgtok.data.stage import DATA as STAGE, DataConfig

    triples = np.array([[0, 0, 1], [1, 0, 2], [2, 0, 0]])

    def graph(extra: int) -> KnowledgeGraph:
        train = np.concatenate([triples, np.array([[0, 0, 2]] * extra).reshape(-1, 3)])
        return KnowledgeGraph.from_arrays(entity_names=["a", "b", "c"], relation_names=["r"], train=train,
                                          valid=triples[:1], test=triples[1:2])

    first = run_stage(STAGE, DataConfig(), tmp_path / "data", data=graph(0), progress=False, log=lambda *_: None)
    again = run_stage(STAGE, DataConfig(), tmp_path / "data", data=graph(0), progress=False, log=lambda *_: None)
    other = run_stage(STAGE, DataConfig(), tmp_path / "data", data=graph(1), progress=False, log=lambda *_: None)
    assert (first.status, again.status, other.status) == ("ran", "cached", "ran")
    assert other.metrics["train"] == 4
    # loaded from a directory, then changed in memory: hashed by what it holds, not by the files
    from kgtok.data import load_kg
    from kgtok.data.synthetic import write_synthetic

    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=200), tmp_path / "kg"))
    run_stage(STAGE, DataConfig(), tmp_path / "d2", data=kg, progress=False, log=lambda *_: None)
    kg.triples["train"] = kg.triples["train"][:100]
    cut = run_stage(STAGE, DataConfig(), tmp_path / "d2", data=kg, progress=False, log=lambda *_: None)
    assert cut.status == "ran" and cut.metrics["train"] == 100


def test_evaluate_counts_the_kg_as_an_input_when_it_reads_it(tmp_path):
    """With a classes file (entity names) or the generative ranker (its filter) evaluation reads the KG: another
    KG must run it again (it was reused, the KG never hashed); otherwise the KG is no input of it."""
    from kgtok.data.synthetic import write_synthetic
    from kgtok.llm.config import EvaluateConfig
    from kgtok.llm.evaluate import STAGE as EVALUATE
    from kgtok.stage import input_record

    kg_dir = write_synthetic(SyntheticConfig(num_entities=200), tmp_path / "kg")
    for config, reads in ((EvaluateConfig(), False), (EvaluateConfig(class_constraint=True), True),
                          (EvaluateConfig(generative_beams=4), True)):
        record = input_record(EVALUATE.hashes_kg(config), {}, kg_dir, {})
        assert any(key.startswith("kg/") for key in record) == reads, config


def test_out_that_would_replace_an_input_or_another_stage_is_refused_before_any_work(small_run, tmp_path):
    """instruct --out EMBED replaced the stage-1 artifact it read (exit 0); an --out holding another stage's
    artifact was replaced as well; a refused --out left <out>.work behind."""
    import shutil

    wired = small_run.wired("instruct")
    embeddings = tmp_path / "embed"
    shutil.copytree(wired["embeddings"], embeddings)
    before = read_manifest(embeddings)
    with pytest.raises(FileExistsError, match="is \\(or holds\\) the embeddings input"):
        run_stage(STAGES["instruct"], small_run.stage_config("instruct"), embeddings,
                  inputs={**wired, "embeddings": embeddings},
                  ctx=Context(log=lambda *_: None, progress=False, kg_dir=small_run.kg_dir()))
    assert read_manifest(embeddings) == before
    other = tmp_path / "codes"
    shutil.copytree(small_run.wired("finetune")["codes"], other)
    with pytest.raises(FileExistsError, match="holds a quantize artifact, which a instruct artifact would replace"):
        stage_call(small_run, "instruct", other)
    assert read_manifest(other)["stage"] == "quantize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "embed"]  # no .work, no temporary folder


def test_damaged_input_file_is_named_before_the_stage_reads_it(small_run, tmp_path):
    import shutil

    wired = small_run.wired("instruct")
    embeddings = tmp_path / "embed"
    shutil.copytree(wired["embeddings"], embeddings)
    (embeddings / "candidates" / "test.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(ArtifactChangedWarning, match="candidates/test.npz missing or not as its manifest records"), \
            pytest.raises(Exception):  # then numpy's own error (BadZipFile), the file already named
        run_stage(STAGES["instruct"], small_run.stage_config("instruct"), tmp_path / "out",
                  inputs={**wired, "embeddings": embeddings},
                  ctx=Context(log=lambda *_: None, progress=False, kg_dir=small_run.kg_dir()))
    (tmp_path / "manifest-list").mkdir()
    (tmp_path / "manifest-list" / "manifest.json").write_text("[1]")
    assert read_manifest(tmp_path / "manifest-list") is None  # a JSON list is no manifest (was AttributeError)


def test_a_stage_leaves_its_callers_random_streams_alone(small_run, tmp_path):
    """run_finetune reseeded Python's, numpy's and torch's global generators (the Trainer's set_seed): a
    script's draws after it were the same whatever seed the script had set."""
    import random

    import numpy as np
    import torch

    def seeded_draws(seed: int, stage: bool) -> tuple[float, float, float]:
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        if stage:
            stage_call(small_run, "finetune", tmp_path / f"ft{seed}", reuse=False)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert seeded_draws(1, True) == seeded_draws(1, False)
    assert seeded_draws(2, True) == seeded_draws(2, False) != seeded_draws(1, False)


def test_a_wrong_config_a_file_as_dest_and_a_missing_kg_are_refused_before_any_write(small_run, tmp_path):
    """Another stage's config failed deep inside (AttributeError); a file as dest was moved aside to a hidden
    name and left there; kgtok run with a missing data folder wrote run.log and run_config.json first."""
    from kgtok.embed.config import EmbedConfig

    with pytest.raises(TypeError, match="finetune: config is a EmbedConfig, expected a FinetuneConfig"):
        run_stage(STAGES["finetune"], EmbedConfig(), tmp_path / "ft", inputs=small_run.wired("finetune"),
                  ctx=Context(log=lambda *_: None, progress=False))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt: is a file, not a folder"):
        stage_call(small_run, "instruct", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="--data .*missing-kg: "):
        run(dataclasses.replace(small_run, data=str(tmp_path / "missing-kg"), out=str(tmp_path / "run")),
            log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_finished_runs_leftover_work_folder_is_removed_not_reused(small_run, tmp_path):
    """A kill between the artifact's rename and the work folder's removal left <out>.work for ever: the cache
    hit kept it, and --force resumed from it (finetune at its final checkpoint). The work of another run (a
    resumable field changed, killed) stays: it is still to be resumed."""
    dest = tmp_path / "embed"
    assert stage_call(small_run, "embed", dest).status == "ran"
    manifest = read_manifest(dest)
    work = work_dir(dest)

    def leave(config: dict) -> None:
        work.mkdir()
        (work / "record.json").write_text(json.dumps({"stage": "embed", "config": config,
                                                      "inputs": manifest["inputs"]}))
        (work / "last.pt").write_bytes(b"x")

    leave(manifest["config"])
    assert stage_call(small_run, "embed", dest).status == "cached"
    assert not work.exists()
    leave({**manifest["config"], "max_steps": manifest["config"]["max_steps"] + 100})  # a longer run, killed
    assert stage_call(small_run, "embed", dest).status == "cached"
    assert (work / "last.pt").exists()
    shutil.rmtree(work)
    leave(manifest["config"])
    assert stage_call(small_run, "embed", dest, reuse=False).status == "ran"
    assert not work.exists()


def test_a_resumed_evaluation_counts_every_querys_prompt(small_run, tmp_path, monkeypatch):
    """prompts_trimmed counted the queries the last process scored (0 when a killed run had scored them all),
    and queries_per_second was 0.0 then."""
    stage = STAGES["evaluate"]
    config = dataclasses.replace(small_run.stage_config("evaluate"), max_prompt_tokens=40)

    def call(dest: Path):
        return run_stage(stage, config, dest, inputs=small_run.wired("evaluate"),
                         ctx=Context(log=lambda *_: None, progress=False, kg_dir=small_run.kg_dir()))

    whole = read_manifest(call(tmp_path / "whole").path)["metrics"]
    assert whole["prompts_trimmed"] + whole["prompts_over"] > 0

    def killed_at_the_end(*args):
        stage.run(*args)
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "evaluate", dataclasses.replace(stage, run=killed_at_the_end))
    with pytest.raises(KeyboardInterrupt):
        run_stage(STAGES["evaluate"], config, tmp_path / "resumed", inputs=small_run.wired("evaluate"),
                  ctx=Context(log=lambda *_: None, progress=False, kg_dir=small_run.kg_dir()))
    monkeypatch.setitem(STAGES, "evaluate", stage)
    resumed = read_manifest(call(tmp_path / "resumed").path)["metrics"]
    assert resumed["resumed_queries"] == resumed["queries"] == whole["queries"]
    assert (resumed["prompts_trimmed"], resumed["prompts_over"]) == (whole["prompts_trimmed"], whole["prompts_over"])
    assert math.isnan(resumed["queries_per_second"])


def test_an_interrupted_run_says_where_it_stopped_in_its_log(small_run, tmp_path, monkeypatch):
    """Ctrl-C during kgtok run left no line in run.log (the console said only 'Aborted!')."""
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "synthetic", dataclasses.replace(STAGES["synthetic"], run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(small_run, out=str(tmp_path / "run")), log=lambda *_: None)
    assert (tmp_path / "run" / "run.log").read_text().splitlines()[-1] == "synthetic: stopped (KeyboardInterrupt)"


def test_the_python_stage_functions_take_force(small_run, tmp_path):
    """The CLI's --force had no Python counterpart: a current artifact could only be reused."""
    from kgtok.embed import run_embed

    config = small_run.stage_config("embed")
    dest = run_embed(config, small_run.kg_dir(), tmp_path / "embed", progress=False, log=lambda *_: None)
    timings = read_manifest(dest)["timings"]  # wall times: a run again writes others
    run_embed(config, small_run.kg_dir(), dest, progress=False, log=lambda *_: None)
    assert read_manifest(dest)["timings"] == timings  # reused
    run_embed(config, small_run.kg_dir(), dest, progress=False, log=lambda *_: None, force=True)
    assert read_manifest(dest)["timings"] != timings
