"""k-means (faiss) and nearest-centroid search on torch tensors: codebook initialisation, ReaLM's stages."""

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


def nearest(x: torch.Tensor, centroids: torch.Tensor, *, row_norms: bool = True,
            batch: int | None = None) -> torch.Tensor:
    """argmin_k ||x - c_k||² of each row: (n, d) x (k, d) -> (n,) int64.

    ``row_norms=False`` leaves out the per-row constant ||x||²: the same
    argmin, but rounding can differ in near-ties. ReaLM's stages and
    ``encode_new`` have always searched without it and the RQ-VAE with it;
    both are kept so that a config gives the codes it gave before.
    ``batch`` rows per product bounds the memory of the (rows, k) distances.
    """
    centroid_norms = centroids.pow(2).sum(1).unsqueeze(0)  # (1, k)
    out = []
    for start in range(0, len(x), batch or max(len(x), 1)):
        part = x[start : start + batch] if batch else x  # (rows, d)
        products = 2 * part @ centroids.t()  # (rows, k)
        if row_norms:
            distances = part.pow(2).sum(1, keepdim=True) - products + centroid_norms
        else:
            distances = centroid_norms - products
        out.append(distances.argmin(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
