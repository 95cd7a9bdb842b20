"""Stage 5's precision: chosen by measurement (auto), refused where the device cannot run it, kept on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kgtok.llm.backbone import TinyBackboneConfig, build_tiny
from kgtok.llm.config import EvaluateConfig, FinetuneConfig
from kgtok.llm.scoring import CandidateScorer, score_batch
from kgtok.runtime import BF16_MIN_SPEEDUP, remembered_precision, resolve_precision, timed_precisions

CPU = torch.device("cpu")
TINY = TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)


def timings(fp32: float, bf16: float):
    return lambda: {"fp32": fp32, "bf16": bf16}


def test_auto_on_the_cpu_takes_bf16_only_where_it_measured_faster_by_the_margin():
    assert resolve_precision("auto", CPU, timings(30.0, 10.0)) == ("bf16", {"fp32": 30.0, "bf16": 10.0})
    assert resolve_precision("auto", CPU, timings(BF16_MIN_SPEEDUP * 10.0, 10.0))[0] == "bf16"
    assert resolve_precision("auto", CPU, timings(12.0, 10.0))[0] == "fp32"  # inside the margin: fp32 stays
    assert resolve_precision("auto", CPU, timings(10.0, 30.0))[0] == "fp32"  # bf16 slower (AVX2, no AMX)


def test_explicit_precisions_are_kept_without_measuring_and_impossible_ones_refused(monkeypatch):
    def never():
        raise AssertionError("measured")

    assert resolve_precision("fp32", CPU, never) == ("fp32", {})
    assert resolve_precision("bf16", CPU, never) == ("bf16", {})
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU, never)
    with pytest.raises(ValueError, match="expected auto, fp32, bf16 or fp16"):
        resolve_precision("half", CPU, never)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4 or V100
    assert resolve_precision("auto", gpu, never) == ("fp16", {})
    assert resolve_precision("auto", gpu, never, gpu_fallback="fp32") == ("fp32", {})
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_precision("bf16", gpu, never)
    assert resolve_precision("auto", gpu, never, measure_gpu=True) == ("fp32", {})  # stage 1: no fp16 path
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu, never) == ("bf16", {})
    # A stage whose bf16 path was never timed on a GPU (stage 1's) measures there as on a CPU
    assert resolve_precision("auto", gpu, timings(10.0, 9.0), measure_gpu=True)[0] == "fp32"
    assert resolve_precision("auto", gpu, timings(30.0, 10.0), measure_gpu=True)[0] == "bf16"


def test_timed_precisions_runs_the_bf16_arm_under_autocast():
    seen = []
    got = timed_precisions(lambda: seen.append(torch.is_autocast_enabled("cpu")), repeats=2)
    assert set(got) == {"fp32", "bf16"} and all(v >= 0 for v in got.values())
    assert seen == [False] * 3 + [True] * 3  # a warm-up and two timed calls each


def test_a_saved_precision_wins_over_a_new_measurement(tmp_path):
    path = tmp_path / "precision.json"
    assert remembered_precision(path, lambda: ("bf16", {"fp32": 3.0, "bf16": 1.0})) == ("bf16", {"fp32": 3.0,
                                                                                                "bf16": 1.0})
    assert json.loads(path.read_text())["precision"] == "bf16"
    assert remembered_precision(path, lambda: ("fp32", {}))[0] == "bf16"  # resumed: measured again, not used
    path.write_text("{torn")
    assert remembered_precision(path, lambda: ("fp32", {}))[0] == "fp32"


def test_with_precision_sets_the_trainers_autocast_whatever_the_launcher_said(tmp_path, monkeypatch):
    from kgtok.llm.finetune import training_arguments, training_precision, with_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    arguments = training_arguments(FinetuneConfig(precision="fp32"), tmp_path, 1e-3, False)
    assert with_precision(arguments, "fp32").mixed_precision == "no"
    bf16 = with_precision(arguments, "bf16")
    assert bf16.bf16 and not bf16.fp16 and bf16.mixed_precision == "bf16"

    class Main:
        is_main_process, num_processes = True, 1

    # under auto the launcher's flag wins, nothing measured; an explicit setting wins over the launcher
    assert training_precision(FinetuneConfig(), None, Main(), tmp_path / "a.json") == ("bf16", {})
    assert training_precision(FinetuneConfig(precision="fp32"), None, Main(), tmp_path / "b.json") == ("fp32", {})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return build_tiny(["one two three four five six seven"] * 10, tmp_path_factory.mktemp("tiny") / "m", TINY)


def test_bf16_scoring_keeps_the_output_layer_in_fp32_and_is_close_to_fp32(tiny_dir, tmp_path):
    fp32 = CandidateScorer(tiny_dir, EvaluateConfig(precision="fp32"), progress=False)
    bf16 = CandidateScorer(tiny_dir, EvaluateConfig(precision="bf16"), progress=False, saved=tmp_path / "p.json")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert json.loads((tmp_path / "p.json").read_text())["precision"] == "bf16"
    dtypes = {}
    for name, module in (("body", bf16.model.model.layers[0].mlp.down_proj), ("head", bf16.model.lm_head)):
        module.register_forward_hook(lambda m, i, o, name=name: dtypes.update({name: o.dtype}) and None)
    prompts, candidates = [[1, 10, 11, 12], [1, 20]], [[[30, 31, 2], [32, 2]], [[40, 2], [41, 42, 2]]]
    with torch.no_grad():
        low = score_batch(bf16.model, prompts, candidates, pad_id=0)
        high = score_batch(fp32.model, prompts, candidates, pad_id=0)
    assert dtypes == {"body": torch.bfloat16, "head": torch.float32}  # matmuls in bf16, the logits not
    for got, want in zip(low, high):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=0.05)
    with torch.no_grad():  # outside scoring too (generation, beams): the model's forward is under autocast
        out = bf16.model(input_ids=torch.tensor([[1, 10, 11]]))
    assert out.logits.dtype == torch.float32


def test_timings_are_measured_once_a_machine_and_model_shape(tmp_path, monkeypatch):
    from kgtok.runtime import measured_once

    monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(fp32: float):
        return lambda: calls.append(fp32) or {"fp32": fp32, "bf16": 10.0}

    shape = {"pass": "scoring", "hidden_size": 32, "batch": 4}
    assert measured_once(shape, measure(30.0)) == {"fp32": 30.0, "bf16": 10.0}
    # the same command again, the machine busier now: the first timings stand, so the choice cannot flip
    assert measured_once(shape, measure(11.0)) == {"fp32": 30.0, "bf16": 10.0} and calls == [30.0]
    assert measured_once({**shape, "hidden_size": 64}, measure(11.0))["fp32"] == 11.0  # another model: measured
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        assert measured_once(shape, measure(12.0))["fp32"] == 12.0  # other threads: measured
    finally:
        torch.set_num_threads(before)

    def raced():  # another process wrote its measurement while this one measured: the first one wins
        (tmp_path / "precision").mkdir(exist_ok=True)
        for path in (tmp_path / "precision").glob("*.json"):
            path.unlink()
        first = {"hidden_size": 128}
        measured_once({**shape, **first}, measure(50.0))
        return {"fp32": 99.0, "bf16": 10.0}

    assert measured_once({**shape, "hidden_size": 128}, raced)["fp32"] == 50.0
