"""What stage 5b/5c show on the console: our lines and bars, none of the libraries' own.

Hugging Face libraries print on their own: a "Loading weights" bar per
``from_pretrained``, a "Writing model shards" bar per ``save_pretrained``
(every checkpoint), the Trainer's dictionary per logging step, notices and
deprecation warnings.  Inside :func:`quiet_libraries` they print nothing; the
stage shows one bar for training (:class:`TrainingConsole`) and one per scored
split, or, with progress off, a few plain lines through its ``log``.  (This
module imports transformers: 5b/5c import it when they run.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No bars, notices below errors or deprecation warnings from transformers and friends in the block."""
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # PEFT's note on every LoRA checkpoint that it saves the resized embedding too: expected here.
            warnings.filterwarnings("ignore", "Setting `save_embedding_layers` to `True`", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class LossAtCheckpoints(TrainerCallback):
    """A loss record at every checkpoint's step: a run resumed from the checkpoint then finds in its log history
    the loss of every step before it, and reports the mean over all steps (:func:`kgtok.llm.finetune.mean_train_loss`)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:  # set by the Trainer's flow callback, which runs before this one
            control.should_log = True
        return control


def level_metrics(metrics: dict[str, Any], prefix: str = "eval") -> list[float]:
    """The per-level code-token losses (level 1 first) that an LM-valid pass put in ``metrics``
    (:class:`kgtok.llm.finetune.AnswerLoss`)."""
    key = f"{prefix}_code_token_loss_level_"
    return [v for _, v in sorted((int(k[len(key):]), v) for k, v in metrics.items() if k.startswith(key))]


class TrainingConsole(TrainerCallback):
    """In place of the Trainer's printer: one bar of steps with the loss beside it and one bar per LM-valid
    pass; with ``progress`` off (a log file, a benchmark in the background), plain lines through ``log``: one
    per tenth of the steps (loss, time a step, time left) and one per LM-valid pass."""

    LINES = 10  # progress lines per run with the bars off

    def __init__(self, progress: bool, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.progress, self.log, self.clock = progress, log, clock
        self.steps: Any = None  # tqdm bars while they run
        self.valid: Any = None
        self.done = 0  # steps the bar shows
        self.losses: dict[str, str] = {}  # the latest training and LM-valid losses, beside the bar
        self.start = (0.0, 0)  # (time, step) when this process began training

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress and state.is_world_process_zero:
            self.steps = tqdm(total=state.max_steps, desc="finetune", unit="step", dynamic_ncols=True)
        self.start = (self.clock(), state.global_step)  # a resumed run starts at its checkpoint's step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.steps is not None:
            self.steps.update(state.global_step - self.done)  # a resumed run jumps to its checkpoint's step
        elif not self.progress and state.is_world_process_zero:
            self._line(state)
        self.done = state.global_step

    def _line(self, state: Any) -> None:
        every = max(1, -(-state.max_steps // self.LINES))
        if state.global_step % every and state.global_step != state.max_steps:
            return
        began, first = self.start
        per_step = (self.clock() - began) / max(1, state.global_step - first)
        left = per_step * (state.max_steps - state.global_step)
        loss = f", loss {self.losses['loss']}" if "loss" in self.losses else ""
        self.log(f"finetune: step {state.global_step} of {state.max_steps}{loss}, {per_step:.2f} s a step, "
                 f"{left / 60:.1f} min left")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses["loss"] = f"{logs['loss']:.3f}"
            if self.steps is not None:
                self.steps.set_postfix(self.losses, refresh=False)

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None,
                           **kwargs: Any) -> None:
        if self.progress and state.is_world_process_zero and self.valid is None and eval_dataloader is not None:
            self.valid = tqdm(total=len(eval_dataloader), desc="finetune: LM-valid", unit="batch", leave=False,
                              dynamic_ncols=True)
        if self.valid is not None:
            self.valid.update(1)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.valid is not None:
            self.valid.close()
            self.valid = None
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
            return
        codes = metrics.get("eval_code_token_loss")
        levels = level_metrics(metrics)
        if self.steps is not None:
            self.losses["valid_loss"] = f"{metrics['eval_loss']:.3f}"
            if codes is not None:
                self.losses["valid_code_loss"] = f"{codes:.3f}"
            self.steps.set_postfix(self.losses)
        else:
            self.log(f"finetune: step {state.global_step} of {state.max_steps}, epoch {state.epoch:.2f}, "
                     f"LM-valid loss {metrics['eval_loss']:.3f}"
                     + (f" (code tokens {codes:.3f}" + (f"; by level {', '.join(f'{v:.2f}' for v in levels)}"
                                                        if levels else "") + ")" if codes is not None else ""))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
