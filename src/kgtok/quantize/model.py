"""The GS-Quant RQ-VAE: encoder, residual quantizer, decoder, GSE and GSR.

Read top to bottom: the residual loop is written out in ``ResidualQuantizer.forward``
with shapes; GSE and GSR are plain functions and a small module.

Gradient paths (the reference code's defect 1 was that its residual update
``r_{l+1} = r_l - ṽ_l`` has zero gradient with respect to ``r_l``, so levels
>= 2 never trained the encoder):

* residual: ``r_{l+1} = r_l - sg(v_l)``, so ``∂r_{l+1}/∂r_l = I`` and every
  level's loss reaches the encoder;
* decoder input: the straight-through sum ``Σ_l (r_l + sg(v_l - r_l))`` (value
  ``Σ v_l``, gradient to the encoder);
* GSE operand at level l: the prefix ``p_l = Σ_{j<=l} (v_j + r_j - sg(r_j))``:
  its value is the sum of the first l+1 codewords (what the first l+1 codes
  mean), and its gradient reaches both the codebooks and the encoder, so the
  hierarchy shapes codewords as well as where entities land.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


@dataclass
class QuantizerOutput:
    codes: torch.Tensor  # (batch, levels) int64
    quantized: torch.Tensor  # (batch, dim) straight-through sum of the codewords
    prefixes: list[torch.Tensor]  # levels x (batch, dim): GSE operands p_l
    surrogates: torch.Tensor  # (batch, levels, dim) ṽ_l = r_l + sg(v_l - r_l): GSR's input
    codewords: torch.Tensor  # (batch, levels, dim) the chosen v_l (value only)
    residuals: torch.Tensor  # (batch, levels, dim) the r_l that were quantized
    vq_loss: torch.Tensor  # scalar: mean over levels of ||sg(r)-v||² + β||r-sg(v)||²


class ResidualQuantizer(nn.Module):
    """m levels of K codewords (or one codebook shared by every level)."""

    def __init__(self, levels: int, codebook_size: int, dim: int, *, shared: bool = False, beta: float = 0.25) -> None:
        super().__init__()
        self.levels, self.codebook_size, self.dim, self.shared, self.beta = levels, codebook_size, dim, shared, beta
        books = 1 if shared else levels
        self.codebooks = nn.Parameter(torch.randn(books, codebook_size, dim) * 0.01)  # (books, K, dim)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("last_used", torch.zeros(books, codebook_size, dtype=torch.long))

    def codebook(self, level: int) -> torch.Tensor:
        return self.codebooks[0 if self.shared else level]  # (K, dim)

    @staticmethod
    def nearest(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """argmin_k ||r - v_k||² for a batch: (batch, dim) x (K, dim) -> (batch,)."""
        distances = (residual.pow(2).sum(1, keepdim=True) - 2 * residual @ codebook.t()
                     + codebook.pow(2).sum(1).unsqueeze(0))  # (batch, K)
        return distances.argmin(dim=1)

    @torch.no_grad()
    def mark_used(self, codes: torch.Tensor, step: int) -> None:
        """Record the step at which each code of (batch, levels) was last chosen."""
        for level in range(codes.shape[1]):
            self.last_used[0 if self.shared else level, codes[:, level]] = step

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        residual = z  # r_0 = z, (batch, dim)
        quantized = torch.zeros_like(z)
        prefix = torch.zeros_like(z)
        codes, prefixes, codewords, residuals, surrogates = [], [], [], [], []
        vq_loss = z.new_zeros(())
        for level in range(self.levels):
            codebook = self.codebook(level)  # (K, dim)
            code = self.nearest(residual.detach(), codebook.detach())  # (batch,)
            v = codebook[code]  # (batch, dim), gradient to the codebook
            # L_Q: codebook term moves v toward r, commitment term moves r toward v.
            vq_loss = vq_loss + F.mse_loss(v, residual.detach()) + self.beta * F.mse_loss(residual, v.detach())
            surrogate = residual + (v - residual).detach()  # straight-through ṽ_l: value v, gradient to r
            quantized = quantized + surrogate
            surrogates.append(surrogate)
            prefix = prefix + v + residual - residual.detach()  # value Σ v, gradient to v and r
            prefixes.append(prefix)
            codes.append(code)
            codewords.append(v.detach())
            residuals.append(residual.detach())
            residual = residual - v.detach()  # r_{l+1} = r_l - sg(v_l): identity gradient to r_l
        return QuantizerOutput(
            codes=torch.stack(codes, 1), quantized=quantized, prefixes=prefixes, surrogates=torch.stack(surrogates, 1),
            codewords=torch.stack(codewords, 1), residuals=torch.stack(residuals, 1),
            vq_loss=vq_loss / self.levels,
        )

    @torch.no_grad()
    def indices_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """(batch, levels) codes -> (batch, dim) sum of their codewords."""
        out = torch.zeros(codes.shape[0], self.dim)
        for level in range(codes.shape[1]):
            out += self.codebook(level)[codes[:, level]]
        return out

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, seed: int, iterations: int = 20) -> None:
        """Seed each level's codebook by k-means on that level's residuals (defect 2 of the reference)."""
        from kgtok.quantize.kmeans import kmeans

        residual = z
        for level in range(self.levels):
            if self.shared and level > 0:
                break
            centroids = kmeans(residual, self.codebook_size, iterations=iterations, seed=seed + level)
            self.codebooks.data[0 if self.shared else level] = centroids
            residual = residual - centroids[self.nearest(residual, centroids)]
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, output: QuantizerOutput, step: int, dead_after: int,
                           generator: torch.Generator) -> int:
        """Re-seed codes unused for ``dead_after`` steps from the batch's worst-quantized residuals."""
        restarted = 0
        for book in range(self.codebooks.shape[0]):
            dead = torch.nonzero(step - self.last_used[book] >= dead_after).squeeze(1)
            if len(dead) == 0:
                continue
            level = 0 if self.shared else book
            error = (output.residuals[:, level] - output.codewords[:, level]).pow(2).sum(1)  # (batch,)
            worst = torch.argsort(error, descending=True)[: len(dead)]
            picks = output.residuals[worst, level]
            if len(picks) < len(dead):  # a batch smaller than the dead set: sample with repetition
                picks = picks[torch.randint(len(picks), (len(dead),), generator=generator)]
            noise = 0.01 * picks.std() * torch.randn(picks.shape, generator=generator)
            self.codebooks.data[book, dead] = picks + noise
            self.last_used[book, dead] = step
            restarted += len(dead)
        return restarted


