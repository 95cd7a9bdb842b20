"""Fusion of graph and text vectors, and the coarse-to-fine tree builders.

Two builders behind one estimator (scikit-learn style, ``fit`` returns self,
learned state ends in ``_``):

* ``agglomerative``: KG-FIT's seed hierarchy: cosine distance, average
  linkage.  The linkage is built once and cut at one height per level; cuts of
  one dendrogram are nested, and outliers moved to a large cluster stay under
  their parent, so every level refines the one above.  The level-1 cut is the
  one with the best silhouette (KG-FIT's threshold choice).
  O(N²) memory: for graphs up to ``agglomerative_max_entities``.
* ``kmeans``: recursive k-means (faiss): level 1 by silhouette, then every
  cluster is split into children in proportion to its size.  O(N) memory.
  With ``device=cuda`` the k-means runs on the GPU (faiss-gpu when installed,
  else :func:`torch_kmeans`); on the CPU it is faiss, as always.

The tree is keyed by entity id throughout (never by label: WN18RR has 12,873
entities sharing a name, and KG-FIT's code lost them by keying on labels).
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

from kgtok.hierarchy.config import HierarchyConfig

if TYPE_CHECKING:
    import torch


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def reduce_width(x: np.ndarray, width: int, seed: int) -> np.ndarray:
    """PCA to ``width`` dims (or fewer when x is narrower), rows L2-normalised."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    width = min(width, x.shape[1], x.shape[0])
    if width < x.shape[1]:
        x = PCA(n_components=width, random_state=seed, svd_solver="randomized").fit_transform(x).astype(np.float32)
    return normalize_rows(x)


def fuse(graph: np.ndarray | None, text: np.ndarray | None, rho: float, width: int, seed: int) -> np.ndarray:
    """s = ρ·s_G + (1 - ρ)·s_T, both sides normalised and brought to one width (METHOD.md, stage 3).

    With one side missing the other is used alone.  Returns (N, min(width, widths of the sides used)) unit rows.
    """
    if graph is None and text is None:
        raise ValueError("fusion needs graph vectors, text vectors, or both")
    if graph is None or rho == 0.0:
        return reduce_width(text, width, seed)
    if text is None or rho == 1.0:
        return reduce_width(graph, width, seed)
    if len(graph) != len(text):
        raise ValueError(f"graph vectors have {len(graph)} rows but text vectors {len(text)}")
    # A side narrower than width brings the other down to its width (by PCA), and both are unit rows
    # there: cut after normalising, a side would weigh less than rho says.
    common = min(width, graph.shape[1], text.shape[1])
    g, t = reduce_width(graph, common, seed), reduce_width(text, common, seed)
    return normalize_rows(rho * g + (1.0 - rho) * t)


def level_counts(num_entities: int, top: int, levels: int, leaf_size: int) -> list[int]:
    """Cluster counts coarse to fine: ``top`` at level 1, ~N/leaf_size at the last, geometric between."""
    finest = max(top, min(num_entities, math.ceil(num_entities / leaf_size)))
    if levels == 1:
        return [top]
    ratio = (finest / top) ** (1.0 / (levels - 1))
    counts = [max(1, round(top * ratio**level)) for level in range(levels)]
    for level in range(1, levels):  # non-decreasing, never more clusters than entities
        counts[level] = min(num_entities, max(counts[level], counts[level - 1]))
    return counts


