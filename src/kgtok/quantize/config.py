"""QuantizeConfig: every default of stage 4 (the entity tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from kgtok.config import check_fields, in_range, machine

Variant = Literal["gsquant", "rq", "realm", "flat"]
RealmAssignment = Literal["nearest", "distinct"]
VQLoss = Literal["mean", "sum"]
# Levels with at most this many centres contrast all of them (every graph up to ~65k entities: unchanged).
L1_NEGATIVES = 8192


@dataclass(frozen=True, kw_only=True)
class GSEConfig:
    """Hierarchy-guided semantic enhancement (GS-Quant): L1 pulls, L2 pushes."""

    l1: bool = True  # coarse-to-fine alignment: pull level l toward its level-l cluster centre
    l2: bool = True  # separability: push level l from the neighbouring clusters' centres
    lambda1: float = 0.8  # level l weighs lambda1^(l+1)/m: shallow levels weigh more
    lambda2: float = 0.4  # level l weighs lambda2^(m-l)/m: deep levels weigh more
    temperature: float = 0.1  # cosine-softmax temperature of both terms
    # L1 over all k_l centres costs batch x k_l a step, and k_l grows with the graph (the last level ~N/8): a
    # million entities made each step a 1024 x 125,000 softmax.  Sampled centres keep a step's cost fixed.
    l1_negatives: int | None = None  # centres L1 contrasts with, drawn per step where a level has more; None: 8192

    @property
    def resolved_l1_negatives(self) -> int:
        return L1_NEGATIVES if self.l1_negatives is None else self.l1_negatives

    def __post_init__(self) -> None:
        check_fields(self, [("l1_negatives", lambda v: v is None or (_integer(v) and v >= 1),
                             "null or an integer >= 1"),
                            ("lambda1", in_range(0.0), ">= 0"), ("lambda2", in_range(0.0), ">= 0"),
                            ("temperature", in_range(0.0, low_open=True), "> 0 (it divides the cosines)")])


@dataclass(frozen=True, kw_only=True)
class GSRConfig:
    """Hierarchy-aware semantic reconstruction: a causal decoder rebuilds s and its ancestors."""

    enabled: bool = True
    layers: int = 2  # transformer layers (the paper: 2)
    width: int = 64  # transformer width; code vectors are projected to it (128 wide cost 4x on WN18RR)
    heads: int = 4
    lambda_s: float = 0.1  # weight of the first ancestor term (λs << λh)
    lambda_h: float = 1.0  # weight of the remaining ancestor terms

    def __post_init__(self) -> None:
        check_fields(self, [("layers", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
                            ("width", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
                            ("heads", lambda v: _integer(v) and v >= 1 and self.width % v == 0,
                             "an integer >= 1 that divides width"),
                            ("lambda_s", in_range(0.0), ">= 0"), ("lambda_h", in_range(0.0), ">= 0")])


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Stage 4: an RQ-VAE (GS-Quant) or residual k-means (ReaLM) turns entities into code tuples.

    Variants: ``gsquant`` (RQ-VAE + GSE + GSR), ``rq`` (plain RQ-VAE: GSE/GSR
    off), ``realm`` (residual k-means on the KGE vectors, many stages, no
    encoder), ``flat`` (one codebook shared by all levels, SSQR-like).
    """

    variant: Variant = "gsquant"
    levels: int | None = None  # code levels m; None: 4 (gsquant, rq), 32 (realm), 16 (flat)
    codebook_size: int | None = None  # K codes per level; None: 2^ceil(log2(N/8)) within [16, 1024]
    code_dim: int = 128  # width of codewords (reference 512; 128 trains 4x cheaper on a CPU, same codes)
    encoder_hidden: tuple[int, ...] = (512, 256)  # MLP widths between the input and code_dim
    beta: float = 0.25  # commitment weight β
    # L_Q's squared distances: mean over the code dimensions (kgtok) or their sum (METHOD.md's norms, as L_rec
    # and L_GSR have: 128x the weight at code_dim 128). On the synthetic KG sum collapsed flat's shared codebook
    # (4% of codes used, level-1 NMI with the tree 0.20 against 0.63) and gave gsquant about the same codes
    # (level-2 NMI 0.32 against 0.36): bench/results/quantizer_synthetic_vq_mean.md and _vq_sum.md.
    vq_loss: VQLoss = "mean"  # L_Q's squared distances over the dims: mean (kgtok) | sum (METHOD.md's norms)
    lr: float = 1e-3  # Adam (reference 1e-4 over many more steps)
    epochs: int = 60  # passes over the training entities
    batch_size: int = 1024  # capped at N/16 (>= 64) so that small graphs still get 16 steps an epoch
    kmeans_init: bool = True  # seed every level's codebook by k-means on the first residuals
    dead_code_restart: bool = True  # re-seed codes unused for dead_after steps from high-error residuals
    dead_after: int = 10  # steps without use before a code is re-seeded (a code used by 0.1% of
    #                       entities is missed by 10 batches of 1024 with probability 1e-4)
    holdout: float = 0.1  # share of entities held out for checkpoint selection (codebook entropy)
    eval_every: int = 2  # epochs between checkpoint evaluations
    patience: int = 5  # evaluations without a higher held-out entropy before stopping; 0: run every epoch
    gse: GSEConfig = field(default_factory=GSEConfig)
    gsr: GSRConfig = field(default_factory=GSRConfig)
    realm_kmeans_iterations: int = 20  # faiss iterations per residual stage (realm)
    realm_assignment: RealmAssignment = "distinct"  # realm's last level: distinct (codes differ where earlier ones agree) or nearest (ReaLM)
    #   distinct, chosen on bench/results/quantizer_semantic_id.md: collisions before the fix 0 on the three sets
    #   compared with semantic-id (nearest 3-25%, semantic-id 1-22%; a 200k mixture 5.4%, nearest 25%), for
    #   0.2-20% more reconstruction error and no measurable time; a training entity's last code may not be its nearest
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when present; GPU sums differ in the last bits
    threads: int = machine(0)  # 0 = all cores

    def __post_init__(self) -> None:
        check_fields(self, [
            ("variant", lambda v: v in get_args(Variant), f"one of {', '.join(get_args(Variant))}"),
            ("vq_loss", lambda v: v in get_args(VQLoss), "mean or sum"),
            ("patience", in_range(0), ">= 0"),
            ("levels", lambda v: v is None or _integer(v) and 1 <= v <= 64, "null or an integer in [1, 64]"),
            ("codebook_size", lambda v: v is None or _integer(v) and 2 <= v <= 65536,
             "null or an integer in [2, 65536]"),
            ("code_dim", in_range(2), ">= 2"),
            ("encoder_hidden", lambda v: all(h >= 1 for h in v), "positive widths"),
            ("beta", in_range(0.0), ">= 0"),
            ("lr", in_range(0.0, low_open=True), "> 0"),
            ("epochs", in_range(1), ">= 1"),
            ("batch_size", in_range(2), ">= 2"),
            ("dead_after", in_range(1), ">= 1"),
            ("holdout", in_range(0.0, 0.5), "in [0, 0.5]"),
            ("eval_every", in_range(1), ">= 1"),
            ("realm_kmeans_iterations", in_range(1), ">= 1"),
            ("realm_assignment", lambda v: v in get_args(RealmAssignment), f"one of {', '.join(get_args(RealmAssignment))}"),
            ("gsr", lambda g: g.width % g.heads == 0 and g.layers >= 1, "gsr.width divisible by gsr.heads, layers >= 1"),
            ("seed", in_range(0), ">= 0"),
            ("threads", in_range(0), ">= 0"),
        ])

    @property
    def uses_gse(self) -> bool:
        return self.variant == "gsquant" and (self.gse.l1 or self.gse.l2)

    @property
    def uses_gsr(self) -> bool:
        return self.variant == "gsquant" and self.gsr.enabled

    def resolved_batch_size(self, num_entities: int) -> int:
        return int(min(self.batch_size, max(64, num_entities // 16)))

    def resolved_levels(self) -> int:
        if self.levels is not None:
            return self.levels
        return {"gsquant": 4, "rq": 4, "realm": 32, "flat": 16}[self.variant]

    def resolved_codebook_size(self, num_entities: int) -> int:
        if self.codebook_size is not None:
            return self.codebook_size
        import math

        return int(min(1024, max(16, 2 ** math.ceil(math.log2(max(num_entities / 8, 2))))))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
