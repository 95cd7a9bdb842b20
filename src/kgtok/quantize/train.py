"""Stage 4 recipes: train the RQ-VAE (gsquant, rq, flat) or fit residual k-means (realm).

setup -> k-means initialisation -> epochs of (L_rec + L_Q [+ L_GSE] [+ L_GSR])
with dead-code restarts -> every ``eval_every`` epochs the mean codebook
entropy on held-out entities; the state with the highest entropy is kept
(GS-Quant's checkpoint selection), and training stops after ``patience``
evaluations without a higher entropy (the entropy plateaus well before the
epoch budget: on WN18RR the best of 60 epochs was epoch 26, and training stopped
after epoch 36; bench/results/quantizer_wn18rr.json).

Devices and processes: ``config.device`` places the model and the vectors
(``auto``: the GPU when present); every random draw stays on a CPU generator,
so a GPU run takes the same batches and restarts. Under ``accelerate launch``
(or ``torchrun``) with N processes, each process computes the loss of its
1/N of every batch and the gradients are averaged across processes before
each step (data parallelism, written out in :class:`Processes`), so every
process holds the same model throughout; only the first one saves checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from kgtok.config import config_to_dict
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.kmeans import kmeans
from kgtok.quantize.metrics import code_usage
from kgtok.quantize.model import RQVAE, Hierarchy, rqvae_losses
from kgtok.quantize.quantizer import (
    QuantizerOutput,
    distinct_codes,
    fit_residual_kmeans,
    residual_codes,
    sum_codewords,
)
from kgtok.runtime import Heartbeat, resolve_device, seeded_global_rng, torch_save_atomic

CHECKPOINT_FORMAT = 2  # 2: per-level Codebook modules (1: one stacked codebook tensor; not resumed)


@dataclass
class TrainingRecord:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_entropy: float = -1.0
    best_seconds: float = 0.0  # wall time from the start of training to the selected checkpoint
    stopped_epoch: int = 0  # last epoch trained (< epochs when stopped early)
    restarted_codes: int = 0


@dataclass(frozen=True)
class Processes:
    """The processes training one model together (``torch.distributed``); one process: rank 0 of 1.

    Each step every process takes its slice of the global batch (``share``),
    weighs its loss by its slice's share of the batch and ``reduce_gradients``
    sums the gradients: the result is the gradient of the whole batch's mean
    loss, as in one process. Codes and residuals of the whole batch, which
    usage tracking and dead-code restarts read, come back with ``gather``.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' tensors live: this process's GPU with nccl

    @classmethod
    def start(cls, device: torch.device) -> Processes:
        """Join the process group that ``accelerate launch``/``torchrun`` describe (``WORLD_SIZE`` > 1), else one."""
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)  # one GPU per process (LOCAL_RANK): nccl's communicator uses it
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=str(device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a batch's entity ids."""
        return torch.tensor_split(index, self.world)[self.rank] if self.world > 1 else index

    def broadcast(self, module: torch.nn.Module) -> None:
        """Every process takes the first one's weights and buffers (after k-means, whose threads may differ)."""
        if self.world > 1:
            import torch.distributed as dist

            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0)

    def reduce_gradients(self, module: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the processes (one flat all-reduce)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        parameters = [p for p in module.parameters() if p.requires_grad]
        for p in parameters:
            if p.grad is None:  # a process whose slice was empty
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in parameters])
        dist.all_reduce(flat)
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def gather(self, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The rows of every process's slice, in batch order (``sizes``: each slice's length)."""
        if self.world == 1:
            return rows
        import torch.distributed as dist

        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each key's sum over the processes."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(keys, total.cpu().tolist()))


@dataclass
class Training:
    """One RQ-VAE run: its fixed inputs and the state that a checkpoint saves."""

    x: torch.Tensor  # (N, in_dim)
    config: QuantizeConfig
    hierarchy: Hierarchy | None
    model: RQVAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every draw after module initialisation: split, order, k-means sample, restarts
    train_ids: torch.Tensor  # (N - held,)
    held_out: torch.Tensor  # (held,) entities for checkpoint selection
    batch_size: int
    codebook_size: int
    best_state: dict[str, Any]
    started: float  # perf_counter() at the start of training (moved back by the time before a resume)
    processes: Processes = field(default_factory=Processes)
    record: TrainingRecord = field(default_factory=TrainingRecord)
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    bad_evaluations: int = 0  # evaluations since the held-out entropy last rose

    @property
    def patience_spent(self) -> bool:
        return bool(self.config.patience) and self.bad_evaluations >= self.config.patience


def setup(x: torch.Tensor, config: QuantizeConfig, hierarchy: Hierarchy | None,
          device: torch.device | str = "cpu", processes: Processes = Processes()) -> Training:
    """Seeded model (drawn on the CPU, then moved to ``device``), held-out split and optimizer."""
    generator = torch.Generator().manual_seed(config.seed)
    n = len(x)
    levels, codebook_size = config.resolved_levels(), config.resolved_codebook_size(n)
    if (config.uses_gse or config.uses_gsr) and hierarchy is None:
        raise ValueError(f"variant {config.variant!r} with GSE/GSR needs a hierarchy (stage 3 artifact)")
    if hierarchy is not None and len(hierarchy.clusters) != n:
        raise ValueError(f"the hierarchy has paths for {len(hierarchy.clusters)} entities; "
                         f"the vectors are {n} entities")
    with seeded_global_rng(config.seed):  # module initialisation draws from the global generator
        model = RQVAE(x.shape[1], config, levels, codebook_size)
    model = model.to(device)
    x = x.to(device)
    hierarchy = hierarchy.to(device) if hierarchy is not None else None
    order = torch.randperm(n, generator=generator)
    held = max(1, int(round(n * config.holdout))) if config.holdout > 0 else 0
    held_out, train_ids = order[:held], order[held:]
    if held == 0:
        held_out = train_ids
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return Training(x=x, config=config, hierarchy=hierarchy, model=model, optimizer=optimizer, generator=generator,
                    train_ids=train_ids, held_out=held_out, batch_size=config.resolved_batch_size(n),
                    codebook_size=codebook_size, best_state=copy.deepcopy(model.state_dict()),
                    started=time.perf_counter(), processes=processes)


def checkpoint_key(x: torch.Tensor, config: QuantizeConfig, hierarchy: Hierarchy | None = None) -> str:
    """What a checkpoint must match to be resumed: the config, the input vectors and the tree GSE and GSR
    train against (another tree with the same vectors must start over)."""
    settings = {k: v for k, v in config_to_dict(config).items() if k != "threads"}  # threads change no number
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    tree = [] if hierarchy is None else [hierarchy.clusters, *hierarchy.centroids, *hierarchy.neighbours]
    for array in (x, *tree):
        digest.update(np.ascontiguousarray(array.cpu().numpy()).tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, key: str, run: Training) -> None:
    """Everything the loop needs to go on after epoch ``run.epoch`` exactly as if never stopped."""
    torch_save_atomic({"key": key, "format": CHECKPOINT_FORMAT, "model": run.model.state_dict(),
                       "optimizer": run.optimizer.state_dict(), "generator": run.generator.get_state(),
                       "record": dataclasses.asdict(run.record), "best_state": run.best_state, "epoch": run.epoch,
                       "step": run.step, "bad_evaluations": run.bad_evaluations,
                       "elapsed": time.perf_counter() - run.started}, path)


def resume(path: Path, key: str, run: Training, log: Callable[[str], None]) -> None:
    """Load a checkpoint of the same config and input into ``run``; any other is left alone."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("key") != key or saved.get("format") != CHECKPOINT_FORMAT:
        log(f"quantize: {path} is from another config, input or kgtok version; starting afresh")
        return
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.generator.set_state(saved["generator"])
    run.record, run.best_state = TrainingRecord(**saved["record"]), saved["best_state"]
    run.epoch, run.step, run.bad_evaluations = saved["epoch"], saved["step"], saved["bad_evaluations"]
    run.started -= saved["elapsed"]
    log(f"quantize: resumed after epoch {saved['epoch']} from {path}")


