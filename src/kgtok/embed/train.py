"""Stage 1 recipe: train a KG embedding model, keep the best on valid MRR, export.

setup -> train (validate every N steps, early stopping, resumable checkpoints)
-> final evaluation with the best weights -> export (embeddings, metrics,
candidates of every split) into an artifact directory written atomically.

Determinism: the batch order of epoch e and the negatives of step s are drawn
from generators seeded by (seed, e) and (seed, s), so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kgtok.artifacts import write_id_order, write_json_atomic
from kgtok.config import format_config
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.config import BILINEAR, EmbedConfig
from kgtok.embed.layout import EmbedArtifact
from kgtok.embed.models import KGEModel, build_model
from kgtok.embed.ranking import RankedQueries, rank_triples
from kgtok.runtime import DTYPES, precision_line, resolve_device, seeded_generator, torch_save_atomic


# ----------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides the model and optimizer."""

    step: int = 0
    best_mrr: float = -1.0
    best_step: int = 0
    bad_evaluations: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    last_loss: float = float("nan")
    max_steps: int = 0  # the budget the run was started with (0: a checkpoint of an older kgtok)
    precision: str = "fp32"  # what the run began in (EmbedConfig.precision); older checkpoints trained in fp32
    precision_ms: dict[str, float] = field(default_factory=dict)  # the timings auto chose it by (empty if given)


def build(config: EmbedConfig, kg: KnowledgeGraph, device: torch.device | str = "cpu"
          ) -> tuple[KGEModel, torch.optim.Optimizer]:
    """Model and optimizer on ``device``; the initial weights are drawn on the CPU, so they match on any device."""
    reciprocal = config.resolved_reciprocal
    relations = kg.num_relations * (2 if reciprocal else 1)
    model = build_model(config.model, kg.num_entities, relations, config.dim, margin=config.margin)
    generator = seeded_generator(config.seed, 0)
    model.reset_parameters(generator, scale=config.init_scale if config.resolved_loss == "1vsall" else None)
    model.to(device)  # before the optimizer, whose state (Adagrad's sums) is made on the parameters' device
    model.sparse = config.sparse_for(kg.num_entities)
    if model.sparse:  # row gradients: lazy Adam (moments of the touched rows only) or Adagrad's sparse path
        optimizer: torch.optim.Optimizer = (
            torch.optim.SparseAdam(model.parameters(), lr=config.resolved_lr) if config.resolved_optimizer == "adam"
            else torch.optim.Adagrad(model.parameters(), lr=config.resolved_lr))
    elif config.resolved_optimizer == "adagrad":
        # Fused on the CPU: one pass over the table instead of five (about a tenth of a WN18RR step on 2 cores)
        fused = torch.device(device).type == "cpu"
        optimizer = torch.optim.Adagrad(model.parameters(), lr=config.resolved_lr, fused=fused)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.resolved_lr)
    return model, optimizer


def training_examples(kg: KnowledgeGraph, reciprocal: bool) -> torch.Tensor:
    """(n, 3) training triples; with reciprocal relations also (t, r + R, h)."""
    train = kg.train
    if not reciprocal:
        return train
    inverse = torch.stack([train[:, 2], train[:, 1] + kg.num_relations, train[:, 0]], dim=1)
    return torch.cat([train, inverse])


def subsampling_weights(examples: torch.Tensor, num_entities: int, num_relations: int) -> torch.Tensor:
    """RotatE's weights 1/sqrt(count(h, r) + count(t, r⁻¹)), counts starting at 4 (word2vec-style)."""
    h, r, t = examples[:, 0].numpy(), examples[:, 1].numpy(), examples[:, 2].numpy()
    keys_hr = h * num_relations + r
    keys_tr = t * num_relations + r
    # count(t, r^-1) is the number of triples whose (tail, relation) is (t, r).
    _, inv_hr, count_hr = np.unique(keys_hr, return_inverse=True, return_counts=True)
    _, inv_tr, count_tr = np.unique(keys_tr, return_inverse=True, return_counts=True)
    # The RotatE code starts each count at 4 and adds 1 per further occurrence.
    counts = (count_hr[inv_hr] + 3) + (count_tr[inv_tr] + 3)
    return torch.as_tensor(1.0 / np.sqrt(counts), dtype=torch.float32)


# ----------------------------------------------------------------------------
# One optimisation step
# ----------------------------------------------------------------------------


