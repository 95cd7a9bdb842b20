"""YAML + dotted overrides into frozen dataclasses; unknown keys and wrong types refused."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest

from kgtok.config import ConfigError, check_fields, config_to_dict, format_config, in_range, load_config


@dataclass(frozen=True, kw_only=True)
class Inner:
    lambda1: float = 0.8
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class Outer:
    levels: int = 4
    model: Literal["rotate", "transe"] = "rotate"
    sizes: tuple[int, ...] = (4, 4)
    data: str | None = None
    gse: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_fields(self, [
            ("levels", in_range(1, 16), "an integer in [1, 16]"),
            ("sizes", lambda v: all(s > 0 for s in v), "positive sizes"),
        ])


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("levels: 3\ngse:\n  lambda1: 0.5\nsizes: [2, 3, 5]\n")
    config = load_config(Outer, path, ["gse.enabled=false", "levels=6", "data=/some/dir"])
    assert config == Outer(levels=6, sizes=(2, 3, 5), data="/some/dir", gse=Inner(lambda1=0.5, enabled=False))
    assert load_config(Outer) == Outer()
    with pytest.raises(FrozenInstanceError):
        config.levels = 2  # type: ignore[misc]


def test_int_to_float_is_allowed_but_not_the_reverse():
    assert load_config(Outer, None, ["gse.lambda1=1"]).gse.lambda1 == 1.0
    with pytest.raises(ConfigError, match=r"levels: expected an integer, got 2.5"):
        load_config(Outer, None, ["levels=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("levles=4", r"unknown key\(s\) \['levles'\]"),
        ("gse.lambda3=1", r"gse: unknown key\(s\) \['lambda3'\]"),
        ("model=complex", r"model: expected one of \['rotate', 'transe'\]"),
        ("gse.enabled=maybe", r"gse.enabled: expected true/false"),
        ("sizes=3", r"sizes: expected a list"),
        ("levels", r"expected key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_value_checks_report_every_violation_at_once():
    with pytest.raises(ValueError) as err:
        Outer(levels=0, sizes=(3, 0))
    text = str(err.value)
    assert "Outer.levels=0: expected an integer in [1, 16]" in text
    assert "Outer.sizes=(3, 0): expected positive sizes" in text


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("levels: [\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(Outer, path)
    path.write_text("levels: 2\nunknown: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: Outer: unknown key\(s\) \['unknown'\]"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_round_trip_through_yaml(tmp_path):
    config = Outer(levels=5, sizes=(7,), gse=Inner(lambda1=0.1))
    path = tmp_path / "echo.yaml"
    path.write_text(format_config(config))
    assert load_config(Outer, path) == config
    assert config_to_dict(config)["sizes"] == [7]


def test_section_of_a_run_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("quantize:\n  levels: 2\nembed:\n  dim: 3\n")
    assert load_config(Outer, path, section="quantize").levels == 2


def test_shipped_preset_by_name():
    from kgtok.embed import EmbedConfig

    config = load_config(EmbedConfig, "embed_wn18rr", ["dim=8"])
    assert config.model == "complex" and config.dim == 8 and config.regularizer_weight == 0.1
    with pytest.raises(ConfigError, match="shipped presets: .*embed_fb15k237"):
        load_config(EmbedConfig, "embed_nope")


def test_partial_nested_override_keeps_the_fields_own_default():
    from kgtok.pipeline import RunConfig

    config = load_config(RunConfig, None, ["embed.threads=1"])
    assert config.embed.threads == 1
    assert (config.embed.eval_every, config.embed.patience) == (RunConfig().embed.eval_every, RunConfig().embed.patience)


def test_every_shipped_preset_loads_and_run_smollm2_is_the_benchmarks_stage5():
    """A preset that no longer loads (a renamed field) fails here, not in a user's run; run_smollm2 is the
    codes_all row of issue 15's benchmark (bench/smollm2_bench.py STAGE5 and SWITCHES), so its numbers
    describe the preset."""
    import sys
    from pathlib import Path

    from kgtok.config import list_presets
    from kgtok.embed import EmbedConfig
    from kgtok.pipeline import RunConfig

    for name in list_presets():
        load_config(RunConfig if name.startswith("run_") else EmbedConfig, name)
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        from smollm2_bench import STAGE5, SWITCHES
    finally:
        sys.path.remove(str(bench))
    preset = load_config(RunConfig, "run_smollm2")  # the benchmark's codes_all row: its stage 5 and the switches
    assert preset == load_config(RunConfig, None, ["finetune.backbone=smollm2-135m", *STAGE5, *SWITCHES["codes_all"]])
    assert preset.finetune.embedding_init == "names" and preset.instruct.align_tasks
    # The tiny LM's run writes the compact template; the presets measured with DIFT's sentences keep them.
    assert load_config(RunConfig).instruct.template == "compact"
    assert preset.instruct.template == load_config(RunConfig, "run_wn18rr").instruct.template == "dift"


def test_a_saved_config_without_a_later_field_reads_as_it_ran():
    """run_config.json of a run made before instruct.template existed: DIFT's template ran (the class default),
    not kgtok run's later default (compact); config_from_dict, for new configs, takes the run's default."""
    from kgtok.config import config_from_dict, config_to_dict, saved_config
    from kgtok.pipeline import RunConfig

    current = RunConfig()
    old = config_to_dict(current)
    del old["instruct"]["template"], old["finetune"]["tiny"]["heads"]
    assert saved_config(RunConfig, old).instruct.template == "dift"
    assert config_from_dict(RunConfig, old).instruct.template == "compact"
    read = saved_config(RunConfig, old)
    assert read.finetune.tiny.heads == 4 and read.instruct.neighbours == 3  # run-level values kept
    assert saved_config(RunConfig, config_to_dict(current)) == current  # a complete one round-trips
    with pytest.raises(ConfigError, match="instruct: unknown key"):
        saved_config(RunConfig, {**old, "instruct": {**old["instruct"], "templat": "dift"}})
    with pytest.raises(ConfigError, match="instruct.template"):
        saved_config(RunConfig, {**old, "instruct": {**old["instruct"], "template": "short"}})


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string: an override or a file with lr 1e-3 was refused."""
    assert load_config(Outer, None, ["gse.lambda1=1e-3"]).gse.lambda1 == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("gse:\n  lambda1: 5E-5\n")
    assert load_config(Outer, path).gse.lambda1 == 5e-5
    assert load_config(Outer, None, ["gse.lambda1=2e3"]).gse.lambda1 == 2000.0
    assert load_config(Outer, None, ["data=1e-3x"]).data == "1e-3x"


