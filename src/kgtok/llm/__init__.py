"""Stage 5: code tokens in a language model: instructions, fine-tuning, constrained decoding, evaluation.

Modules: ``config`` (the three stage configs), ``prompts`` (templates, answer
prefix, token ids, JSONL), ``instruct`` (5a; ``neighbours`` and ``classify``
feed it), ``backbone`` and ``vocab`` (the LM and its code tokens),
``finetune`` (5b), ``scoring``, ``decoding``, ``rankers`` and ``evaluate``
(5c), ``console`` (what 5b/5c print).
"""

from kgtok.llm.config import EvaluateConfig, FinetuneConfig, InstructConfig
from kgtok.llm.instruct import run_instruct

__all__ = ["InstructConfig", "run_instruct", "FinetuneConfig", "run_finetune", "EvaluateConfig", "run_evaluate"]


def __getattr__(name: str):
    # The 5b/5c modules are imported when first used.
    if name == "run_finetune":
        from kgtok.llm.finetune import run_finetune

        return run_finetune
    if name == "run_evaluate":
        from kgtok.llm.evaluate import run_evaluate

        return run_evaluate
    raise AttributeError(name)
