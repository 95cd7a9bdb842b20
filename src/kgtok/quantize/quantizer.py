"""The residual quantizer, built from per-level codebooks, and the greedy residual loop.

``residual_levels`` is the one greedy residual loop of stage 4: the RQ-VAE's
forward pass, the k-means initialisation of its codebooks, ReaLM's residual
k-means and the codes of new vectors under fixed codebooks all run it, each
with its own way of picking a level's code.

Gradient path (the reference code's defect 1 was that its residual update
``r_{l+1} = r_l - ṽ_l`` has zero gradient with respect to ``r_l``, so levels
>= 2 never trained the encoder): ``r_{l+1} = r_l - sg(v_l)``, so
``∂r_{l+1}/∂r_l = I`` and every level's loss reaches the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kgtok.quantize.kmeans import kmeans, nearest

# (level, r_l) -> (c_l, v_l): a level's codes (batch,) and codewords (batch, dim)
PickCodes = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (level, r_l, c_l, v_l)
LevelStep = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def residual_levels(x: torch.Tensor, levels: int, pick: PickCodes) -> Iterator[LevelStep]:
    """The greedy residual loop: r_0 = x; per level (c_l, v_l) = pick(l, r_l); r_{l+1} = r_l - sg(v_l).

    Yields ``(level, r_l, c_l, v_l)``; the next residual is formed once the
    caller has used them.
    """
    residual = x  # r_0, (batch, dim)
    for level in range(levels):
        code, codeword = pick(level, residual)  # (batch,), (batch, dim)
        yield level, residual, code, codeword
        residual = next_residual(residual, codeword)


def next_residual(residual: torch.Tensor, codeword: torch.Tensor) -> torch.Tensor:
    """r_{l+1} = r_l - sg(v_l): ∂r_{l+1}/∂r_l = I, so every level's loss reaches the encoder.

    The public reference's r_{l+1} = r_l - ṽ_l (ṽ_l = r_l + sg(v_l - r_l)) has
    the same value and zero gradient; a test swaps it in to show its checks fail.
    """
    return residual - codeword.detach()


def residual_codes(x: torch.Tensor, codebooks: list[torch.Tensor] | torch.Tensor, *,
                   row_norms: bool = True, batch: int | None = None) -> torch.Tensor:
    """Greedy residual codes of (n, d) vectors under fixed codebooks (levels x (K, d)) -> (n, levels)."""
    def pick(level: int, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = nearest(residual, codebooks[level], row_norms=row_norms, batch=batch)
        return code, codebooks[level][code]

    codes = [code for _, _, code, _ in residual_levels(x, len(codebooks), pick)]
    return torch.stack(codes, dim=1)


def fit_residual_kmeans(x: torch.Tensor, levels: int, fit_level: Callable[[int, torch.Tensor], torch.Tensor], *,
                        row_norms: bool = True, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual k-means: level l's centroids (K, d) are ``fit_level(l, r_l)``, its codes the nearest.

    ReaLM's quantizer and the RQ-VAE's codebook initialisation. Returns
    (codebooks (levels, K, d), codes (n, levels)).
    """
    books = []

    def pick(level: int, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centroids = fit_level(level, residual)  # (K, d)
        books.append(centroids)
        code = nearest(residual, centroids, row_norms=row_norms, batch=batch)
        return code, centroids[code]

    codes = [code for _, _, code, _ in residual_levels(x, levels, pick)]
    return torch.stack(books), torch.stack(codes, dim=1)


def distinct_codes(residual: torch.Tensor, centroids: torch.Tensor, groups: torch.Tensor, *,
                   row_norms: bool = True, batch: int = 65536) -> torch.Tensor:
    """Codes (n,) of (n, d) residuals under (K, d) centroids, distinct within each group of <= K rows.

    groups : (n,) int64 group of each row (at the last level of residual
    k-means: the tuple of its earlier codes). Rows whose nearest code no other
    row of their group has keep it. The others are placed greedily, in
    rounds: each proposes its next nearest code not yet taken in its group,
    and of rows proposing the same code the nearest wins (ties: the lower
    row). A row that loses a round lost its candidate to another row of its
    group, so group-size candidates per row suffice. Rows of a group larger
    than K keep their nearest code (its collisions are left to the
    disambiguation code).
    """
    # Over 60 lines on purpose: one greedy pass over the colliding groups, written out with its shapes.
    k = len(centroids)
    groups = torch.as_tensor(groups, dtype=torch.long)
    code = nearest(residual, centroids, row_norms=row_norms, batch=batch)  # (n,)
    _, inverse, counts = torch.unique(groups * k + code, return_inverse=True, return_counts=True)
    _, group_inverse, group_counts = torch.unique(groups, return_inverse=True, return_counts=True)
    small = group_counts[group_inverse] <= k
    clash = torch.nonzero((counts[inverse] > 1) & small).squeeze(1)  # rows sharing (group, nearest code)
    if len(clash) == 0:
        return code
    # Occupancy of the groups that have clashing rows: (G', K), True where the code is taken.
    involved, local = torch.unique(groups[clash], return_inverse=True)
    group_of = torch.full((int(groups.max()) + 1,), -1, dtype=torch.long)
    group_of[involved] = torch.arange(len(involved))
    taken = torch.zeros(len(involved), k, dtype=torch.bool)
    settled = torch.ones(len(groups), dtype=torch.bool)
    settled[clash] = False
    keeps = settled & (group_of[groups] >= 0)  # rows of those groups whose code is already theirs alone
    taken[group_of[groups[keeps]], code[keeps]] = True
    group_sizes = torch.bincount(group_of[groups][group_of[groups] >= 0], minlength=len(involved))
    width = int(min(k, int(group_sizes.max())))
    candidates, candidate_distances = [], []  # (m, width) nearest codes first, their distances
    for start in range(0, len(clash), batch):
        rows = residual[clash[start : start + batch]]  # (b, d)
        distances = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ centroids.t() + centroids.pow(2).sum(1)
        values, indices = torch.topk(distances, width, dim=1, largest=False)  # (b, width)
        candidates.append(indices)
        candidate_distances.append(values)
    candidates, candidate_distances = torch.cat(candidates), torch.cat(candidate_distances)
    pending = torch.arange(len(clash))  # positions in clash
    rank = torch.zeros(len(clash), dtype=torch.long)  # each row's next candidate
    while len(pending):
        open_ = rank[pending] < width
        pending = pending[open_]  # rows out of candidates keep their nearest code
        if len(pending) == 0:
            break
        proposal = candidates[pending, rank[pending]]
        group = local[pending]
        free = ~taken[group, proposal]
        # Among free proposals of the same (group, code): the nearest row wins, ties to the lower row.
        contenders = pending[free]
        key = group[free] * k + proposal[free]
        distance = candidate_distances[contenders, rank[contenders]]
        order = np.lexsort((contenders.numpy(), distance.numpy(), key.numpy()))
        order = torch.from_numpy(order)
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = key[order][1:] != key[order][:-1]
        winners = contenders[order[first]]
        code[clash[winners]] = candidates[winners, rank[winners]]
        taken[local[winners], candidates[winners, rank[winners]]] = True
        won = torch.zeros(len(clash), dtype=torch.bool)
        won[winners] = True
        rank[pending] += 1
        pending = pending[~won[pending]]
    return code


def sum_codewords(codes: torch.Tensor, codebooks: list[torch.Tensor] | torch.Tensor, dim: int) -> torch.Tensor:
    """(n, levels) codes -> (n, dim) sum of their codewords; codebooks[l] is level l's (K, dim)."""
    out = torch.zeros(codes.shape[0], dim, device=codebooks[0].device)
    for level in range(codes.shape[1]):
        out += codebooks[level][codes[:, level]]
    return out


class Codebook(nn.Module):
    """K codewords of one level: nearest code, k-means initialisation, usage tracking, dead-code restart."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, dim)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("last_used", torch.zeros(len(weight), dtype=torch.long))  # step each code was last chosen

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, dim) -> nearest codes (batch,) and their codewords (batch, dim), with gradient to the codebook."""
        code = nearest(residual.detach(), self.weight.detach())
        return code, self.weight[code]

    @torch.no_grad()
    def kmeans_init(self, residual: torch.Tensor, *, seed: int, iterations: int = 20) -> torch.Tensor:
        """Set the codewords to k-means centroids of (n, dim) residuals (defect 2 of the reference)."""
        self.weight.data.copy_(kmeans(residual, len(self.weight), iterations=iterations, seed=seed))
        self.initialised.fill_(True)
        return self.weight.data

    @torch.no_grad()
    def mark_used(self, code: torch.Tensor, step: int) -> None:
        self.last_used[code] = step

    @torch.no_grad()
    def restart_dead(self, residual: torch.Tensor, codeword: torch.Tensor, step: int, dead_after: int,
                     generator: torch.Generator) -> int:
        """Re-seed codes unused for ``dead_after`` steps from the worst-quantized of (batch, dim) residuals."""
        dead = torch.nonzero(step - self.last_used >= dead_after).squeeze(1)
        if len(dead) == 0:
            return 0
        error = (residual - codeword).pow(2).sum(1)  # (batch,)
        picks = residual[torch.argsort(error, descending=True)[: len(dead)]]
        if len(picks) < len(dead):  # a batch smaller than the dead set: sample with repetition
            picks = picks[torch.randint(len(picks), (len(dead),), generator=generator).to(picks.device)]
        noise = 0.01 * picks.std() * torch.randn(picks.shape, generator=generator).to(picks.device)  # CPU draws
        self.weight.data[dead] = picks + noise
        self.last_used[dead] = step
        return len(dead)


@dataclass
class QuantizerOutput:
    codes: torch.Tensor  # (batch, levels) int64
    quantized: torch.Tensor  # (batch, dim) straight-through sum of the codewords
    prefixes: list[torch.Tensor]  # levels x (batch, dim): GSE operands p_l
    surrogates: torch.Tensor  # (batch, levels, dim) ṽ_l = r_l + sg(v_l - r_l): GSR's input
    codewords: torch.Tensor  # (batch, levels, dim) the chosen v_l (value only)
    residuals: torch.Tensor  # (batch, levels, dim) the r_l that were quantized
    vq_loss: torch.Tensor  # scalar: mean over levels of d(sg(r), v) + β d(r, sg(v)), d a mean (or sum) over dims


class ResidualQuantizer(nn.Module):
    """m levels, each a :class:`Codebook` of K codewords; ``shared``: one Codebook serves every level (flat).

    Outputs besides the codes (see :class:`QuantizerOutput`):

    * decoder input: the straight-through sum ``Σ_l (r_l + sg(v_l - r_l))``
      (value ``Σ v_l``; every r_l carries z's gradient, so the encoder gets the
      reconstruction's gradient m times over, not once as with ``z + sg(Σ v_l - z)``;
      kept, see docs/stage4-codes.md);
    * L_Q: per level ``d(sg(r_l), v_l) + β d(r_l, sg(v_l))`` with d the squared
      distance's mean over the dimensions (``vq_sum``: their sum, METHOD.md's
      norm; see ``QuantizeConfig.vq_loss``), averaged over levels;
    * GSE operand at level l: the prefix ``p_l = Σ_{j<=l} (v_j + r_j - sg(r_j))``:
      its value is the sum of the first l+1 codewords (what the first l+1
      codes mean), and its gradient reaches both the codebooks and the
      encoder, so the hierarchy shapes codewords as well as where entities land.
    """

    def __init__(self, levels: int, codebook_size: int, dim: int, *, shared: bool = False, beta: float = 0.25,
                 vq_sum: bool = False) -> None:
        super().__init__()
        self.levels, self.codebook_size, self.dim, self.shared, self.beta = levels, codebook_size, dim, shared, beta
        self.vq_scale = dim if vq_sum else 1  # a mean over the dims x dim = their sum
        initial = torch.randn(1 if shared else levels, codebook_size, dim) * 0.01  # (books, K, dim), one draw
        books = [Codebook(weight.clone()) for weight in initial]
        # The flat variant's state dict names its one codebook once per level (same tensor).
        self.codebooks = nn.ModuleList(books * levels if shared else books)
        self.register_load_state_dict_pre_hook(_upgrade_stacked_codebooks)

    def distinct_codebooks(self) -> list[Codebook]:
        """Each Codebook once, in level order: ``levels`` of them, or one when shared."""
        return list(self.codebooks)[:1] if self.shared else list(self.codebooks)

    def stacked_codebooks(self) -> torch.Tensor:
        """(books, K, dim) copy of the codewords; books = 1 when shared."""
        return torch.stack([book.weight.detach() for book in self.distinct_codebooks()])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        quantized = torch.zeros_like(z)  # (batch, dim)
        prefix = torch.zeros_like(z)
        codes, prefixes, codewords, residuals, surrogates = [], [], [], [], []
        vq_loss = z.new_zeros(())
        for _, residual, code, v in residual_levels(z, self.levels, lambda level, r: self.codebooks[level](r)):
            # L_Q: codebook term moves v toward r, commitment term moves r toward v.
            vq_loss = vq_loss + self.vq_scale * (
                F.mse_loss(v, residual.detach()) + self.beta * F.mse_loss(residual, v.detach()))
            surrogate = residual + (v - residual).detach()  # straight-through ṽ_l: value v, gradient to r
            quantized = quantized + surrogate
            surrogates.append(surrogate)
            prefix = prefix + v + residual - residual.detach()  # value Σ v, gradient to v and r
            prefixes.append(prefix)
            codes.append(code)
            codewords.append(v.detach())
            residuals.append(residual.detach())
        return QuantizerOutput(
            codes=torch.stack(codes, 1), quantized=quantized, prefixes=prefixes, surrogates=torch.stack(surrogates, 1),
            codewords=torch.stack(codewords, 1), residuals=torch.stack(residuals, 1),
            vq_loss=vq_loss / self.levels,
        )

    @torch.no_grad()
    def indices_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """(batch, levels) codes -> (batch, dim) sum of their codewords."""
        return sum_codewords(codes, [book.weight for book in self.codebooks], self.dim)

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, seed: int, iterations: int = 20) -> None:
        """Seed each level's codebook by k-means on that level's residuals (the shared one on r_0)."""
        fit_residual_kmeans(z, 1 if self.shared else self.levels,
                            lambda level, r: self.codebooks[level].kmeans_init(r, seed=seed + level,
                                                                                iterations=iterations))

    @torch.no_grad()
    def mark_used(self, codes: torch.Tensor, step: int) -> None:
        """Record the step at which each code of (batch, levels) was last chosen."""
        for level, book in enumerate(self.codebooks):
            book.mark_used(codes[:, level], step)

    @torch.no_grad()
    def restart_dead_codes(self, output: QuantizerOutput, step: int, dead_after: int,
                           generator: torch.Generator) -> int:
        """Re-seed each codebook's dead codes from the batch's worst-quantized residuals at its (first) level."""
        return sum(book.restart_dead(output.residuals[:, level], output.codewords[:, level], step, dead_after,
                                     generator)
                   for level, book in enumerate(self.distinct_codebooks()))


def _upgrade_stacked_codebooks(module: ResidualQuantizer, state_dict: dict, prefix: str, *_: object) -> None:
    """Read state saved before the per-level Codebooks: one (books, K, dim) ``codebooks`` tensor."""
    stacked = state_dict.get(prefix + "codebooks")
    if not isinstance(stacked, torch.Tensor):
        return
    del state_dict[prefix + "codebooks"]
    last_used = state_dict.pop(prefix + "last_used")  # (books, K)
    initialised = state_dict.pop(prefix + "initialised")
    for level in range(module.levels):
        book = 0 if module.shared else level
        state_dict[f"{prefix}codebooks.{level}.weight"] = stacked[book]
        state_dict[f"{prefix}codebooks.{level}.last_used"] = last_used[book]
        state_dict[f"{prefix}codebooks.{level}.initialised"] = initialised