def test_a_bad_override_is_named_as_the_override_not_the_file(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("levels: 3\n")
    with pytest.raises(ConfigError, match=r"^override levels: expected an integer"):
        load_config(Outer, path, ["levels=abc"])
    path.write_text("levels: abc\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: levels: expected an integer"):
        load_config(Outer, path, ["gse.lambda1=0.5"])


def test_a_yaml_key_read_as_a_bool_is_an_unknown_key_not_a_crash(tmp_path):
    """YAML 1.1 reads a bare ``on:`` key as True: sorting it with the string keys raised a TypeError."""
    path = tmp_path / "c.yaml"
    path.write_text("on: 1\nlevles: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[True, 'levles'\]"):
        load_config(Outer, path)


def test_non_finite_floats_and_degenerate_quantizer_values_are_refused_before_any_work():
    """lr=.inf trained to NaN vectors with exit 0; gse.temperature=0 gave NaN metrics; an override that is not
    YAML (seed=[1) was a ParserError traceback."""
    from kgtok.config import ConfigError, parse_overrides
    from kgtok.embed.config import EmbedConfig
    from kgtok.quantize.config import GSEConfig, GSRConfig

    with pytest.raises(ValueError, match=r"EmbedConfig.lr=inf: expected a finite number"):
        EmbedConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"EmbedConfig.init_scale=nan: expected a finite number"):
        EmbedConfig(init_scale=float("nan"))
    with pytest.raises(ValueError, match=r"GSEConfig.temperature=0.0: expected > 0"):
        GSEConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"GSRConfig.heads=3: expected an integer >= 1 that divides width"):
        GSRConfig(heads=3)
    with pytest.raises(ConfigError, match=r"override 'seed=\[1': the value is not valid YAML"):
        parse_overrides(["seed=[1"])


def test_an_optional_choice_names_its_values():
    """model=foo said "'foo' is none of Optional": no choice named."""
    from kgtok.embed.importer import ImportConfig

    with pytest.raises(ConfigError, match=r"override model: expected one of 'rotate', 'transe', 'distmult', "
                                          r"'complex' or null, got 'foo'"):
        load_config(ImportConfig, None, ["model=foo"])


def test_a_config_built_in_python_is_type_checked_as_yaml_is():
    """Only values were checked: reciprocal="false" (truthy) turned reciprocal relations on, dim=8.5 failed
    inside torch, an unknown model name or a dict for a nested section failed deep in the stage."""
    import numpy as np

    from kgtok.data.stage import DataConfig
    from kgtok.embed.config import EmbedConfig
    from kgtok.pipeline import RunConfig
    from kgtok.quantize.config import QuantizeConfig
    from kgtok.text.config import TextConfig

    for make, message in (
        (lambda: EmbedConfig(reciprocal="false"), "EmbedConfig.reciprocal='false': expected bool or null"),
        (lambda: EmbedConfig(dim=8.5), "EmbedConfig.dim=8.5: expected int"),
        (lambda: EmbedConfig(model="foo"), "EmbedConfig.model='foo': expected one of"),
        (lambda: QuantizeConfig(gse={"l1": False}), "QuantizeConfig.gse={'l1': False}: expected GSEConfig"),
        (lambda: RunConfig(embed=TextConfig()), "RunConfig.embed=TextConfig\\(...\\): expected EmbedConfig"),
        (lambda: DataConfig(skip_header="no"), "DataConfig.skip_header='no': expected bool"),
    ):
        with pytest.raises(ValueError, match=message):
            make()
    assert EmbedConfig(dim=np.int64(8), lr=1).dim == 8  # numpy integers and an int for a float are numbers
    assert EmbedConfig(export_splits=["train"]).export_splits == ["train"]  # a list for a tuple, as YAML gives
    from pathlib import Path

    assert RunConfig(out=Path("runs/x")).out == Path("runs/x")  # a path for a str field, as before the check