def nssa_loss(
    model: KGEModel,
    batch: torch.Tensor,
    weights: torch.Tensor | None,
    negatives: torch.Tensor,
    corrupt_head: bool,
    temperature: float,
) -> torch.Tensor:
    """Self-adversarial negative sampling loss (Sun et al. 2019, eq. 5).

    ``negatives``: (batch, K) entity ids, or (K,) shared by every example of the batch.
    """
    positive = model.score_triples(batch)  # (batch,)
    if corrupt_head:
        query = model.head_query(batch[:, 1], batch[:, 2])
    else:
        query = model.tail_query(batch[:, 0], batch[:, 1])
    compare = model.compare if negatives.dim() == 1 else model.compare_each
    negative = compare(query, model.entity_rows(negatives))  # (batch, K)
    if temperature > 0:
        adversarial = torch.softmax(negative.detach() * temperature, dim=1)
    else:
        adversarial = torch.full_like(negative, 1.0 / negative.shape[1])
    negative_term = (adversarial * F.logsigmoid(-negative)).sum(dim=1)
    positive_term = F.logsigmoid(positive)
    if weights is None:
        return -(positive_term.mean() + negative_term.mean()) / 2
    return -((weights * positive_term).sum() + (weights * negative_term).sum()) / (2 * weights.sum())


