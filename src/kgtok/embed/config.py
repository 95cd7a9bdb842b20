"""EmbedConfig: every default of stage 1 (KG embeddings), with its trade-off."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from kgtok.config import check_fields, in_range, machine, resumable

if TYPE_CHECKING:
    from kgtok.data.graph import KnowledgeGraph

ModelName = Literal["rotate", "transe", "distmult", "complex"]
LossName = Literal["auto", "nssa", "1vsall"]
# Graphs from this size on train nssa with row updates by default (EmbedConfig.sparse): a dense step took 56 ms at
# 100k entities and 643 ms at 1M, a row-update step 77 and 111 ms (bench/results/scale_sparse_step.json; the
# crossover interpolates to ~140k).
SPARSE_FROM = 200_000
BILINEAR = ("complex", "distmult")  # scores are products with every entity: 1vsall's default, bf16's only case
N3_FLOOR = 0.005  # the density rule's smallest N3 weight (EmbedConfig.n3_weight)


def density_n3_weight(triples_per_entity: float, floor: float = N3_FLOOR) -> float:
    """The density rule: 0.2 / (training triples per entity) clipped to [floor, 0.1] (EmbedConfig.n3_weight;
    bench/kge_defaults.py states its candidates' floors through it)."""
    return float(min(0.1, max(floor, 0.2 / max(triples_per_entity, 1e-9))))


Device = Literal["auto", "cpu", "cuda"]  # where stages 1, 3 and 4 compute (kgtok.runtime.resolve_device)


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Stage 1: train a KG embedding model, rank filtered, export candidates.

    The default is ComplEx with N3 and reciprocal relations, trained 1-vs-all:
    scoring every entity is one matmul, so on a CPU it reaches a given MRR far
    sooner than RotatE with sampled negatives (see bench/results/kge_*.json).
    RotatE (METHOD.md's reference model) is ``model=rotate``.
    """

    model: ModelName = "complex"  # scoring function
    dim: int = 200  # complex models: complex dims (2*dim reals); real models: dims
    loss: LossName = "auto"  # auto: 1vsall for distmult/complex, nssa (self-adversarial) for rotate/transe
    reciprocal: bool | None = None  # add inverse relations and predict heads as tails; None: on for 1vsall
    # --- self-adversarial negative sampling (RotatE paper) ---
    num_negatives: int = 256  # per positive; more = better gradients, linear cost
    # One draw of num_negatives for the whole batch, as DGL-KE and PyTorch-BigGraph share negatives within a
    # chunk: scored by one (batch, num_negatives) product, and a step gathers num_negatives rows, not batch x.
    shared_negatives: bool = False  # nssa only
    margin: float = 9.0  # γ: distance models score γ - d(h, t)
    adversarial_temperature: float = 1.0  # α: 0 gives uniform weights on negatives
    subsampling: bool = True  # weight triples by 1/sqrt(frequency of (h, r) and (r, t))
    # --- 1-vs-all (Lacroix et al. 2018) ---
    regularizer_weight: float | None = None  # N3 weight λ; None: 0.2 / (train triples per entity) in [0.005, 0.1] for 1vsall, 0 for nssa
    label_smoothing: float = 0.0  # spread this much probability over all entities
    # --- optimisation ---
    optimizer: Literal["auto", "adam", "adagrad"] = "auto"  # auto: adagrad for 1vsall (Lacroix et al.), adam for nssa
    lr: float | None = None  # None: 0.1 for adagrad, 1e-3 for adam (RotatE's 5e-5 needs GPU-length runs)
    # Adagrad's steps shrink on their own; a decay over the last steps settles the weights where validation reads
    # them. It follows max_steps: a run resumed with another max_steps decays on the new one.
    lr_decay_from: float = 1.0  # share of max_steps after which the lr falls on a half cosine to 0; 1: constant
    # Dense updates cost a pass over every table row per step (and steps per epoch grow with the graph): O(n^2)
    # per epoch count; row updates touch the batch's rows only, as DGL-KE and PyTorch-BigGraph do.
    sparse: bool | None = None  # nssa: row gradients, lazy Adam / sparse Adagrad; None: on from 200,000 entities
    batch_size: int = 1000  # training examples per step (with reciprocal relations each triple gives two)
    max_steps: int = resumable(20000)  # upper bound; early stopping usually ends sooner
    # Per epoch, not per fixed step count: 1000 steps are 6 epochs of WN18RR but 300 of Nations.
    eval_every: int = 0  # steps between validation runs (filtered MRR on valid); 0: once per epoch
    eval_max_queries: int = 0  # 0: all validation triples; else a fixed random subset (faster checks)
    patience: int = resumable(5)  # validations without improvement before stopping
    checkpoint_every: int = machine(500)  # steps between resumable checkpoints
    init_scale: float = 1e-3  # 1vsall: embeddings start at N(0, init_scale); nssa uses RotatE's uniform range
    # --- evaluation and export ---
    eval_batch_size: int = machine(512)  # queries scored against all entities at once (memory ~ batch*N*4 bytes; a CPU caps it near 16 MB)
    top_k: int = resumable(20)  # candidates exported per query (stage 5 lists these)
    export_splits: tuple[str, ...] = resumable(("train", "valid", "test"))  # candidate files to write
    # --- machine ---
    device: Device = "auto"  # auto: cuda when a GPU is present, else cpu. Not a machine field: GPU sums differ in the last bits
    # bf16: 1-vs-all's score product (batch x every entity) and its softmax in bf16, the weights, N3 and optimiser
    # in fp32; validation, ranking and export always fp32. auto: bf16 where a step of this model measured
    # >= 1.25x faster in it (kgtok.runtime.resolve_precision; choice and timings in the artifact's metrics), else
    # fp32; nssa and distance models always fp32. Not a machine field: bf16 trains another model.
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where measured >= 1.25x faster; bf16: 1vsall only
    threads: int = machine(0)  # torch threads; 0 = all cores. Use 1 per process when tests run in parallel
    seed: int = 0  # one seed for init, batch order and negatives

    def __post_init__(self) -> None:
        check_fields(self, [
            ("dim", in_range(1, 100_000), "an integer in [1, 100000]"),
            ("num_negatives", in_range(1, 1_000_000), "a positive integer"),
            ("margin", in_range(0.0), ">= 0"),
            ("adversarial_temperature", in_range(0.0), ">= 0"),
            ("regularizer_weight", lambda v: v is None or v >= 0, "null or >= 0"),
            ("label_smoothing", in_range(0.0), "in [0, 1)"),
            ("lr", lambda v: v is None or v > 0, "null or > 0"),
            ("lr_decay_from", in_range(0.0, 1.0), "in [0, 1]"),
            ("batch_size", in_range(1), "a positive integer"),
            ("max_steps", in_range(1), "a positive integer"),
            ("eval_every", in_range(0), ">= 0 (0: once per epoch)"),
            ("eval_max_queries", in_range(0), ">= 0"),
            ("patience", in_range(1), "a positive integer"),
            ("checkpoint_every", in_range(1), "a positive integer"),
            ("init_scale", in_range(0.0, low_open=True), "> 0"),
            ("eval_batch_size", in_range(1), "a positive integer"),
            ("top_k", in_range(1), "a positive integer"),
            ("export_splits", lambda v: set(v) <= {"train", "valid", "test"}, "a subset of train, valid, test"),
            ("threads", in_range(0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
            ("label_smoothing", lambda v: v < 1.0, "< 1"),
            ("reciprocal", lambda v: not (v is False and self.resolved_loss == "1vsall"),
             "not false with 1vsall (loss 1vsall, or auto with complex/distmult): it scores tails only, so head "
             "queries are learnt from reciprocal relations"),
            ("shared_negatives", lambda v: not (v and self.resolved_loss == "1vsall"),
             "false with 1vsall (it scores every entity, no negatives are drawn)"),
            ("precision", lambda v: v != "bf16" or (self.resolved_loss == "1vsall" and self.model in BILINEAR),
             "auto or fp32 unless complex or distmult train 1vsall (bf16 applies to their product of the batch "
             "with every entity)"),
            ("sparse", lambda v: not (v and self.resolved_loss == "1vsall"),
             "null or false with 1vsall (it scores the whole table every step)"),
        ])

    @property
    def resolved_loss(self) -> str:
        if self.loss != "auto":
            return self.loss
        return "1vsall" if self.model in BILINEAR else "nssa"

    @property
    def resolved_reciprocal(self) -> bool:
        if self.reciprocal is not None:
            return self.reciprocal
        return self.resolved_loss == "1vsall"

    @property
    def resolved_optimizer(self) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "adagrad" if self.resolved_loss == "1vsall" else "adam"

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.1 if self.resolved_optimizer == "adagrad" else 1e-3

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): resolved_lr, times a half cosine from lr_decay_from on."""
        start = self.lr_decay_from * self.max_steps
        if step < start or self.lr_decay_from >= 1.0:
            return self.resolved_lr
        return self.resolved_lr * 0.5 * (1.0 + math.cos(math.pi * (step - start) / (self.max_steps - start)))

    def sparse_for(self, num_entities: int) -> bool:
        """Row (sparse) updates: as given, else for nssa on graphs of at least SPARSE_FROM entities."""
        if self.sparse is not None:
            return self.sparse
        return self.resolved_loss == "nssa" and num_entities >= SPARSE_FROM

    def n3_weight(self, triples_per_entity: float) -> float:
        """λ: the given weight, else for 1vsall 0.2 / (training triples per entity) clipped to [0.005, 0.1].

        Sparse graphs want strong N3 (WN18RR: 2.1 triples per entity, λ 0.094), small dense ones weak
        (UMLS: 39, λ 0.005); one fixed λ was 0.01-0.15 validation MRR behind the tuned config on one kind
        or the other. The floor: Kinship (82 triples per entity, λ 0.0024 by the ratio) validated 0.008
        better at 0.005. Chosen on validation over five graphs (bench/results/kge_defaults.json).
        """
        if self.regularizer_weight is not None:
            return self.regularizer_weight
        if self.resolved_loss != "1vsall":
            return 0.0
        return density_n3_weight(triples_per_entity)

    def resolved_for(self, kg: KnowledgeGraph) -> EmbedConfig:
        """This config with its N3 weight made concrete for ``kg`` (what training uses)."""
        density = len(kg.triples["train"]) / max(kg.num_entities, 1)
        return replace(self, regularizer_weight=self.n3_weight(density))
