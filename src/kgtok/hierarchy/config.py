"""HierarchyConfig: every default of stage 3 (fusion and the coarse-to-fine tree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kgtok.config import check_fields, in_range, machine


@dataclass(frozen=True, kw_only=True)
class HierarchyConfig:
    """Stage 3: fuse graph and text vectors, build a tree with one level per code level."""

    levels: int = 4  # tree levels = code levels of stage 4, coarse to fine
    rho: float = 0.5  # ρ: weight of the graph side in s = ρ s_G + (1 - ρ) s_T
    width: int = 256  # both sides are PCA-reduced to this width before fusion
    builder: Literal["auto", "agglomerative", "kmeans"] = "auto"  # auto: agglomerative up to the size below
    agglomerative_max_entities: int = 20_000  # O(N^2) memory: 20k entities ~ 1.6 GB of distances
    linkage: Literal["average", "ward"] = "average"  # average + cosine as KG-FIT; ward gives rounder clusters
    min_cluster_share: float = 0.2  # a cut's cluster smaller than this share of N/k is an outlier: it joins
    #                                 the nearest large cluster (average linkage cuts off single outliers)
    clusters_per_level: tuple[int, ...] | None = None  # fixed counts, coarse to fine; None: derived from N
    top_min: int = 2  # level-1 count is chosen by silhouette between top_min and top_max
    top_max: int = 64
    leaf_size: int = 8  # target entities per cluster at the finest level
    silhouette_sample: int = 5000  # entities sampled for each silhouette score
    kmeans_iterations: int = 25  # faiss k-means iterations per split
    neighbours: int = 5  # neighbouring clusters kept per cluster (siblings first, then nearest)
    top_labels: int = 10  # member labels shown per cluster in hierarchy.json
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # k-means of the kmeans builder: cpu = faiss (as always); cuda =
    #   faiss-gpu when installed, else a torch k-means on the GPU (other float sums: not a machine field)
    threads: int = machine(0)  # 0 = all cores

    def __post_init__(self) -> None:
        check_fields(self, [
            ("levels", in_range(1, 16), "an integer in [1, 16]"),
            ("rho", in_range(0.0, 1.0), "in [0, 1]"),
            ("width", in_range(2), ">= 2"),
            ("agglomerative_max_entities", in_range(2), ">= 2"),
            ("clusters_per_level", lambda v: v is None or (
                len(v) == self.levels and all(a >= 1 for a in v) and list(v) == sorted(v)),
             "null, or one non-decreasing positive count per level"),
            ("top_min", in_range(2), ">= 2"),
            ("top_max", lambda v: v >= self.top_min, ">= top_min"),
            ("leaf_size", in_range(1), ">= 1"),
            ("min_cluster_share", in_range(0.0, 1.0), "in [0, 1]"),
            ("silhouette_sample", in_range(100), ">= 100"),
            ("kmeans_iterations", in_range(1), ">= 1"),
            ("neighbours", in_range(0), ">= 0"),
            ("top_labels", in_range(0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
            ("threads", in_range(0), ">= 0"),
        ])
