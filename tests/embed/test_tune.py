"""`kgtok embed --tune`: the search starts from the given config, chooses on validation, writes its choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kgtok.cli import cli
from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig
from kgtok.embed.train import train_model
from kgtok.embed.tune import TuneConfig, trial_config, tune

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def kg_dir(tmp_path_factory) -> Path:
    return write_synthetic(SyntheticConfig(num_entities=200, seed=2), tmp_path_factory.mktemp("kg") / "synthetic")


def quiet(*_):
    pass


def test_on_validate_true_ends_training_at_that_validation(kg_dir, tmp_path):
    kg = load_kg(kg_dir)
    config = EmbedConfig(dim=8, batch_size=256, max_steps=100, eval_every=10, threads=1)
    calls = []
    _, state = train_model(kg, config, tmp_path, progress=False, log=quiet,
                           on_validate=lambda s: calls.append(s.step) or len(calls) == 2)
    assert calls == [10, 20] and state.step == 20 and len(state.history) == 2


def test_trial_schedule_validates_once_per_epoch(kg_dir):
    kg = load_kg(kg_dir)
    params = {"dim": 50, "batch_size": 100, "regularizer_weight": 0.01, "lr": 0.1}
    config = trial_config(EmbedConfig(model="rotate"), params, kg, TuneConfig(trial_epochs=5, patience=2))
    epoch = -(-2 * len(kg.train) // 100)
    assert (config.model, config.resolved_loss, config.eval_every, config.max_steps, config.patience) == (
        "complex", "1vsall", 0, 5 * epoch, 2)  # eval_every 0: once per epoch
    # a given config with sampled negatives' settings still gives valid 1-vs-all trials (each trial raised)
    sampled = EmbedConfig(model="rotate", shared_negatives=True, sparse=True)
    assert not trial_config(sampled, params, kg, TuneConfig()).shared_negatives


def test_tune_tries_the_given_config_first_and_never_chooses_worse(kg_dir, monkeypatch):
    import torch

    import kgtok.embed.train as training

    kg = load_kg(kg_dir)
    base = EmbedConfig(dim=50, batch_size=250, regularizer_weight=0.01, lr=0.1, threads=1, seed=3)
    seen, train, before = [], training.train_model, torch.get_num_threads()

    def counting_threads(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", counting_threads)
    torch.set_num_threads(2)
    try:
        result = tune(kg, base, TuneConfig(budget=600, trial_epochs=4, max_trials=3), log=quiet)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]  # the given threads=1 in every trial (the process's 2 were used)
    first = result.trials[0]
    assert (first["dim"], first["batch_size"], first["regularizer_weight"], first["lr"]) == (50, 250, 0.01, 0.1)
    assert len(result.trials) == 3
    finished = [t["valid_mrr"] for t in result.trials if t["state"] == "complete"]
    assert result.chosen_valid_mrr == max(finished) >= result.given_valid_mrr == first["valid_mrr"]
    # Only the searched fields change; the rest of the given config is kept.
    assert result.chosen.seed == 3 and result.chosen.threads == 1 and result.chosen.dim in (50, 100, 200, 400)


def test_cli_tune_writes_the_chosen_config_and_trains_it(kg_dir, tmp_path):
    out = tmp_path / "embed"
    result = CliRunner().invoke(cli, ["embed", "--data", str(kg_dir), "--out", str(out), "--tune", "1",
                                      "--no-progress", "threads=1", "max_steps=30", "eval_every=10", "top_k=5"])
    assert result.exit_code == 0, result.output
    chosen = yaml.safe_load((tmp_path / "embed.tune.yaml").read_text())
    record = json.loads((tmp_path / "embed.tune.json").read_text())
    assert record["chosen"] == chosen and record["chosen_on"].startswith("valid")
    assert (chosen["max_steps"], chosen["eval_every"]) == (30, 10)  # the user's schedule stays for the final run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dim"] == chosen["dim"] and manifest["config"]["lr"] == chosen["lr"]
    # the same search again is not made again: its choice is reused and the artifact is current
    again = CliRunner().invoke(cli, ["embed", "--data", str(kg_dir), "--out", str(out), "--tune", "1",
                                     "--no-progress", "threads=1", "max_steps=30", "eval_every=10", "top_k=5"])
    assert again.exit_code == 0 and "the same search was made before" in again.output and "cached" in again.output
    assert json.loads((tmp_path / "embed.tune.json").read_text())["trials"] == record["trials"]
    other = CliRunner().invoke(cli, ["embed", "--data", str(kg_dir), "--out", str(out), "--tune", "1",
                                     "--no-progress", "threads=1", "max_steps=20", "eval_every=10", "top_k=5"])
    assert other.exit_code == 0 and "the same search was made before" not in other.output
    # a choice file that is not the one its record names (a search killed between the two writes): search again
    (tmp_path / "embed.tune.yaml").write_text("dim: 8\n")
    again = CliRunner().invoke(cli, ["embed", "--data", str(kg_dir), "--out", str(out), "--tune", "1",
                                     "--no-progress", "threads=1", "max_steps=20", "eval_every=10", "top_k=5"])
    assert again.exit_code == 0 and "the same search was made before" not in again.output


def test_a_killed_search_goes_on_from_its_finished_trials(kg_dir, tmp_path, monkeypatch):
    import kgtok.embed.train as training

    kg = load_kg(kg_dir)
    base = EmbedConfig(dim=50, batch_size=250, regularizer_weight=0.01, lr=0.1, threads=1, seed=3)
    search = TuneConfig(budget=600, trial_epochs=3, max_trials=3)
    storage = tmp_path / "search.db"
    train, calls = training.train_model, []

    def killed_in_the_second_trial(*args, **kwargs):
        calls.append((args[1].dim, args[1].lr))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or the machine going away
        return train(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", killed_in_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        tune(kg, base, search, log=quiet, storage=storage)
    said: list[str] = []
    monkeypatch.setattr(training, "train_model", lambda *a, **k: calls.append((a[1].dim, a[1].lr)) or train(*a, **k))
    result = tune(kg, base, search, log=said.append, storage=storage)
    assert len(calls) == 4  # the given config's trial is not trained again: 1 + (killed) 1 + 2 more
    assert calls[0] == (50, 0.1) and (50, 0.1) not in calls[1:]
    assert any(line.startswith("tune: resuming the search") and "trials made 1," in line for line in said)
    assert len(result.trials) == 3 and result.trials[0]["dim"] == 50  # the killed trial is not a result
    assert result.given_valid_mrr == result.trials[0]["valid_mrr"]
    again = tune(kg, base, search, log=quiet, storage=storage)  # all made: nothing runs, the same choice
    assert len(calls) == 4 and again.chosen == result.chosen and again.trials == result.trials


def test_cli_keeps_a_killed_searchs_trials_and_removes_them_once_done(kg_dir, tmp_path, monkeypatch):
    import kgtok.embed.tune as tuning

    out, seen = tmp_path / "embed", []
    search = tuning.tune

    def dying(*args, **kwargs):
        seen.append(kwargs["storage"])
        kwargs["storage"].write_text("")  # as Optuna would have created it
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "tune", dying)
    args = ["embed", "--data", str(kg_dir), "--out", str(out), "--tune", "1", "--no-progress", "threads=1",
            "max_steps=20", "eval_every=10", "top_k=5"]
    CliRunner().invoke(cli, args)
    assert seen[0].exists() and seen[0].name.startswith("embed.tune-") and seen[0].suffix == ".db"
    stale = tmp_path / "embed.tune-000000000000.db"  # another search's (other settings): not read, removed
    stale.write_text("")
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: seen.append(k["storage"]) or search(*a, **k))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen[1] == seen[0] and not seen[0].exists() and not stale.exists()
