"""Import a KG-FIT tree (``seed_hierarchy.json`` / ``llm_hierarchy.json``) as fixed-depth paths.

KG-FIT writes a nested dict: internal nodes map names to children, leaves
are lists of entity names.  Its depth varies (~45 on FB15k-237), so it cannot
serve as fixed-length code prefixes as it is; it is re-levelled here by
choosing one absolute depth per kgtok level (an entity whose branch is
shorter keeps its leaf).  Choosing absolute depths keeps the levels nested.

Leaves are matched by raw entity id first; a name that is not an id is tried
as a label, and since labels repeat (WN18RR: 12,873 entities share a name)
every such match is counted in the report.  Entities the tree does not list
join the leaf whose centroid is nearest in the fused space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.data.graph import KnowledgeGraph
from kgtok.hierarchy.build import cluster_means, normalize_rows


def _walk(tree: Any, path: list[int], counter: list[int], out: list[tuple[list[int], list[str]]]) -> None:
    """Depth-first: (node path, leaf names) for every leaf list; nodes numbered in visit order."""
    stack = [(tree, path)]
    while stack:
        node, node_path = stack.pop()
        if isinstance(node, dict):
            for child in reversed(list(node.values())):
                counter[0] += 1
                stack.append((child, node_path + [counter[0]]))
        elif isinstance(node, list):
            names = [n for n in node if isinstance(n, str)]
            nested = [n for n in node if isinstance(n, (dict, list))]
            if names:
                out.append((node_path, names))
            for child in reversed(nested):
                counter[0] += 1
                stack.append((child, node_path + [counter[0]]))
        elif isinstance(node, str):
            out.append((node_path, [node]))


def import_kgfit_tree(
    path: str | Path, kg: KnowledgeGraph, fused: np.ndarray, levels: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, levels) paths from a KG-FIT tree, and a report of how entities were matched."""
    # Over 60 lines on purpose: one walk over KG-FIT's tree format, matching and reporting as it goes.
    path = Path(path)
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start} is not UTF-8 (a KG-FIT tree is a UTF-8 JSON file)") from None
    while isinstance(tree, dict) and len(tree) == 1 and isinstance(next(iter(tree.values())), dict):
        tree = next(iter(tree.values()))  # drop single-child wrappers such as "Cluster_top"
    leaves: list[tuple[list[int], list[str]]] = []
    _walk(tree, [], [0], leaves)
    if not leaves:
        raise ValueError(f"{path}: no leaf lists of entity names found")

    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(kg.labels):
        by_label.setdefault(label, []).append(i)
    max_depth = max(len(p) for p, _ in leaves)
    padded = np.full((kg.num_entities, max_depth), -1, dtype=np.int64)
    assigned = np.zeros(kg.num_entities, dtype=bool)
    report = {"tree_leaves": len(leaves), "tree_max_depth": max_depth, "matched_by_id": 0,
              "matched_by_label": 0, "ambiguous_label_matches": 0, "unknown_names": 0,
              "listed_twice": 0, "missing_entities": 0}
    for node_path, names in leaves:
        row = np.asarray(node_path + [node_path[-1]] * (max_depth - len(node_path)), dtype=np.int64)
        for name in names:
            index = kg.entity_to_id.get(name)
            if index is not None:
                targets = [index]
                report["matched_by_id"] += 1
            elif name in by_label:
                targets = by_label[name]
                report["matched_by_label"] += 1
                report["ambiguous_label_matches"] += int(len(targets) > 1)
            else:
                report["unknown_names"] += 1
                continue
            for target in targets:
                if assigned[target]:
                    report["listed_twice"] += 1
                    continue
                padded[target] = row
                assigned[target] = True

    if not assigned.any():
        raise ValueError(f"{path}: none of its {sum(len(n) for _, n in leaves)} leaf names is an entity id or label "
                         f"of the KG (e.g. {leaves[0][1][:3]}); was the tree made for another dataset?")
    # Re-level: absolute depths whose node counts are closest to a geometric ramp.
    known = padded[assigned]
    counts = np.array([len(np.unique(known[:, d])) for d in range(max_depth)])
    targets = np.geomspace(counts[0], counts[-1], levels) if levels > 1 else np.array([counts[0]])
    depths, previous = [], -1
    for level, target in enumerate(targets):
        remaining = levels - level - 1
        low = previous + 1
        if low > max_depth - 1:  # the tree is shallower than the code: its deepest level again, at the end
            depths.append(max_depth - 1)
            continue
        high = max(low, max_depth - 1 - remaining)  # (the deepest level first, as before, reversed the tree)
        choice = low + int(np.argmin(np.abs(np.log(counts[low : high + 1]) - np.log(target))))
        depths.append(choice)
        previous = choice
    paths = padded[:, depths]

    missing = np.flatnonzero(~assigned)
    report["missing_entities"] = int(len(missing))
    if len(missing):
        x = normalize_rows(np.asarray(fused, dtype=np.float32))
        leaf_ids, leaf_index = np.unique(paths[assigned, -1], return_inverse=True)
        centroids = cluster_means(x[assigned], leaf_index, len(leaf_ids), normalize=True)
        nearest = np.argmax(x[missing] @ centroids.T, axis=1)
        representative = np.flatnonzero(assigned)[np.unique(leaf_index, return_index=True)[1]]
        paths[missing] = paths[representative[nearest]]
    report["depths"] = [int(d) for d in depths]
    return paths, report