def one_vs_all_loss(model: KGEModel, batch: torch.Tensor, label_smoothing: float,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Cross-entropy of the true tail among all entities (reciprocal relations give the heads).

    Also returns the N3 factors when the model computes them from the same
    gathered rows (bilinear models), else None.  ``dtype`` bf16: the score
    product and its softmax in bf16 (EmbedConfig.precision; bilinear models).
    """
    if not hasattr(model, "one_vs_all_terms"):
        scores = model.score_all_tails(batch[:, 0], batch[:, 1])
        return F.cross_entropy(scores, batch[:, 2], label_smoothing=label_smoothing), None
    queries, factors = model.one_vs_all_terms(batch)  # bilinear: scores are queries @ entity.T
    size = len(queries) * model.num_entities * torch.finfo(dtype).bits // 8
    if size <= _WHOLE_MAX_BYTES or queries.device.type != "cpu":
        scores = model.compare(queries.to(dtype), model.entity.to(dtype))
        return F.cross_entropy(scores, batch[:, 2], label_smoothing=label_smoothing).float(), factors
    return ChunkedCrossEntropy.apply(queries, model.entity, batch[:, 2], label_smoothing, dtype), factors


# On a CPU, score matrices up to this many bytes are built whole, larger ones a block at a time: on 2 AMD EPYC
# cores (bench/results/kge_step_time.json, WN18RR) whole was faster at batch 100 (4M floats), blocks at 250 (10M).
# A GPU builds them whole (not measured there).
_WHOLE_MAX_BYTES = 4 << 23
# Entity rows per block: a (batch, block) slice of about this many floats stays in cache.
_CE_CHUNK_FLOATS = 1 << 18


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``queries @ entity.T`` against ``targets``, a block of entities at a time.

    Equal to ``F.cross_entropy(queries @ entity.T, targets, label_smoothing=ε)`` but never holds the
    (batch, N) scores: each block is recomputed in the backward pass while it is in cache. The whole
    product and its softmax are memory-bound on a CPU; blocks made a WN18RR step (batch 250, 40,943
    entities) 1.4x faster on 2 AMD EPYC cores (bench/results/kge_step_time.json).  With ``dtype`` bf16 the
    blocks' products are bf16 (the softmax sums, the true tail's score and the gradients stay fp32).
    """

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, entity: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        chunk = max(64, _CE_CHUNK_FLOATS // max(1, len(queries)))
        low_queries, low_entity = queries.to(dtype or queries.dtype), entity.to(dtype or entity.dtype)  # or these
        lse = torch.full((len(queries),), -math.inf, dtype=queries.dtype, device=queries.device)
        for block in low_entity.split(chunk):
            lse = torch.logaddexp(lse, torch.logsumexp((low_queries @ block.t()).to(lse.dtype), dim=1))
        # -log p_t mixed with the mean of -log p_j over all j: lse - (1-ε) s_t - ε mean_j s_j
        loss = lse - (1 - label_smoothing) * (queries * entity[targets]).sum(1)
        if label_smoothing:  # the mean entity is a pass over the whole table: only when it counts
            loss = loss - label_smoothing * (queries @ entity.mean(0))
        loss = loss.mean()
        ctx.save_for_backward(queries, entity, targets, lse, low_queries, low_entity)
        ctx.chunk, ctx.label_smoothing = chunk, label_smoothing
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        queries, entity, targets, lse, low_queries, low_entity = ctx.saved_tensors
        eps, weight = ctx.label_smoothing, float(grad) / len(queries)
        grad_queries = torch.zeros_like(queries)
        grad_entity = torch.empty_like(entity)
        start = 0
        for block in low_entity.split(ctx.chunk):  # d loss / d score = softmax - (1-ε) onehot - ε/N
            probs = (low_queries @ block.t()).to(lse.dtype).sub_(lse[:, None]).exp_().mul_(weight)
            rows = grad_entity[start:start + len(block)]
            if block.dtype == grad_queries.dtype:
                grad_queries.addmm_(probs, block)
                torch.mm(probs.t(), queries, out=rows)
            else:  # bf16 products, summed into the fp32 gradients
                probs = probs.to(block.dtype)
                grad_queries += probs @ block
                rows.copy_(probs.t() @ low_queries)
            start += len(block)
        grad_queries -= ((1 - eps) * weight) * entity[targets]
        grad_entity.index_add_(0, targets, queries, alpha=-(1 - eps) * weight)
        if eps:
            grad_queries -= (eps * weight) * entity.mean(0)
            grad_entity -= (eps * weight / len(entity)) * queries.sum(0)
        return grad_queries, grad_entity, None, None, None


def n3_penalty(model: KGEModel, batch: torch.Tensor, factors: tuple[torch.Tensor, ...] | None = None
               ) -> torch.Tensor:
    """N3 regulariser (Lacroix et al. 2018): Σ |factor|³ per batch example."""
    factors = model.factors(batch) if factors is None else factors
    return sum(f.pow(3).sum() for f in factors) / batch.shape[0]


def training_step(
    model: KGEModel,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    config: EmbedConfig,
    step: int,
    *,
    weights: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """One optimiser step on a batch of training examples; returns the loss.

    Negatives of step ``step`` come from a generator seeded by (seed, step),
    so a resumed run draws the same ones.
    """
    model.train()
    factors = None
    if config.resolved_loss == "1vsall":
        loss, factors = one_vs_all_loss(model, batch, config.label_smoothing, dtype)
    else:
        generator = seeded_generator(config.seed, 3, step)  # a CPU generator: the same negatives on every device
        shape = (config.num_negatives,) if config.shared_negatives else (len(batch), config.num_negatives)
        negatives = torch.randint(model.num_entities, shape, generator=generator).to(batch.device)
        corrupt_head = (not config.resolved_reciprocal) and step % 2 == 1  # alternate sides, as the RotatE code
        loss = nssa_loss(model, batch, weights, negatives, corrupt_head, config.adversarial_temperature)
    if config.regularizer_weight:  # None only when called directly: train_model resolves it (resolved_for)
        loss = loss + config.regularizer_weight * n3_penalty(model, batch, factors)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def step_timings(model: KGEModel, batch: torch.Tensor, config: EmbedConfig) -> dict[str, float]:
    """Milliseconds of a 1-vs-all forward and backward pass (with N3) of ``model`` on ``batch``, in fp32 and in
    bf16, one after the other; the optimiser's pass, the same in both, is left out, as are its updates."""
    from kgtok.runtime import timed_runs

    def step(dtype: torch.dtype) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)  # as a training step: gradients written, not added
            loss, factors = one_vs_all_loss(model, batch, config.label_smoothing, dtype)
            (loss + (config.regularizer_weight or 0.0) * n3_penalty(model, batch, factors)).backward()
            if batch.device.type == "cuda":
                torch.cuda.synchronize(batch.device)
        return run

    timings = timed_runs({name: step(DTYPES[name]) for name in ("fp32", "bf16")}, repeats=3)
    model.zero_grad(set_to_none=True)
    return timings


def training_precision(config: EmbedConfig, model: KGEModel, batch: torch.Tensor) -> tuple[str, dict[str, float]]:
    """fp32 or bf16 (:func:`kgtok.runtime.resolve_precision`, a GPU measured too), timed on ``batch`` once a
    machine (:func:`kgtok.runtime.measured_once`); fp32 where bf16 does not apply (nssa, distance models)."""
    from kgtok.runtime import measured_once, resolve_precision

    if not (config.resolved_loss == "1vsall" and config.model in BILINEAR):
        return "fp32", {}
    device = batch.device
    signature = {"pass": "embed 1vsall", "model": config.model, "dim": config.dim, "entities": model.num_entities,
                 "batch": len(batch), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    return resolve_precision(config.precision, device, lambda: measured_once(
        signature, lambda: step_timings(model, batch, config)), measure_gpu=True)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def save_checkpoint(path: Path, model: KGEModel, optimizer: torch.optim.Optimizer, state: TrainingState) -> None:
    torch_save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state.__dict__}, path)


def load_checkpoint(path: Path, model: KGEModel, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore a run from ``path``; whether it may resume at all is the work folder's record's call."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return TrainingState(**checkpoint["state"])


# ----------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------


def validation_mrr(model: KGEModel, kg: KnowledgeGraph, config: EmbedConfig, queries: torch.Tensor) -> float:
    ranked = rank_triples(
        model, queries, kg.filter_index, reciprocal=config.resolved_reciprocal,
        num_base_relations=kg.num_relations, batch_size=config.eval_batch_size,
    )
    return float(np.mean(1.0 / ranked.rank))


def validate(model: KGEModel, kg: KnowledgeGraph, config: EmbedConfig, valid: torch.Tensor, state: TrainingState,
             best_state: dict[str, Any], best_path: Path) -> dict[str, Any] | None:
    """Validation MRR into ``state``; the new best weights (also saved to ``best_path``) when it improved."""
    mrr = validation_mrr(model, kg, config, valid)
    state.history.append({"step": state.step, "loss": state.last_loss, "valid_mrr": mrr})
    if mrr <= state.best_mrr:
        state.bad_evaluations += 1
        return None
    state.best_mrr, state.best_step, state.bad_evaluations = mrr, state.step, 0
    best_state = copy.deepcopy(model.state_dict())
    torch_save_atomic(best_state, best_path)
    return best_state


def train_model(
    kg: KnowledgeGraph,
    config: EmbedConfig,
    work_dir: Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    on_validate: Callable[[TrainingState], bool] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[KGEModel, TrainingState]:
    """Train with early stopping; returns the model holding the best weights.

    ``work_dir`` keeps ``last.pt`` (resumable) and ``best.pt``.  ``stop_after``
    ends the process's work after that many steps, as a kill would (tests).
    ``on_validate(state)`` is called after each validation; True ends training
    there (the tuner's pruning and time budget).
    The model is returned on ``config.device`` (:func:`kgtok.runtime.resolve_device`);
    batch orders and negatives are drawn on the CPU, so only the arithmetic moves.
    """
    # Over 60 lines on purpose: the training loop written out top to bottom (STYLE: nanoGPT's recipes).
    work_dir.mkdir(parents=True, exist_ok=True)
    if config.regularizer_weight is None:
        config = config.resolved_for(kg)
        why = (f"0.2 / {len(kg.triples['train']) / kg.num_entities:.1f} training triples per entity"
               if config.resolved_loss == "1vsall" else f"none with loss {config.resolved_loss}")
        log(f"embed: N3 weight {config.regularizer_weight:.4g} ({why})")
    device = resolve_device(config.device)
    model, optimizer = build(config, kg, device)
    state = TrainingState(max_steps=config.max_steps)
    resumed = False
    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    if last_path.exists():
        saved = load_checkpoint(last_path, model, optimizer)
        # max_steps may change on resume, but not below the steps already trained (that run went further than
        # the new budget lets one go), nor under a decaying learning rate (its schedule is spread over max_steps)
        beyond = saved.step > config.max_steps
        rescheduled = config.lr_decay_from < 1.0 and saved.max_steps not in (0, config.max_steps)
        if beyond or rescheduled:
            log(f"embed: not resuming {last_path} (step {saved.step} of max_steps {saved.max_steps or '?'}): "
                + (f"max_steps={config.max_steps} is below it" if beyond else
                   f"the learning rate decays over max_steps={config.max_steps}") + "; starting afresh")
            model, optimizer = build(config, kg, device)
        else:
            state, resumed = saved, True
            state.max_steps = config.max_steps
            log(f"embed: resuming from {last_path} at step {state.step} (best valid MRR {state.best_mrr:.4f})")

    reciprocal = config.resolved_reciprocal
    examples = training_examples(kg, reciprocal)
    weights = (
        subsampling_weights(examples, kg.num_entities, examples[:, 1].max().item() + 1)
        if config.resolved_loss == "nssa" and config.subsampling else None
    )
    examples = examples.to(device)
    weights = None if weights is None else weights.to(device)
    if not resumed:  # a resumed run goes on in the precision it began in
        state.precision, state.precision_ms = training_precision(config, model, examples[:config.batch_size])
        if state.precision_ms:
            log(precision_line("embed", state.precision, state.precision_ms, "a step's forward and backward"))
    dtype = DTYPES[state.precision]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    eval_every = config.eval_every or steps_per_epoch
    valid = kg.valid
    if config.eval_max_queries and len(valid) > config.eval_max_queries:
        pick = torch.randperm(len(valid), generator=seeded_generator(config.seed, 1))[: config.eval_max_queries]
        valid = valid[pick.sort().values]
    best_state = copy.deepcopy(model.state_dict())
    if best_path.exists():
        best_state = torch.load(best_path, map_location="cpu", weights_only=True)

    bar = tqdm(total=config.max_steps, initial=state.step, desc=f"embed {config.model}", disable=not progress)
    epoch, order = -1, torch.empty(0, dtype=torch.long)
    steps_this_run = 0
    while state.step < config.max_steps and state.bad_evaluations < config.patience:
        if stop_after is not None and steps_this_run >= stop_after:
            break
        step = state.step
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(len(examples), generator=seeded_generator(config.seed, 2, epoch)).to(device)
        within = step % steps_per_epoch
        index = order[within * config.batch_size : (within + 1) * config.batch_size]
        if config.lr_decay_from < 1.0:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
        loss = training_step(model, optimizer, examples[index], config, step,
                             weights=None if weights is None else weights[index], dtype=dtype)
        state.step += 1
        steps_this_run += 1
        state.last_loss = loss
        bar.update(1)

        if state.step % eval_every == 0 or state.step == config.max_steps:
            best_state = validate(model, kg, config, valid, state, best_state, best_path) or best_state
            save_checkpoint(last_path, model, optimizer, state)
            message = (f"embed: step {state.step}  loss {state.last_loss:.4f}  "
                       f"valid MRR {state.history[-1]['valid_mrr']:.4f}  "
                       f"(best {state.best_mrr:.4f} at step {state.best_step})")
            (tqdm.write if progress else log)(message)
            if on_validate is not None and on_validate(state):
                break
        elif state.step % config.checkpoint_every == 0:
            save_checkpoint(last_path, model, optimizer, state)
        bar.set_postfix(loss=f"{state.last_loss:.4f}", valid_mrr=f"{max(state.best_mrr, 0):.4f}")
    bar.close()
    if stop_after is not None and state.step < config.max_steps and state.bad_evaluations < config.patience:
        raise InterruptedError(f"stopped after {steps_this_run} steps at step {state.step} (stop_after)")
    if state.best_mrr < 0:  # never validated (max_steps < eval_every cannot happen: last step validates)
        best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, state


def export(
    path: Path,
    model: KGEModel,
    kg: KnowledgeGraph,
    config: EmbedConfig,
    state: TrainingState | None,
    metrics: dict[str, Any],
    ranked: dict[str, RankedQueries],
) -> None:
    """Write the files of the artifact layout (:class:`kgtok.embed.layout.EmbedArtifact`)."""
    out = EmbedArtifact(path)
    model = model.cpu()  # the artifact's files never depend on where the model trained
    np.save(out.entity_embeddings, model.entity_embeddings().numpy().astype(np.float32))
    np.save(out.relation_embeddings, model.relation_embeddings().numpy().astype(np.float32))
    write_id_order(out.entities, kg.entity_names)
    write_id_order(out.relations, kg.relation_names)
    out.config_yaml.write_text(format_config(config), encoding="utf-8")
    torch.save({
        "state_dict": model.state_dict(), "model": config.model, "dim": config.dim, "margin": config.margin,
        "reciprocal": config.resolved_reciprocal, "num_entities": kg.num_entities,
        "num_base_relations": kg.num_relations,
    }, out.model)
    record = {
        **metrics,
        "best_step": state.best_step if state else None,
        "history": state.history if state else [],
        "per_relation_test": ranked["test"].evaluator().per_relation(kg.relation_names) if "test" in ranked else {},
    }
    write_json_atomic(out.metrics_path, record)
    for split, queries in ranked.items():
        if queries.candidates is not None:
            queries.save(out.candidates(split))


def load_model(artifact: str | Path) -> tuple[KGEModel, dict[str, Any]]:
    """Rebuild a trained model from an embed artifact (for scoring new queries)."""
    saved = torch.load(EmbedArtifact(artifact).checked().model, map_location="cpu", weights_only=False)
    relations = saved["num_base_relations"] * (2 if saved["reciprocal"] else 1)
    model = build_model(saved["model"], saved["num_entities"], relations, saved["dim"], margin=saved["margin"])
    model.load_state_dict(saved["state_dict"])
    return model, saved
