"""k-means (faiss) on torch tensors: codebook initialisation and ReaLM's residual stages."""

from __future__ import annotations

import numpy as np
import torch


def kmeans(x: torch.Tensor | np.ndarray, k: int, *, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """(n, d) -> (k, d) centroids. With n < k, the points are repeated with small noise.

    faiss by default subsamples to 256 points per centroid; that cap is kept
    (it bounds the cost on large graphs without hurting the initialisation).
    """
    import faiss

    data = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
    rng = np.random.default_rng(seed)
    if len(data) < k:
        extra = data[rng.integers(0, len(data), k - len(data))]
        extra = extra + 1e-3 * (data.std() + 1e-6) * rng.standard_normal(extra.shape).astype(np.float32)
        data = np.concatenate([data, extra])
    if len(data) == k:
        return torch.from_numpy(data.copy())
    model = faiss.Kmeans(data.shape[1], k, niter=iterations, seed=int(seed), verbose=False, min_points_per_centroid=1)
    model.train(data)
    return torch.from_numpy(model.centroids.copy())


def assign(x: torch.Tensor, centroids: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """Nearest centroid of each row (batched so memory stays bounded)."""
    out = []
    c_norm = centroids.pow(2).sum(1)
    for start in range(0, len(x), batch):
        part = x[start : start + batch]
        out.append((c_norm.unsqueeze(0) - 2 * part @ centroids.t()).argmin(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