def _silhouette(x: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    size = min(sample, len(x))
    if not 2 <= len(np.unique(labels)) <= size - 1:  # silhouette is defined for 2..n-1 clusters only
        return -1.0
    return float(silhouette_score(x, labels, metric="cosine", sample_size=size, random_state=seed))


def _kmeans(x: np.ndarray, k: int, iterations: int, seed: int, restarts: int = 3,
            device: torch.device | None = None) -> np.ndarray:
    """Cluster assignments of k-means on unit rows (spherical): faiss on the CPU, or on ``device`` (a GPU)."""
    import faiss

    k = max(1, min(k, len(x)))
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    if device is not None and device.type != "cpu":
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # faiss-gpu: the same algorithm as on the CPU
            km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                              nredo=restarts, min_points_per_centroid=1, max_points_per_centroid=1 << 30, gpu=True)
            km.train(np.ascontiguousarray(x, dtype=np.float32))
            _, assignment = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
            return assignment[:, 0].astype(np.int64)
        return torch_kmeans(x, k, iterations=iterations, seed=seed, restarts=restarts, device=device)
    # Several restarts: one unlucky start splits a true cluster and merges two others.
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False, nredo=restarts,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assignment = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assignment[:, 0].astype(np.int64)


def torch_kmeans(x: np.ndarray, k: int, *, iterations: int = 25, seed: int = 0, restarts: int = 3,
                 device: torch.device | str = "cpu", batch: int = 65536) -> np.ndarray:
    """(N,) assignments of spherical k-means on (N, D) unit rows, computed with torch on ``device``.

    The GPU path of the hierarchy (faiss-gpu is not on PyPI): k-means++
    starts (Arthur & Vassilvitskii 2007), ``iterations`` Lloyd steps on
    cosine similarity, centroids renormalised; an empty cluster takes the
    worst-fitted points. The best of ``restarts`` runs (highest total
    similarity) is kept. Starts are drawn by a CPU generator seeded by
    ``seed``, so CPU and GPU runs start alike; ``batch`` rows per product
    bound the memory of the (rows, k) similarities.
    """
    import torch

    device = torch.device(device)
    points = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device)  # (N, D)
    n = len(points)
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(int(seed))

    def assign(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, score = [], []
        for start in range(0, n, batch):
            similarity = points[start : start + batch] @ centroids.t()  # (rows, k)
            value, index = similarity.max(dim=1)
            best.append(index)
            score.append(value)
        return torch.cat(best), torch.cat(score)

    best_labels, best_total = None, -float("inf")
    for _ in range(max(1, restarts)):
        centroids = _kmeans_plus_plus(points, k, generator)  # (k, D)
        for _ in range(iterations):
            labels, score = assign(centroids)
            sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # (k, D)
            counts = torch.bincount(labels, minlength=k)
            empty = torch.nonzero(counts == 0).squeeze(1)
            if len(empty):  # re-seed empty clusters with the worst-fitted points
                sums[empty] = points[torch.argsort(score)[: len(empty)]]
            centroids = torch.nn.functional.normalize(sums, dim=1)
        labels, score = assign(centroids)
        total = float(score.sum())
        if total > best_total:
            best_labels, best_total = labels, total
    return best_labels.cpu().numpy().astype(np.int64)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k starting centroids of (N, D) unit rows: each next one drawn with probability ∝ its squared distance
    (2 - 2 cos) to the nearest chosen so far. Draws on the CPU ``generator``; distances on the points' device."""
    import torch

    first = int(torch.randint(len(points), (1,), generator=generator))
    chosen = [first]
    nearest = 2.0 - 2.0 * (points @ points[first])  # (N,) squared distance to the nearest centroid
    for _ in range(1, k):
        weights = nearest.clamp(min=0).double().cpu()
        if float(weights.sum()) <= 0:  # every point sits on a centroid: any unchosen row will do
            weights = torch.ones(len(points), dtype=torch.float64)
            weights[chosen] = 0
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, 2.0 - 2.0 * (points @ points[pick]))
    return points[torch.as_tensor(chosen, device=points.device)]


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Dense ids 0..k-1 in order of first appearance (deterministic)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


