"""Stage 1: KG embeddings (RotatE, TransE, DistMult, ComplEx), filtered ranking, candidates."""

from kgtok.embed.config import EmbedConfig
from kgtok.embed.ranking import RankedQueries, rank_triples
from kgtok.embed.stage import run_embed
from kgtok.embed.train import load_model

__all__ = ["EmbedConfig", "RankedQueries", "load_model", "rank_triples", "run_embed"]
