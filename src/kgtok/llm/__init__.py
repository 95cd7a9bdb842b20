"""Stage 5: code tokens in a language model (instructions so far; training and evaluation to come)."""

from kgtok.llm.instruct import InstructConfig, run_instruct

__all__ = ["InstructConfig", "run_instruct"]