@torch.no_grad()
def initialise_codebooks(run: Training) -> None:
    """k-means on the encoded residuals of a sample of training entities seeds every codebook."""
    sample = torch.randperm(len(run.train_ids), generator=run.generator)[: max(20 * run.codebook_size, 4096)]
    rows = run.train_ids[sample].to(run.x.device)
    run.model.quantizer.kmeans_init(run.model.encoder(run.x[rows]), seed=run.config.seed)
    run.processes.broadcast(run.model)


def train_epoch(run: Training, bar: tqdm) -> dict[str, float]:
    """One pass over the training entities in a fresh order; returns each loss term's mean as ``loss_<term>``."""
    config, model = run.config, run.model
    model.train()
    permutation = run.train_ids[torch.randperm(len(run.train_ids), generator=run.generator)]
    centre_codes = None
    if config.uses_gse:
        # Cluster centres in code space are the targets of GSE: encoded once an epoch, without
        # gradient (as a target network). Encoding every centre of every level at every step
        # cost ~10 GFLOP a step on WN18RR (5,678 centres) for no better codes.
        with torch.no_grad():
            centre_codes = [model.encoder(c) for c in run.hierarchy.centroids]
    totals: dict[str, float] = {}
    processes, device = run.processes, run.x.device
    for start in range(0, len(permutation), run.batch_size):
        batch = permutation[start : start + run.batch_size]  # the global batch (every process alike)
        index = processes.share(batch).to(device)  # this process's slice (all of it in one process)
        run.optimizer.zero_grad(set_to_none=True)
        if len(index):
            clusters = run.hierarchy.clusters[index] if run.hierarchy is not None else None  # (batch, levels)
            terms, out = rqvae_losses(model, config, run.x[index], clusters, run.hierarchy, centre_codes,
                                      run.step)
            loss = sum(terms.values())
            if processes.world > 1:  # slices weigh by their size: summed, the whole batch's mean
                loss = loss * (len(index) / len(batch))
            loss.backward()
        processes.reduce_gradients(model)
        run.optimizer.step()
        run.step += 1
        if processes.world > 1:  # usage and restarts read the whole batch, so every process stays alike
            out, terms = _whole_batch(processes, batch, out if len(index) else _empty_output(model, config),
                                      terms if len(index) else dict.fromkeys(_loss_terms(config), 0.0), len(index))
        model.quantizer.mark_used(out.codes, run.step)
        if config.dead_code_restart and run.step % config.dead_after == 0:  # periodic: let codes settle
            run.record.restarted_codes += model.quantizer.restart_dead_codes(out, run.step, config.dead_after,
                                                                             run.generator)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(batch)
        bar.update(1)
    return {f"loss_{k}": v / len(run.train_ids) for k, v in totals.items()}


