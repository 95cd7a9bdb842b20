"""``kgtok embed --tune``: a small search of stage 1's settings on validation MRR, within a time budget.

Defaults that suit one graph can be far off on another (a new 2k-entity graph
got test MRR 0.406 with the defaults where a tuned ComplEx gets 0.465), so a
user with a new graph gets a search instead of a preset. Optuna (TPE sampler,
successive-halving pruning on the validation MRR of each epoch) does the
search; trial 0 is the given config, so the search never returns a config that
validates worse than it. Only validation triples are read: test stays unseen.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kgtok.config import check_fields, in_range
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.config import EmbedConfig
from kgtok.runtime import torch_threads

# The searched space: ComplEx-N3 trained 1-vs-all (the default family: fastest to a good MRR on a CPU).
DIMS = (50, 100, 200, 400)
BATCH_SIZES = (100, 250, 500, 1000)
REGULARIZER = (1e-3, 0.5)  # N3 weight, log-uniform
LEARNING_RATE = (0.01, 1.0)  # Adagrad, log-uniform


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """The search of ``kgtok embed --tune`` (its budget is the command's argument)."""

    budget: float = 600.0  # seconds of search; a trial still running at the end stops at its next validation
    trial_epochs: float = 40.0  # longest trial, in epochs (each epoch ends with a validation)
    patience: int = 3  # validations without improvement before a trial stops
    max_trials: int = 0  # 0: as many as the budget allows
    seed: int = 0  # sampler seed

    def __post_init__(self) -> None:
        check_fields(self, [
            ("budget", in_range(0.0, low_open=True), "> 0 seconds"),
            ("trial_epochs", in_range(0.0, low_open=True), "> 0"),
            ("patience", in_range(1), ">= 1"),
            ("max_trials", in_range(0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
        ])


@dataclass
class TuneResult:
    """The chosen config and every trial (params, state, best validation MRR, validations, seconds)."""

    chosen: EmbedConfig
    chosen_valid_mrr: float
    given_valid_mrr: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        from kgtok.config import config_to_dict

        return {"chosen": config_to_dict(self.chosen), "chosen_valid_mrr": self.chosen_valid_mrr,
                "given_valid_mrr": self.given_valid_mrr, "chosen_on": "valid MRR (filtered)",
                "seconds": round(self.seconds, 1), "trials": self.trials}


# The family searched: ComplEx-N3, 1-vs-all on reciprocal relations, Adagrad (sampled negatives' settings off,
# else a given RotatE config with shared_negatives=true made every trial invalid).
SEARCHED = {"model": "complex", "loss": "1vsall", "reciprocal": None, "optimizer": "adagrad",
            "shared_negatives": False, "sparse": None}


def _space(trial: Any) -> dict[str, Any]:
    return {
        "dim": trial.suggest_categorical("dim", DIMS),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
        "regularizer_weight": trial.suggest_float("regularizer_weight", *REGULARIZER, log=True),
        "lr": trial.suggest_float("lr", *LEARNING_RATE, log=True),
    }


def trial_config(base: EmbedConfig, params: dict[str, Any], kg: KnowledgeGraph, tune: TuneConfig) -> EmbedConfig:
    """``base`` with ``params``, validated once per epoch for at most ``trial_epochs`` epochs."""
    config = replace(base, **SEARCHED, **params)
    examples = 2 * len(kg.train)  # reciprocal relations: a query per side
    epoch = max(1, math.ceil(examples / config.batch_size))
    return replace(config, eval_every=0, max_steps=max(epoch, int(tune.trial_epochs * epoch)),
                   patience=tune.patience)


def _given(base: EmbedConfig) -> dict[str, Any] | None:
    """The given config's point in the searched space, or None when it lies outside (another model, say).

    ``base`` has its N3 weight resolved for the graph (:meth:`EmbedConfig.resolved_for`)."""
    point = {"dim": base.dim, "batch_size": base.batch_size, "regularizer_weight": base.regularizer_weight,
             "lr": base.resolved_lr}
    inside = (base.model == "complex" and base.resolved_loss == "1vsall" and base.resolved_optimizer == "adagrad"
              and base.dim in DIMS and base.batch_size in BATCH_SIZES
              and REGULARIZER[0] <= point["regularizer_weight"] <= REGULARIZER[1]
              and LEARNING_RATE[0] <= point["lr"] <= LEARNING_RATE[1])
    return point if inside else None


def _trial(trial: Any, kg: KnowledgeGraph, base: EmbedConfig, config: TuneConfig, deadline: float,
           row: dict[str, Any], log: Callable[[str], None]) -> float:
    """Train one trial, reporting each epoch's validation MRR for pruning; fills ``row``, returns its best MRR."""
    import optuna

    from kgtok.embed.train import train_model

    params = _space(trial)
    row.update(trial=trial.number, **params)
    schedule = trial_config(base, params, kg, config)
    seen: list[float] = []

    def on_validate(state: Any) -> bool:
        seen.append(state.history[-1]["valid_mrr"])
        trial.report(seen[-1], len(seen))
        if trial.should_prune():
            raise optuna.TrialPruned()
        return time.monotonic() > deadline

    try:
        with tempfile.TemporaryDirectory(prefix="kgtok-tune-") as work:
            _, state = train_model(kg, schedule, Path(work), progress=False, on_validate=on_validate,
                                   log=lambda *_: None)
    except optuna.TrialPruned:
        row.update(state="pruned", valid_mrr=max(seen), validations=len(seen))
        log(f"tune: trial {trial.number}  pruned after {len(seen)} validations (best {max(seen):.4f})  {params}")
        raise
    cut = state.step < schedule.max_steps and state.bad_evaluations < schedule.patience  # stopped by the budget
    row.update(state="cut by budget" if cut else "complete", valid_mrr=state.best_mrr,
               validations=len(state.history), best_step=state.best_step)
    log(f"tune: trial {trial.number}  valid MRR {state.best_mrr:.4f}  {params}")
    return state.best_mrr


def _study(optuna: Any, config: TuneConfig, storage: Path | None, log: Callable[[str], None]) -> tuple[Any, float]:
    """The Optuna study, new or (with ``storage``, an SQLite file) the one a killed search left there, and the
    seconds that search already spent; trials it left running are marked failed (they are not finished)."""
    sampler = optuna.samplers.TPESampler(seed=config.seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    if storage is None:
        return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner), 0.0
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name="kgtok-tune",
                                storage=f"sqlite:///{storage}", load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    spent = float(study.user_attrs.get("seconds", 0.0))
    if study.trials:
        log(f"tune: resuming the search in {storage}: trials made {len(_made(study, optuna))}, {spent:.0f} s of "
            "the budget spent")
    return study, spent


def _made(study: Any, optuna: Any) -> list[Any]:
    """The trials made: finished or pruned (a failed one was killed with its search and is made again)."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                    optuna.trial.TrialState.PRUNED))


def _given_trial(study: Any, optuna: Any, given: dict[str, Any]) -> Any:
    """The trial of the given config (queued, finished or pruned), or None (none yet, or it was killed)."""
    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return next((t for t in study.get_trials(deepcopy=False, states=states)
                 if t.params == given or t.system_attrs.get("fixed_params") == given), None)


def _finished(study: Any, optuna: Any, config: TuneConfig, deadline: float) -> bool:
    """The search is over: a trial made (finished or pruned), and the budget spent or ``max_trials`` made."""
    made = _made(study, optuna)
    return bool(made) and (time.monotonic() > deadline or bool(config.max_trials and len(made) >= config.max_trials))


def tune(kg: KnowledgeGraph, base: EmbedConfig, config: TuneConfig, *, log: Callable[[str], None] = print,
         storage: Path | None = None) -> TuneResult:
    """Search on validation MRR for ``config.budget`` seconds; returns ``base`` with the best trial's settings.

    ``storage``: an SQLite file that keeps the trials as they finish, so a killed search started again with
    the same file goes on from them (the budget counts the time spent before); its caller names it after the
    search, so another search never reads it."""
    try:
        import optuna
    except ImportError as error:  # an optional dependency: only --tune needs it
        raise RuntimeError("kgtok embed --tune needs Optuna: pip install 'kgtok[tune]'") from error

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, spent = _study(optuna, config, storage, log)
    start = time.monotonic() - spent
    deadline = start + config.budget
    given = _given(base.resolved_for(kg))  # trial 0: the given config, its N3 weight made concrete
    if given is not None and _given_trial(study, optuna, given) is None:
        study.enqueue_trial(given)

    def objective(trial: Any) -> float:
        row: dict[str, Any] = {}
        began = time.monotonic()
        try:
            return _trial(trial, kg, base, config, deadline, row, log)
        finally:
            trial.set_user_attr("row", {**row, "seconds": round(time.monotonic() - began, 1)})

    def out_of_time(study: Any, trial: Any) -> None:
        study.set_user_attr("seconds", time.monotonic() - start)  # what a resumed search has left
        if _finished(study, optuna, config, deadline):
            study.stop()

    with torch_threads(base.threads):  # as the stage's own run: threads=1 is honoured in the search too
        if not _finished(study, optuna, config, deadline):  # a resumed search may have nothing left to do
            study.optimize(objective, callbacks=[out_of_time], gc_after_trial=False)
    trials = [t.user_attrs["row"] for t in _made(study, optuna) if "row" in t.user_attrs]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"tune: no trial finished within {config.budget:g} s; give a larger budget")
    best = max(done, key=lambda t: t.value)
    first = _given_trial(study, optuna, given) if given is not None else None
    given_mrr = first.value if first is not None and first.value is not None else float("nan")
    chosen = replace(base, **SEARCHED, **best.params)
    return TuneResult(chosen=chosen, chosen_valid_mrr=float(best.value), given_valid_mrr=float(given_mrr),
                      trials=trials, seconds=time.monotonic() - start)
