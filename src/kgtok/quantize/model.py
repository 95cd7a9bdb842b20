"""The GS-Quant RQ-VAE: encoder, residual quantizer, decoder, GSE and GSR, and its training losses.

Read top to bottom: the encoder and decoder are MLPs around the
:class:`~kgtok.quantize.quantizer.ResidualQuantizer` (per-level codebooks and
the residual loop, with its gradient paths); GSE and GSR are plain functions
and a small module; :func:`rqvae_losses` adds up one batch's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.quantizer import QuantizerOutput, ResidualQuantizer
from kgtok.runtime import seeded_generator


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder -> residual quantizer -> decoder, plus the GSR decoder when used."""

    def __init__(self, in_dim: int, config: QuantizeConfig, levels: int, codebook_size: int) -> None:
        super().__init__()
        hidden = list(config.encoder_hidden)
        self.encoder = mlp([in_dim, *hidden, config.code_dim])
        self.quantizer = ResidualQuantizer(levels, codebook_size, config.code_dim,
                                           shared=config.variant == "flat", beta=config.beta,
                                           vq_sum=config.vq_loss == "sum")
        self.decoder = mlp([config.code_dim, *reversed(hidden), in_dim])
        self.gsr = (GSRDecoder(levels, config.code_dim, in_dim, config.gsr.layers, config.gsr.heads, config.gsr.width)
                    if config.uses_gsr else None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """(n, in_dim) -> (n, levels) codes."""
        self.eval()
        return torch.cat([self.quantizer(self.encoder(x[s : s + batch])).codes for s in range(0, len(x), batch)])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """(n, levels) codes -> (n, in_dim) decoder output: what the codes rebuild, without searching again."""
        self.eval()
        return torch.cat([self.decoder(self.quantizer.indices_to_vectors(codes[s : s + batch]))
                          for s in range(0, len(codes), batch)])


@dataclass
class Hierarchy:
    """What GSE and GSR need from stage 3, as tensors, re-levelled to the code levels."""

    clusters: torch.Tensor  # (N, levels) cluster id per code level
    centroids: list[torch.Tensor]  # levels x (k_l, in_dim)
    neighbours: list[torch.Tensor]  # levels x (k_l, n)

    def to(self, device: torch.device | str) -> Hierarchy:
        """The same tree with its tensors on ``device``."""
        return Hierarchy(clusters=self.clusters.to(device), centroids=[c.to(device) for c in self.centroids],
                         neighbours=[n.to(device) for n in self.neighbours])

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], levels: int) -> Hierarchy:
        depth = arrays["paths"].shape[1]
        pick = [min(level, depth - 1) for level in range(levels)]  # deeper code levels reuse the last tree level
        return cls(
            clusters=torch.as_tensor(arrays["paths"][:, pick], dtype=torch.long),
            centroids=[torch.as_tensor(arrays["centroids"][p], dtype=torch.float32) for p in pick],
            neighbours=[torch.as_tensor(arrays["neighbours"][p], dtype=torch.long) for p in pick],
        )


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
    samples: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """GSE: per level, L1 pulls p_l toward its cluster centre, L2 pushes it from neighbouring centres.

    Parameters
    ----------
    prefixes : levels x (batch, dim) GSE operands.
    centre_codes : levels x (k_l, dim) cluster centres mapped into code space.
    clusters : (batch, levels) the entity's cluster id at each level.
    neighbours : levels x (k_l, n) neighbouring cluster ids (-1 pads).
    samples : per level None (L1 contrasts all k_l centres) or (M,) centre ids: L1 contrasts the own
        centre with these (the own one masked out where drawn), so a step costs batch x M, not batch x k_l.

    L1 (contrastive, cosine / τ) is cross-entropy of the own centre among all
    level-l centres (or the sampled ones); L2 is cross-entropy of the own centre
    against only its neighbours (the hard negatives), weights λ1^(l+1)/m and λ2^(m-l)/m.
    Returns (total, per-level L1, per-level L2).
    """
    m = len(prefixes)
    total = prefixes[0].new_zeros(())
    l1_terms, l2_terms = [], []
    for level in range(m):
        p = F.normalize(prefixes[level], dim=1)  # (batch, dim)

        def centres(ids: torch.Tensor, level: int = level) -> torch.Tensor:  # unit rows: only those used (k_l grows)
            return F.normalize(centre_codes[level][ids], dim=-1)

        own = clusters[:, level]  # (batch,)
        l1 = l2 = p.new_zeros(())
        if use_l1:
            sample = samples[level] if samples is not None else None
            if sample is None:
                l1 = F.cross_entropy(p @ F.normalize(centre_codes[level], dim=1).t() / temperature, own)
            else:
                positive = (p * centres(own)).sum(1, keepdim=True)  # (batch, 1)
                negative = (p @ centres(sample).t()).masked_fill(sample[None, :] == own[:, None], float("-inf"))
                l1 = F.cross_entropy(torch.cat([positive, negative], 1) / temperature, torch.zeros_like(own))
        if use_l2:
            near = neighbours[level][own]  # (batch, n)
            valid = near >= 0
            if valid.any():
                candidates = torch.cat([own.unsqueeze(1), near.clamp(min=0)], dim=1)  # (batch, 1 + n)
                picked = torch.bmm(centres(candidates), p.unsqueeze(2)).squeeze(2) / temperature
                picked = picked.masked_fill(torch.cat([torch.ones_like(own.unsqueeze(1), dtype=torch.bool), valid], 1)
                                            .logical_not(), float("-inf"))
                l2 = F.cross_entropy(picked, torch.zeros_like(own))
        l1_terms.append(l1)
        l2_terms.append(l2)
        total = total + (lambda1 ** (level + 1) / m) * l1 + (lambda2 ** (m - level) / m) * l2
    return total, l1_terms, l2_terms