def evaluate(run: Training, entry: dict[str, float]) -> None:
    """Held-out mean code entropy and reconstruction into ``entry``; keeps the state of the highest entropy."""
    held_out = run.x[run.held_out.to(run.x.device)]  # (held, in_dim)
    codes = run.model.encode(held_out)
    entry["heldout_entropy"] = float(np.mean(code_usage(codes.cpu().numpy(), run.codebook_size)["entropy"]))
    entry["heldout_rec_mse"] = float((run.model.decode(codes) - held_out).pow(2).sum(1).mean())
    entry["seconds"] = time.perf_counter() - run.started
    if entry["heldout_entropy"] > run.record.best_entropy:
        run.record.best_entropy, run.record.best_epoch = entry["heldout_entropy"], entry["epoch"]
        run.record.best_seconds = entry["seconds"]
        run.best_state = copy.deepcopy(run.model.state_dict())
        run.bad_evaluations = 0
    else:
        run.bad_evaluations += 1


def train_rqvae(
    x: torch.Tensor,
    config: QuantizeConfig,
    hierarchy: Hierarchy | None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    checkpoint: Path | None = None,
) -> tuple[RQVAE, TrainingRecord]:
    """Train the RQ-VAE on (N, in_dim) vectors; returns the highest-entropy checkpoint.

    With ``checkpoint`` the state after every evaluated epoch is saved there,
    and a matching file found at the start is resumed: the same epochs follow
    as in an uninterrupted run (the tests check the codes are identical).
    """
    device = resolve_device(config.device)
    processes = Processes.start(device)
    run = setup(x, config, hierarchy, device, processes)
    key = checkpoint_key(x, config, hierarchy) if checkpoint is not None else ""
    if checkpoint is not None and checkpoint.exists():
        resume(checkpoint, key, run, log)
    if config.kmeans_init and run.epoch == 0:
        initialise_codebooks(run)
    steps_per_epoch = math.ceil(len(run.train_ids) / run.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=run.epoch * steps_per_epoch,
               desc=f"quantize {config.variant}", disable=not progress)
    stopped = run.epoch > 0 and run.patience_spent  # a resumed run that had already stopped
    beat = Heartbeat(None if progress or not processes.main else log)
    for epoch in range(run.epoch + 1, 1 if stopped else config.epochs + 1):
        entry: dict[str, float] = {"epoch": epoch, **train_epoch(run, bar)}
        beat(lambda: f"quantize: epoch {epoch} of {config.epochs}, loss {_total_loss(entry):.4f}")
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            evaluate(run, entry)
            bar.set_postfix(loss=f"{_total_loss(entry):.4f}", entropy=f"{entry['heldout_entropy']:.3f}")
        run.record.history.append(entry)
        run.record.stopped_epoch = run.epoch = epoch
        if checkpoint is not None and "heldout_entropy" in entry and processes.main:
            save_checkpoint(checkpoint, key, run)
        if run.patience_spent:
            log(f"quantize: held-out entropy has not risen for {run.bad_evaluations} evaluations; "
                f"stopping at epoch {epoch} (best {run.record.best_epoch})")
            break
    bar.close()
    run.model.load_state_dict(run.best_state)
    run.model.eval()
    return run.model.cpu(), run.record  # on the CPU: what the tokenizer keeps never depends on the device


