"""Code metrics of stage 4, in one place: usage per level, alignment with a tree, collisions.

Training selects its checkpoint by the held-out codes' mean entropy
(:func:`code_usage`); the stage reports all of them in ``metrics.json``.
"""

from __future__ import annotations

import numpy as np


def code_usage(codes: np.ndarray, codebook_size: int) -> dict[str, list[float]]:
    """Per level of (n, levels) codes: entropy (nats), utilisation (share of codes used), perplexity (exp entropy)."""
    entropy, utilisation = [], []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)  # (K,)
        p = counts[counts > 0] / len(codes)
        entropy.append(float(-(p * np.log(p)).sum()))
        utilisation.append(float((counts > 0).mean()))
    return {"entropy": entropy, "utilization": utilisation, "perplexity": [float(np.exp(h)) for h in entropy]}


def alignment(codes: np.ndarray, reference: np.ndarray | None, prefix: str) -> dict[str, float]:
    """NMI and homogeneity between level-l codes and level-l reference labels (clusters or true types).

    codes (n, levels); reference (n, depth), -1 where unknown (such rows are
    left out). With K codes per level and far fewer clusters, NMI is capped by
    the codes' own entropy even when every code is pure; homogeneity
    (1 - H(cluster|code)/H(cluster)) is 1 exactly when each code holds one
    cluster's entities: codes refine the tree.
    """
    from sklearn.metrics import homogeneity_score, normalized_mutual_info_score

    if reference is None:
        return {}
    known = (reference >= 0).all(axis=1)
    out = {}
    for level in range(min(codes.shape[1], reference.shape[1])):
        truth, predicted = reference[known, level], codes[known, level]
        out[f"nmi_{prefix}_level_{level + 1}"] = float(normalized_mutual_info_score(truth, predicted))
        out[f"homogeneity_{prefix}_level_{level + 1}"] = float(homogeneity_score(truth, predicted))
    return out


def tuple_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) codes -> the group of equal tuples each row is in (n,), and each group's size."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim == 2 and len(codes) and codes.min() >= 0:
        radix = codes.max(axis=0) + 1  # (width,) one int64 per row, ordered as the rows: same groups, same ids
        if np.log2(radix.astype(np.float64)).sum() < 62:
            key = np.zeros(len(codes), dtype=np.int64)
            for level, base in enumerate(radix):  # a loop over levels
                key = key * int(base) + codes[:, level]
            _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
            return inverse.reshape(-1), counts
    # Rows as tuples: sorting a structured view took seconds for 1M entities, hence the packed key above.
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_rate(codes: np.ndarray) -> float:
    """Share of the (n, width) rows whose tuple another row has too."""
    if len(codes) == 0:
        return 0.0
    inverse, counts = tuple_groups(codes)
    return float((counts[inverse] > 1).mean())
