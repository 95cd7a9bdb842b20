"""Stage 5 configs (choices typed as Literal, one module) and the stage-5 modules' import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kgtok.config import ConfigError, load_config
from kgtok.llm.config import EvaluateConfig, FinetuneConfig, InstructConfig, TinyBackboneConfig

LLM = Path(__file__).resolve().parents[2] / "src" / "kgtok" / "llm"


def test_choice_fields_are_literals_checked_when_loading_and_when_built():
    with pytest.raises(ConfigError, match=r"decode: expected one of \['trie', 'generate'\]"):
        load_config(EvaluateConfig, overrides=["decode=beam"])
    with pytest.raises(ValueError) as error:
        FinetuneConfig(adapter="qlora", embedding_init="zeros")
    assert "adapter='qlora': expected auto, lora or full" in str(error.value)
    assert "embedding_init='zeros': expected codebook, mean or names" in str(error.value)
    with pytest.raises(ValueError, match="completion or classification"):
        InstructConfig(task="qa")
    assert load_config(EvaluateConfig, overrides=["split=lm_valid", "score=mean"]).score == "mean"


def test_configs_are_public_where_they_were():
    from kgtok.llm.backbone import TinyBackboneConfig as from_backbone
    from kgtok.llm.evaluate import EvaluateConfig as from_evaluate
    from kgtok.llm.finetune import FinetuneConfig as from_finetune
    from kgtok.llm.instruct import InstructConfig as from_instruct

    assert (from_instruct, from_finetune, from_evaluate, from_backbone) == (
        InstructConfig, FinetuneConfig, EvaluateConfig, TinyBackboneConfig)


def test_stage5_modules_import_no_circle():
    """Every ``kgtok.llm`` import, at module level or inside a function, points one way."""
    imports = {}
    for path in LLM.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kgtok.llm."):
                found.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("kgtok.llm.")}
        imports[path.stem] = found - {path.stem}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import circle: {' -> '.join(trail + (module,))}"
        if module not in done:
            for other in imports.get(module, ()):
                visit(other, trail + (module,))
            done.add(module)

    for module in imports:
        visit(module, ())
    assert "instruct" not in imports["classify"] and "finetune" not in imports["evaluate"]
