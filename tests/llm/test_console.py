"""Stage 5b's console with the bars off: a log file still shows how far training is and how long is left."""

from types import SimpleNamespace

from kgtok.llm.console import TrainingConsole


def train(console: TrainingConsole, first: int, last: int, max_steps: int, clock: list[float]) -> None:
    """Steps ``first``..``last`` through the callback as the Trainer calls it, 3 s a step, a loss every 5."""
    state = SimpleNamespace(global_step=first - 1, max_steps=max_steps, is_world_process_zero=True, epoch=0.0)
    console.on_train_begin(None, state, None)
    for step in range(first, last + 1):
        clock[0] += 3.0
        state.global_step = step
        console.on_step_end(None, state, None)
        if step % 5 == 0:
            console.on_log(None, state, None, logs={"loss": 10.0 / step})


def test_progress_off_logs_a_line_per_tenth_with_the_time_left():
    clock, lines = [100.0], []
    console = TrainingConsole(False, lines.append, clock=lambda: clock[0])
    train(console, 1, 40, 40, clock)
    assert len(lines) == 10  # steps 4, 8, ..., 40
    assert lines[0] == "finetune: step 4 of 40, 3.00 s a step, 1.8 min left"
    assert lines[4] == "finetune: step 20 of 40, loss 0.667, 3.00 s a step, 1.0 min left"  # the loss of step 15
    assert lines[-1].startswith("finetune: step 40 of 40, loss 0.286") and lines[-1].endswith("0.0 min left")
    odd: list[str] = []
    train(TrainingConsole(False, odd.append, clock=lambda: clock[0]), 1, 31, 31, clock)
    assert [line.split(",")[0] for line in odd[-2:]] == ["finetune: step 28 of 31", "finetune: step 31 of 31"]


def test_a_resumed_run_times_only_its_own_steps():
    clock, lines = [0.0], []
    console = TrainingConsole(False, lines.append, clock=lambda: clock[0])
    clock[0] = 5000.0  # whatever the clock says when training resumes after step 20 of 40
    train(console, 21, 40, 40, clock)
    assert len(lines) == 5 and lines[0] == "finetune: step 24 of 40, 3.00 s a step, 0.8 min left"


def test_progress_on_logs_no_step_lines():
    clock, lines = [0.0], []
    console = TrainingConsole(True, lines.append, clock=lambda: clock[0])
    train(console, 1, 10, 10, clock)
    console.on_train_end(None, SimpleNamespace(), None)
    assert lines == []