def _total_loss(entry: dict[str, float]) -> float:
    """The sum of an epoch's loss terms (``loss_*`` of its history entry)."""
    return sum(v for k, v in entry.items() if k.startswith("loss_"))


def _loss_terms(config: QuantizeConfig) -> list[str]:
    """The names of the loss terms ``rqvae_losses`` returns for ``config``."""
    return ["rec", "vq", *(["gse"] if config.uses_gse else []), *(["gsr"] if config.uses_gsr else [])]


def _whole_batch(processes: Processes, batch: torch.Tensor, local: QuantizerOutput, terms: dict[str, Any],
                 rows: int) -> tuple[QuantizerOutput, dict[str, torch.Tensor]]:
    """Codes, residuals and codewords of the whole batch, and its mean loss terms, from every process's slice."""
    sizes = [len(part) for part in torch.tensor_split(batch, processes.world)]
    whole = dataclasses.replace(local, **{name: processes.gather(getattr(local, name), sizes)
                                          for name in ("codes", "residuals", "codewords")})
    summed = processes.sum({k: float(v) * rows for k, v in terms.items()})
    return whole, {k: torch.tensor(v / len(batch)) for k, v in summed.items()}


def _empty_output(model: RQVAE, config: QuantizeConfig) -> Any:
    """A zero-row stand-in for the output of a process whose slice of the batch was empty."""
    levels, dim = model.quantizer.levels, config.code_dim
    device = next(model.parameters()).device
    empty = torch.zeros(0, levels, dim, device=device)
    return QuantizerOutput(codes=torch.zeros(0, levels, dtype=torch.long, device=device),
                           quantized=torch.zeros(0, dim, device=device), prefixes=[], surrogates=empty,
                           codewords=empty, residuals=empty, vq_loss=torch.zeros((), device=device))


# ReaLM's nearest-code search: without the per-row ||r||², in blocks of 65,536 rows (see kmeans.nearest).
REALM_SEARCH: Mapping[str, Any] = MappingProxyType({"row_norms": False, "batch": 65536})  # read-only


def fit_realm(x: torch.Tensor, config: QuantizeConfig, levels: int, codebook_size: int, *,
              progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ReaLM: greedy residual k-means, one codebook per stage. Returns (codebooks (m, K, d), codes (N, m)).

    With ``realm_assignment="distinct"`` the last level's codes are then
    re-chosen so that entities sharing every earlier code differ there
    (:func:`~kgtok.quantize.quantizer.distinct_codes`): the codebooks stay.
    The k-means is faiss's on the CPU; with ``config.device`` a GPU, the nearest-code searches run there.
    """
    device = resolve_device(config.device)
    with tqdm(total=levels, desc="realm stages", disable=not progress) as bar:
        def fit_level(level: int, residual: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return kmeans(residual, codebook_size, iterations=config.realm_kmeans_iterations,
                          seed=config.seed + level).to(device)

        codebooks, codes = fit_residual_kmeans(x.to(device), levels, fit_level, **REALM_SEARCH)
    codebooks, codes = codebooks.cpu(), codes.cpu()
    if config.realm_assignment == "distinct":
        codes[:, -1] = distinct_last_level(x, codebooks, codes)
    return codebooks, codes


def distinct_last_level(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N,) last-level codes, distinct among entities whose earlier codes (N, m-1) are equal."""
    prefix = codes[:, :-1]  # (N, m-1)
    residual = x - sum_codewords(prefix, codebooks, x.shape[1])  # (N, d) r_{m-1}
    if prefix.shape[1]:
        groups = torch.unique(prefix, dim=0, return_inverse=True)[1].reshape(-1)
    else:
        groups = torch.zeros(len(x), dtype=torch.long)
    return distinct_codes(residual, codebooks[-1], groups, **REALM_SEARCH)


def realm_codes(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual codes (n, m) of new vectors under ReaLM's fitted codebooks (m, K, d)."""
    return residual_codes(x, codebooks, **REALM_SEARCH)