def l1_samples(centre_codes: list[torch.Tensor], negatives: int, seed: int, step: int
               ) -> list[torch.Tensor | None]:
    """Per level: None where it has at most ``negatives`` centres, else that many ids drawn uniformly (with
    replacement) from a generator seeded by (seed, step): a resumed run, and every process of a DDP run,
    draw the same."""
    generator = seeded_generator(seed, step)
    return [None if len(c) <= negatives else torch.randint(len(c), (negatives,), generator=generator).to(c.device)
            for c in centre_codes]


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


def rqvae_losses(model: RQVAE, config: QuantizeConfig, batch: torch.Tensor, clusters: torch.Tensor | None,
                 hierarchy: Hierarchy | None, centre_codes: list[torch.Tensor] | None, step: int = 0
                 ) -> tuple[dict[str, torch.Tensor], QuantizerOutput]:
    """One batch's loss terms: L_rec + L_Q [+ L_GSE] [+ L_GSR], and its (batch, levels) codes.

    batch (batch, in_dim); clusters (batch, levels) its cluster ids (GSE, GSR);
    centre_codes levels x (k_l, code_dim) the cluster centres in code space (GSE); step seeds L1's sample.
    """
    z = model.encoder(batch)  # (batch, code_dim)
    out = model.quantizer(z)
    terms = {
        "rec": (model.decoder(out.quantized) - batch).pow(2).sum(1).mean(),
        "vq": out.vq_loss,
    }
    if config.uses_gse:
        terms["gse"], _, _ = gse_losses(
            out.prefixes, centre_codes, clusters, hierarchy.neighbours,
            lambda1=config.gse.lambda1, lambda2=config.gse.lambda2, temperature=config.gse.temperature,
            use_l1=config.gse.l1, use_l2=config.gse.l2,
            samples=l1_samples(centre_codes, config.gse.resolved_l1_negatives, config.seed, step),
        )
    if config.uses_gsr:
        ancestors = torch.stack([c[clusters[:, level]]
                                 for level, c in enumerate(hierarchy.centroids)], dim=1)  # (batch, m, in_dim)
        terms["gsr"] = gsr_loss(model.gsr(out.surrogates), batch, ancestors, config.gsr.lambda_s, config.gsr.lambda_h)
    return terms, out
