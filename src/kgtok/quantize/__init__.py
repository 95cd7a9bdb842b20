"""Stage 4: the GS-Quant quantizer, ReaLM's residual VQ, and the EntityTokenizer."""

from kgtok.quantize.config import GSEConfig, GSRConfig, QuantizeConfig
from kgtok.quantize.stage import run_quantize
from kgtok.quantize.tokenizer import EntityTokenizer

__all__ = ["EntityTokenizer", "GSEConfig", "GSRConfig", "QuantizeConfig", "run_quantize"]
