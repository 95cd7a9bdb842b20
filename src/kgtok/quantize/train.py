"""Stage 4 recipes: train the RQ-VAE (gsquant, rq, flat) or fit residual k-means (realm).

setup -> k-means initialisation -> epochs of (L_rec + L_Q [+ L_GSE] [+ L_GSR])
with dead-code restarts -> every ``eval_every`` epochs the mean codebook
entropy on held-out entities; the state with the highest entropy is kept
(GS-Quant's checkpoint selection), and training stops after ``patience``
evaluations without a higher entropy (the entropy plateaus well before the
epoch budget: on WN18RR the best of 60 epochs was epoch 24).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kgtok.config import config_to_dict
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.kmeans import assign, kmeans
from kgtok.quantize.model import GSRDecoder, ResidualQuantizer, gse_losses, gsr_loss, mlp
from kgtok.runtime import torch_save_atomic


def code_entropy(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """(levels,) entropy in nats of each level's code distribution."""
    out = []
    for level in range(codes.shape[1]):
        p = np.bincount(codes[:, level], minlength=codebook_size) / len(codes)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return np.asarray(out)


class RQVAE(nn.Module):
    """Encoder -> residual quantizer -> decoder, plus the GSR decoder when used."""

    def __init__(self, in_dim: int, config: QuantizeConfig, levels: int, codebook_size: int) -> None:
        super().__init__()
        hidden = list(config.encoder_hidden)
        self.encoder = mlp([in_dim, *hidden, config.code_dim])
        self.quantizer = ResidualQuantizer(levels, codebook_size, config.code_dim,
                                           shared=config.variant == "flat", beta=config.beta)
        self.decoder = mlp([config.code_dim, *reversed(hidden), in_dim])
        self.gsr = (GSRDecoder(levels, config.code_dim, in_dim, config.gsr.layers, config.gsr.heads, config.gsr.width)
                    if config.uses_gsr else None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """(n, in_dim) -> (n, levels) codes."""
        self.eval()
        return torch.cat([self.quantizer(self.encoder(x[s : s + batch])).codes for s in range(0, len(x), batch)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        self.eval()
        return torch.cat([self.decoder(self.quantizer(self.encoder(x[s : s + batch])).quantized)
                          for s in range(0, len(x), batch)])


@dataclass
class Hierarchy:
    """What GSE and GSR need from stage 3, as tensors, re-levelled to the code levels."""

    clusters: torch.Tensor  # (N, levels) cluster id per code level
    centroids: list[torch.Tensor]  # levels x (k_l, in_dim)
    neighbours: list[torch.Tensor]  # levels x (k_l, n)

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], levels: int) -> Hierarchy:
        depth = arrays["paths"].shape[1]
        pick = [min(level, depth - 1) for level in range(levels)]  # deeper code levels reuse the last tree level
        return cls(
            clusters=torch.as_tensor(arrays["paths"][:, pick], dtype=torch.long),
            centroids=[torch.as_tensor(arrays["centroids"][p], dtype=torch.float32) for p in pick],
            neighbours=[torch.as_tensor(arrays["neighbours"][p], dtype=torch.long) for p in pick],
        )


@dataclass
class TrainingRecord:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_entropy: float = -1.0
    best_seconds: float = 0.0  # wall time from the start of training to the selected checkpoint
    stopped_epoch: int = 0  # last epoch trained (< epochs when stopped early)
    restarted_codes: int = 0


def _save_checkpoint(path: Path, key: str, model: RQVAE, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, record: TrainingRecord, best_state: dict[str, Any],
                     epoch: int, step: int, bad_evaluations: int, elapsed: float) -> None:
    """Everything the loop needs to go on after epoch ``epoch`` exactly as if never stopped."""
    torch_save_atomic({"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "generator": generator.get_state(), "record": dataclasses.asdict(record),
                       "best_state": best_state, "epoch": epoch, "step": step, "bad_evaluations": bad_evaluations,
                       "elapsed": elapsed}, path)


def checkpoint_key(x: torch.Tensor, config: QuantizeConfig) -> str:
    """What a checkpoint must match to be resumed: the config and the input vectors."""
    settings = {k: v for k, v in config_to_dict(config).items() if k != "threads"}  # threads change no number
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(x.numpy()).tobytes())
    return digest.hexdigest()


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
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # module initialisation draws from the global generator
    n = len(x)
    levels, codebook_size = config.resolved_levels(), config.resolved_codebook_size(n)
    if (config.uses_gse or config.uses_gsr) and hierarchy is None:
        raise ValueError(f"variant {config.variant!r} with GSE/GSR needs a hierarchy (stage 3 artifact)")
    model = RQVAE(x.shape[1], config, levels, codebook_size)
    order = torch.randperm(n, generator=generator)
    held = max(1, int(round(n * config.holdout))) if config.holdout > 0 else 0
    held_out, train_ids = order[:held], order[held:]
    if held == 0:
        held_out = train_ids
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    started = time.perf_counter()
    record = TrainingRecord()
    bad_evaluations = 0
    best_state = copy.deepcopy(model.state_dict())
    batch_size = config.resolved_batch_size(n)
    steps_per_epoch = math.ceil(len(train_ids) / batch_size)
    step, first_epoch = 0, 1
    resume_key = checkpoint_key(x, config) if checkpoint is not None else ""
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved.get("key") == resume_key:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            record, best_state = TrainingRecord(**saved["record"]), saved["best_state"]
            step, first_epoch, bad_evaluations = saved["step"], saved["epoch"] + 1, saved["bad_evaluations"]
            started -= saved["elapsed"]
            log(f"quantize: resumed after epoch {saved['epoch']} from {checkpoint}")
        else:
            log(f"quantize: {checkpoint} is from another config or input; starting afresh")
    if config.kmeans_init and first_epoch == 1:
        sample = train_ids[torch.randperm(len(train_ids), generator=generator)[: max(20 * codebook_size, 4096)]]
        with torch.no_grad():
            model.quantizer.kmeans_init(model.encoder(x[sample]), seed=config.seed)
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=(first_epoch - 1) * steps_per_epoch,
               desc=f"quantize {config.variant}", disable=not progress)
    stop = first_epoch > 1 and config.patience and bad_evaluations >= config.patience
    for epoch in range(first_epoch, 1 if stop else config.epochs + 1):
        model.train()
        permutation = train_ids[torch.randperm(len(train_ids), generator=generator)]
        totals: dict[str, float] = {}
        centre_codes = None
        if config.uses_gse:
            # Cluster centres in code space are the targets of GSE: encoded once an epoch, without
            # gradient (as a target network). Encoding every centre of every level at every step
            # cost ~10 GFLOP a step on WN18RR (5,678 centres) for no better codes.
            with torch.no_grad():
                centre_codes = [model.encoder(c) for c in hierarchy.centroids]
        for start in range(0, len(permutation), batch_size):
            index = permutation[start : start + batch_size]
            batch = x[index]  # (batch, in_dim)
            z = model.encoder(batch)  # (batch, code_dim)
            out = model.quantizer(z)
            terms = {
                "rec": (model.decoder(out.quantized) - batch).pow(2).sum(1).mean(),
                "vq": out.vq_loss,
            }
            if config.uses_gse:
                terms["gse"], _, _ = gse_losses(
                    out.prefixes, centre_codes, hierarchy.clusters[index], hierarchy.neighbours,
                    lambda1=config.gse.lambda1, lambda2=config.gse.lambda2, temperature=config.gse.temperature,
                    use_l1=config.gse.l1, use_l2=config.gse.l2,
                )
            if config.uses_gsr:
                ancestors = torch.stack([c[hierarchy.clusters[index, level]]
                                         for level, c in enumerate(hierarchy.centroids)], dim=1)  # (batch, m, in_dim)
                terms["gsr"] = gsr_loss(model.gsr(out.surrogates), batch, ancestors,
                                        config.gsr.lambda_s, config.gsr.lambda_h)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            model.quantizer.mark_used(out.codes, step)
            if config.dead_code_restart and step % config.dead_after == 0:  # periodic: let codes settle
                record.restarted_codes += model.quantizer.restart_dead_codes(out, step, config.dead_after, generator)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(index)
            bar.update(1)
        entry = {"epoch": epoch, **{f"loss_{k}": v / len(train_ids) for k, v in totals.items()}}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            codes = model.encode(x[held_out]).numpy()
            entropy = code_entropy(codes, codebook_size)
            entry["heldout_entropy"] = float(entropy.mean())
            entry["heldout_rec_mse"] = float((model.reconstruct(x[held_out]) - x[held_out]).pow(2).sum(1).mean())
            entry["seconds"] = time.perf_counter() - started
            if entry["heldout_entropy"] > record.best_entropy:
                record.best_entropy, record.best_epoch = entry["heldout_entropy"], epoch
                record.best_seconds = entry["seconds"]
                best_state = copy.deepcopy(model.state_dict())
                bad_evaluations = 0
            else:
                bad_evaluations += 1
            bar.set_postfix(loss=f"{sum(v for k, v in entry.items() if k.startswith('loss_')):.4f}",
                            entropy=f"{entry['heldout_entropy']:.3f}")
        record.history.append(entry)
        record.stopped_epoch = epoch
        if checkpoint is not None and "heldout_entropy" in entry:
            _save_checkpoint(checkpoint, resume_key, model, optimizer, generator, record, best_state, epoch, step,
                             bad_evaluations, time.perf_counter() - started)
        if config.patience and bad_evaluations >= config.patience:
            log(f"quantize: held-out entropy has not risen for {bad_evaluations} evaluations; "
                f"stopping at epoch {epoch} (best {record.best_epoch})")
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return model, record


def fit_residual_kmeans(x: torch.Tensor, levels: int, codebook_size: int, *, iterations: int, seed: int,
                        progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ReaLM: greedy residual k-means, one codebook per stage. Returns (codebooks (m, K, d), codes (N, m))."""
    residual = x.clone()
    books, codes = [], []
    for level in tqdm(range(levels), desc="realm stages", disable=not progress):
        centroids = kmeans(residual, codebook_size, iterations=iterations, seed=seed + level)
        code = assign(residual, centroids)
        residual = residual - centroids[code]
        books.append(centroids)
        codes.append(code)
    return torch.stack(books), torch.stack(codes, dim=1)


def residual_assign(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual codes of new vectors under fixed codebooks (m, K, d) -> (n, m)."""
    residual = x.clone()
    codes = []
    for level in range(codebooks.shape[0]):
        code = assign(residual, codebooks[level])
        residual = residual - codebooks[level][code]
        codes.append(code)
    return torch.stack(codes, dim=1)