class SemanticHierarchy:
    """A coarse-to-fine tree over entities with exactly ``levels`` levels.

    After ``fit``: ``paths_`` (N, levels) cluster id of each entity at each
    level (ids dense per level), ``counts_`` clusters per level,
    ``parents_[l]`` (k_l,) the parent id at level l-1 (-1 at level 0),
    ``centroids_[l]`` (k_l, D) unit-norm mean of members' vectors,
    ``neighbours_[l]`` (k_l, n) neighbouring clusters, siblings first (-1 pads),
    ``builder_`` the builder used, ``top_silhouettes_`` {k: score}.
    """

    def __init__(self, config: HierarchyConfig = HierarchyConfig()) -> None:
        self.config = config

    def fit(self, vectors: np.ndarray) -> SemanticHierarchy:
        x = normalize_rows(np.asarray(vectors, dtype=np.float32))
        config = self.config
        builder = config.builder
        if builder == "auto":
            builder = "agglomerative" if len(x) <= config.agglomerative_max_entities else "kmeans"
        self.builder_ = builder
        if builder == "agglomerative":
            paths = self._fit_agglomerative(x)
        else:
            paths = self._fit_kmeans(x)
        self.set_paths(paths, x)
        return self

    # --- builders ---------------------------------------------------------------
    def _top_candidates(self, n: int) -> list[int]:
        """Level-1 counts to try: within a factor 2 of a balanced tree's branching.

        Silhouette alone favours the crispest partition, which in a real
        hierarchy is often a finer level; bounding the choice around the
        branching B = (N / leaf_size)^(1/levels) keeps level 1 coarse.
        """
        config = self.config
        branching = max(n / config.leaf_size, 2.0) ** (1.0 / config.levels)
        low = max(config.top_min, math.floor(branching / 2))
        high = min(config.top_max, max(low, math.ceil(2 * branching)), max(config.top_min, n // 2))
        return list(range(low, max(low, high) + 1))

    def _counts(self, n: int, top: int) -> list[int]:
        if self.config.clusters_per_level is not None:
            return list(self.config.clusters_per_level)
        return level_counts(n, top, self.config.levels, self.config.leaf_size)

    def _fit_agglomerative(self, x: np.ndarray) -> np.ndarray:
        from scipy.cluster.hierarchy import linkage

        config = self.config
        if config.linkage == "ward":  # on unit rows, euclidean ward approximates cosine
            tree = linkage(x, method="ward", metric="euclidean")
        else:
            tree = linkage(x, method="average", metric="cosine")  # built once, cut many times
        if config.clusters_per_level is None:
            self.top_silhouettes_ = {
                k: _silhouette(x, self._cut(tree, x, k), config.silhouette_sample, config.seed)
                for k in self._top_candidates(len(x))
            }
            top = max(self.top_silhouettes_, key=lambda k: (self.top_silhouettes_[k], -k))
        else:
            self.top_silhouettes_ = {}
            top = config.clusters_per_level[0]
        paths = []
        for k in self._counts(len(x), top):  # coarse to fine: each level's cut is placed under the last
            paths.append(self._cut(tree, x, k, paths[-1] if paths else None))
        return np.stack(paths, axis=1)

    def _cut(self, tree: np.ndarray, x: np.ndarray, k: int, parent: np.ndarray | None = None) -> np.ndarray:
        """k clusters from the dendrogram, outliers attached to the nearest large cluster under their parent.

        Average linkage splits off single far points first, so the plain k-cluster
        cut of a real graph is one giant cluster plus k-1 outliers.  Instead take
        the finest cut with at most k large clusters (size >= min_cluster_share·N/k)
        and move the members of small clusters to the nearest large centroid.
        ``parent`` (N,): the level above.  Plain cuts of one dendrogram nest, but
        the moves above do not: a member moved there, or an outlier here, joins
        the nearest large cluster of its own parent (most of whose members share
        it), and where its parent has none, one cluster of such members per parent.
        """
        from scipy.cluster.hierarchy import fcluster

        n = len(x)
        minimum = self.config.min_cluster_share * n / k
        if minimum <= 1:
            best = fcluster(tree, k, criterion="maxclust")
        else:
            # Finer cuts first add large clusters, then break them into small ones: scan a
            # geometric grid of cuts for the coarsest one with k large clusters (else the most).
            best, best_large = None, -1
            for cut in np.unique(np.geomspace(k, min(n, 8 * k), 40).round().astype(int)):
                labels = fcluster(tree, int(cut), criterion="maxclust")
                large = int((np.bincount(labels) >= minimum).sum())
                if large > best_large:
                    best, best_large = labels, large
                if large >= k:
                    break
        sizes = np.bincount(best)
        moved = sizes[best] < minimum
        owner = None
        if parent is not None:  # the parent most members of each cluster have
            counts = np.zeros((len(sizes), int(parent.max()) + 1), dtype=np.int64)
            np.add.at(counts, (best, parent), 1)
            owner = counts.argmax(1)
            moved |= owner[best] != parent
        if not moved.any():
            return best
        large = np.flatnonzero((sizes >= minimum) & (sizes > 0))  # fcluster's labels start at 1
        members = np.flatnonzero(moved)
        best = best.copy()
        placed = np.zeros(len(members), dtype=bool)
        if len(large):
            score = x[members] @ _large_centroids(x, best, large).T  # (moved, large)
            if owner is not None:
                score[owner[large][None, :] != parent[members][:, None]] = -np.inf
            choice = np.argmax(score, axis=1)
            placed = np.isfinite(score[np.arange(len(members)), choice])
            best[members[placed]] = large[choice[placed]]
        if not placed.all():  # no large cluster under their parent: one cluster per parent
            rest = members[~placed]
            best[rest] = len(sizes) + (parent[rest] if parent is not None else 0)
        return best

    def _fit_kmeans(self, x: np.ndarray) -> np.ndarray:
        from kgtok.runtime import resolve_device

        config = self.config
        device = resolve_device(config.device)
        rng = np.random.default_rng(config.seed)
        if config.clusters_per_level is None:
            sample = x[rng.choice(len(x), min(len(x), config.silhouette_sample), replace=False)]
            candidates = self._top_candidates(len(x))
            if len(candidates) > 24:  # a grid is enough for k-means, whose fit costs more than a cut
                candidates = sorted(set(np.unique(np.geomspace(candidates[0], candidates[-1], 24).round().astype(int))))
            self.top_silhouettes_ = {
                int(k): _silhouette(sample, _kmeans(sample, int(k), config.kmeans_iterations, config.seed, 10, device),
                                    config.silhouette_sample, config.seed)
                for k in candidates
            }
            top = max(self.top_silhouettes_, key=lambda k: (self.top_silhouettes_[k], -k))
        else:
            self.top_silhouettes_ = {}
            top = config.clusters_per_level[0]
        counts = self._counts(len(x), top)
        paths = np.zeros((len(x), len(counts)), dtype=np.int64)
        paths[:, 0] = _kmeans(x, counts[0], config.kmeans_iterations, config.seed, 10, device)  # matters most
        for level in range(1, len(counts)):
            parent = paths[:, level - 1]
            sizes = np.bincount(parent)
            # Children per parent in proportion to its size, so the level holds ~counts[level] clusters.
            children = np.maximum(1, np.round(sizes * counts[level] / len(x)).astype(int))
            # Members of every cluster from one stable sort (ascending ids within a cluster), not a scan
            # of all N entities per cluster: that scan was O(N x clusters), hours at 1M entities.
            by_cluster = np.argsort(parent, kind="stable")
            ends = np.cumsum(sizes)
            offset = 0
            for cluster in np.flatnonzero(sizes):  # a loop over clusters, not entities
                members = by_cluster[ends[cluster] - sizes[cluster] : ends[cluster]]
                k = int(min(children[cluster], len(members)))
                paths[members, level] = offset + _kmeans(x[members], k, config.kmeans_iterations,
                                                         config.seed + level, device=device)
                offset += k
        return paths

    # --- derived structure ---------------------------------------------------------
    def set_paths(self, paths: np.ndarray, vectors: np.ndarray) -> SemanticHierarchy:
        """Adopt given paths (a builder's, or an imported tree's) and derive the rest."""
        x = normalize_rows(np.asarray(vectors, dtype=np.float32))
        paths = np.asarray(paths)
        levels = paths.shape[1]
        # Make ids dense per level and nested: a level-l cluster is (its parent, its own label).
        dense = np.zeros_like(paths, dtype=np.int64)
        dense[:, 0] = _relabel(paths[:, 0])
        for level in range(1, levels):
            key = dense[:, level - 1] * (int(paths[:, level].max()) + 1) + paths[:, level]
            dense[:, level] = _relabel(key)
        self.paths_ = dense
        self.counts_ = [int(dense[:, level].max()) + 1 for level in range(levels)]
        self.parents_ = []
        self.centroids_ = []
        for level in range(levels):
            k = self.counts_[level]
            parent = np.full(k, -1, dtype=np.int64)
            if level > 0:
                parent[dense[:, level]] = dense[:, level - 1]
            self.parents_.append(parent)
            self.centroids_.append(cluster_means(x, dense[:, level], k, normalize=True))
        self.neighbours_ = [
            neighbouring_clusters(self.centroids_[level], self.parents_[level], self.config.neighbours)
            for level in range(levels)
        ]
        return self


def _large_centroids(x: np.ndarray, labels: np.ndarray, large: np.ndarray) -> np.ndarray:
    """Unit mean vector of each cluster id in ``large``."""
    members = np.isin(labels, large)
    return cluster_means(x[members], np.searchsorted(large, labels[members]), len(large), normalize=True)


def cluster_means(x: np.ndarray, labels: np.ndarray, k: int, *, normalize: bool) -> np.ndarray:
    """(k, D) mean of the rows of each cluster (vectorised with a sparse indicator)."""
    from scipy.sparse import csr_matrix

    indicator = csr_matrix((np.ones(len(labels), dtype=np.float32), (labels, np.arange(len(labels)))),
                           shape=(k, len(labels)))
    sums = np.asarray(indicator @ x)
    counts = np.asarray(indicator.sum(axis=1)).reshape(-1, 1)
    means = sums / np.maximum(counts, 1)
    return normalize_rows(means).astype(np.float32) if normalize else means.astype(np.float32)


def neighbouring_clusters(centroids: np.ndarray, parents: np.ndarray, n: int) -> np.ndarray:
    """Up to n neighbours per cluster: siblings (same parent) by similarity, then the nearest others.

    Exact, from candidates: a cluster's answer lies among its siblings and its n nearest other clusters
    (an exact faiss inner-product search): with s < n siblings, those n hold at least the n - s others needed.
    Comparing every pair in numpy cost O(k²) sorts: 125,038 clusters (1M entities) took minutes.
    """
    import faiss

    k = len(centroids)
    out = np.full((k, n), -1, dtype=np.int64)
    if n == 0 or k == 1:
        return out
    m = min(n, k - 1)
    x = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, near = index.search(x, min(k, m + 1))  # (k, m+1): itself and m others
    order = np.argsort(parents, kind="stable")  # clusters grouped by parent
    starts = np.flatnonzero(np.r_[True, parents[order][1:] != parents[order][:-1]])
    for siblings in np.split(order, starts[1:]):  # a loop over parents, not clusters
        for begin in range(0, len(siblings), 1024):  # rows at a time: a parent may have many children
            rows = siblings[begin : begin + 1024]
            candidates = np.unique(np.concatenate([siblings, near[rows].ravel()]))
            candidates = candidates[candidates >= 0]
            similarity = x[rows] @ x[candidates].T  # (rows, candidates) cosine in [-1, 1]
            similarity += 4.0 * (parents[candidates] == parents[rows[0]])  # siblings rank first
            similarity[candidates[None, :] == rows[:, None]] = -np.inf  # not its own neighbour
            ranked = np.argsort(-similarity, axis=1, kind="stable")[:, :m]
            out[rows, :m] = candidates[ranked]
    return out