class GSRDecoder(nn.Module):
    """Causal transformer over [ṽ_0..ṽ_{m-1}, q_0..q_m]: o_0 rebuilds s, o_i the ancestor h_{i-1}."""

    def __init__(self, levels: int, dim: int, out_dim: int, layers: int, heads: int, width: int | None = None) -> None:
        super().__init__()
        self.levels = levels
        width = width or dim
        self.project = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.queries = nn.Parameter(torch.randn(levels + 1, width) * 0.02)  # q_0..q_m
        self.position = nn.Parameter(torch.randn(2 * levels + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, out_dim)
        length = 2 * levels + 1
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), diagonal=1))

    def forward(self, code_vectors: torch.Tensor) -> torch.Tensor:
        """(batch, levels, dim) -> (batch, levels + 1, out_dim): o_0..o_m."""
        batch = code_vectors.shape[0]
        sequence = torch.cat([self.project(code_vectors), self.queries.expand(batch, -1, -1)], dim=1) + self.position
        hidden = self.blocks(sequence, mask=self.mask, is_causal=True)
        return self.head(hidden[:, self.levels :])


def gse_losses(
    prefixes: list[torch.Tensor],
    centre_codes: list[torch.Tensor],
    clusters: torch.Tensor,
    neighbours: list[torch.Tensor],
    *,
    lambda1: float,
    lambda2: float,
    temperature: float,
    use_l1: bool = True,
    use_l2: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """GSE: per level, L1 pulls p_l toward its cluster centre, L2 pushes it from neighbouring centres.

    Parameters
    ----------
    prefixes : levels x (batch, dim) GSE operands.
    centre_codes : levels x (k_l, dim) cluster centres mapped into code space.
    clusters : (batch, levels) the entity's cluster id at each level.
    neighbours : levels x (k_l, n) neighbouring cluster ids (-1 pads).

    L1 (contrastive, cosine / τ) is cross-entropy of the own centre among all
    level-l centres; L2 is cross-entropy of the own centre against only its
    neighbours (the hard negatives), weights λ1^(l+1)/m and λ2^(m-l)/m.
    Returns (total, per-level L1, per-level L2).
    """
    m = len(prefixes)
    total = prefixes[0].new_zeros(())
    l1_terms, l2_terms = [], []
    for level in range(m):
        p = F.normalize(prefixes[level], dim=1)  # (batch, dim)
        centres = F.normalize(centre_codes[level], dim=1)  # (k, dim)
        own = clusters[:, level]  # (batch,)
        logits = p @ centres.t() / temperature  # (batch, k)
        l1 = F.cross_entropy(logits, own) if use_l1 else logits.new_zeros(())
        l2 = logits.new_zeros(())
        if use_l2:
            near = neighbours[level][own]  # (batch, n)
            valid = near >= 0
            if valid.any():
                candidates = torch.cat([own.unsqueeze(1), near.clamp(min=0)], dim=1)  # (batch, 1 + n)
                picked = logits.gather(1, candidates)
                picked = picked.masked_fill(torch.cat([torch.ones_like(own.unsqueeze(1), dtype=torch.bool), valid], 1)
                                            .logical_not(), float("-inf"))
                l2 = F.cross_entropy(picked, torch.zeros_like(own))
        l1_terms.append(l1)
        l2_terms.append(l2)
        total = total + (lambda1 ** (level + 1) / m) * l1 + (lambda2 ** (m - level) / m) * l2
    return total, l1_terms, l2_terms


def gsr_loss(outputs: torch.Tensor, target: torch.Tensor, ancestors: torch.Tensor, lambda_s: float,
             lambda_h: float) -> torch.Tensor:
    """||o_0 - s||² + λs||o_1 - h_0||² + λh Σ_{i>=2} ||o_i - h_{i-1}||² (mean over the batch).

    outputs (batch, m+1, D); target (batch, D); ancestors (batch, m, D), h_0 the coarsest level.
    """
    loss = (outputs[:, 0] - target).pow(2).sum(1).mean()
    loss = loss + lambda_s * (outputs[:, 1] - ancestors[:, 0]).pow(2).sum(1).mean()
    if ancestors.shape[1] > 1:
        loss = loss + lambda_h * (outputs[:, 2:] - ancestors[:, 1:]).pow(2).sum(2).sum(1).mean()
    return loss
