"""Stage 5: code tokens in a language model: instructions, fine-tuning, constrained decoding, evaluation."""

from kgtok.llm.instruct import InstructConfig, run_instruct

__all__ = ["InstructConfig", "run_instruct", "FinetuneConfig", "run_finetune", "EvaluateConfig", "run_evaluate"]


def __getattr__(name: str):
    # transformers is imported only when stage 5b/5c is used.
    if name in ("FinetuneConfig", "run_finetune"):
        from kgtok.llm import finetune

        return getattr(finetune, name)
    if name in ("EvaluateConfig", "run_evaluate"):
        from kgtok.llm import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)
