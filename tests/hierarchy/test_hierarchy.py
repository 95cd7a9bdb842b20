"""Fusion, the two tree builders, the artifact, KG-FIT import, NMI on the synthetic KG."""

from __future__ import annotations

import json

import numpy as np

from kgtok.artifacts import artifact_dir
import pytest

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.hierarchy import HierarchyConfig, SemanticHierarchy, fuse, level_counts, load_hierarchy, run_hierarchy
from kgtok.hierarchy.kgfit import import_kgfit_tree


def planted(seed: int = 0, per_leaf: int = 12, branching=(4, 3, 2), dim: int = 32, noise: float = 0.15):
    """Vectors with a planted 3-level tree: each level adds a smaller random offset."""
    rng = np.random.default_rng(seed)
    leaves = int(np.prod(branching))
    n = leaves * per_leaf
    leaf = np.repeat(np.arange(leaves), per_leaf)
    types = np.stack([leaf // (branching[1] * branching[2]), leaf // branching[2], leaf], axis=1)
    x = np.zeros((n, dim))
    for level, scale in enumerate((1.0, 0.35, 0.15)):
        centres = rng.normal(size=(types[:, level].max() + 1, dim))
        x += scale * centres[types[:, level]]
    x += noise * rng.normal(size=x.shape)
    return x.astype(np.float32), types


def nmi(a, b):
    from sklearn.metrics import normalized_mutual_info_score

    return normalized_mutual_info_score(a, b)


@pytest.mark.parametrize("builder", ["agglomerative", "kmeans"])
def test_builders_recover_a_planted_tree(builder):
    x, types = planted()
    tree = SemanticHierarchy(HierarchyConfig(levels=3, builder=builder, leaf_size=12, threads=1)).fit(x)
    assert tree.builder_ == builder
    assert tree.paths_.shape == (len(x), 3)
    assert tree.counts_[0] == 4  # silhouette finds the 4 top types
    assert nmi(types[:, 0], tree.paths_[:, 0]) > 0.95
    # With the true counts given, each level refines the one above into the true subtypes.
    fixed = SemanticHierarchy(HierarchyConfig(levels=3, builder=builder, clusters_per_level=(4, 12, 24),
                                              threads=1)).fit(x)
    assert fixed.counts_ == [4, 12, 24]
    assert nmi(types[:, 1], fixed.paths_[:, 1]) > 0.95
    assert nmi(types[:, 2], fixed.paths_[:, 2]) > 0.9


def test_tree_structure_is_consistent():
    x, _ = planted(seed=1)
    tree = SemanticHierarchy(HierarchyConfig(levels=3, builder="kmeans", threads=1)).fit(x)
    for level in range(3):
        k = tree.counts_[level]
        assert sorted(np.unique(tree.paths_[:, level])) == list(range(k))  # dense ids
        assert tree.centroids_[level].shape == (k, x.shape[1])
        np.testing.assert_allclose(np.linalg.norm(tree.centroids_[level], axis=1), 1.0, rtol=1e-5)
        if level:
            # Each cluster has exactly one parent, and it is the parent of all its members.
            assert np.array_equal(tree.parents_[level][tree.paths_[:, level]], tree.paths_[:, level - 1])
        neighbours = tree.neighbours_[level]
        assert neighbours.shape == (k, 5)
        for c in range(k):
            valid = neighbours[c][neighbours[c] >= 0]
            assert c not in valid and len(set(valid)) == len(valid)
            siblings = set(np.flatnonzero(tree.parents_[level] == tree.parents_[level][c])) - {c}
            # Siblings come before any non-sibling.
            is_sibling = [n in siblings for n in valid]
            assert is_sibling == sorted(is_sibling, reverse=True)
            assert len(valid) == min(5, k - 1)


def test_agglomerative_cut_attaches_outliers():
    x, types = planted(seed=2)
    outliers = np.random.default_rng(5).normal(size=(3, x.shape[1])).astype(np.float32) * 3
    x = np.concatenate([x, outliers])
    tree = SemanticHierarchy(HierarchyConfig(levels=2, builder="agglomerative", clusters_per_level=(4, 12),
                                             threads=1)).fit(x)
    sizes = np.bincount(tree.paths_[:, 0])
    assert len(sizes) == 4 and sizes.min() >= 30  # no singleton "clusters" of outliers
    assert nmi(types[:, 0], tree.paths_[:-3, 0]) > 0.95


def test_agglomerative_levels_nest_with_their_outliers_moved():
    """Outliers are moved to a large cluster of their own parent, so each cut already nests under the one above:
    nesting adds no fragment clusters (moved across parents, 12 level-3 clusters were split into 204 for 192)."""
    rng = np.random.default_rng(0)
    top = rng.normal(size=(6, 16)) * 3
    mid = top[rng.integers(0, 6, 30)] + rng.normal(size=(30, 16))
    x = (mid[rng.integers(0, 30, 1500)] + 0.7 * rng.normal(size=(1500, 16))).astype(np.float32)
    tree = SemanticHierarchy(HierarchyConfig(levels=3, builder="agglomerative", seed=0, threads=1))
    cuts = tree._fit_agglomerative(x / np.linalg.norm(x, axis=1, keepdims=True))
    for level in (1, 2):
        parents = [len(np.unique(cuts[cuts[:, level] == c, level - 1])) for c in np.unique(cuts[:, level])]
        assert max(parents) == 1, level
    tree.fit(x)
    assert tree.counts_ == [len(np.unique(cuts[:, level])) for level in range(3)]


def test_level_counts_and_fusion():
    assert level_counts(2000, 4, 4, 8) == [4, 16, 63, 250]
    assert level_counts(10, 4, 3, 8) == [4, 4, 4]
    g = np.random.default_rng(0).normal(size=(50, 40))
    t = np.random.default_rng(1).normal(size=(50, 20))
    fused = fuse(g, t, 0.5, 16, seed=0)
    assert fused.shape == (50, 16)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, rtol=1e-5)
    only_text = fuse(None, t, 0.5, 16, seed=0)
    np.testing.assert_allclose(only_text, fuse(g, t, 0.0, 16, seed=0))
    with pytest.raises(ValueError, match="rows"):
        fuse(g, t[:10], 0.5, 16, seed=0)


def test_fusion_weighs_the_sides_as_rho_says_when_one_is_narrower_than_width():
    """A 100-wide graph side and a 384-wide text side at width 256: both come to 100 dims as unit rows, so at
    rho 0.5 the fused vector is as close to one side as to the other (cut after normalising, the text side
    drew it 1.5 times less than the graph side)."""
    from kgtok.hierarchy.build import reduce_width

    rng = np.random.default_rng(0)
    graph, text = rng.normal(size=(600, 100)), rng.normal(size=(600, 384))
    fused = fuse(graph, text, 0.5, 256, seed=0)
    assert fused.shape == (600, 100)
    to_graph = (fused * reduce_width(graph, 100, 0)).sum(1).mean()
    to_text = (fused * reduce_width(text, 100, 0)).sum(1).mean()
    assert abs(to_graph / to_text - 1) < 0.05, (to_graph, to_text)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("h")
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=400, seed=3), root / "kg"))
    # Stand-in stage-1 artifact: vectors that know the fine group, noisily.
    x, _ = planted()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(kg.entity_types[:, 2].max() + 1, 32))
    top = rng.normal(size=(kg.entity_types[:, 0].max() + 1, 32)) * 2
    vectors = top[kg.entity_types[:, 0]] + centres[kg.entity_types[:, 2]] + 0.3 * rng.normal(size=(kg.num_entities, 32))
    embed = root / "embed"
    with artifact_dir(embed, stage="embed", config={}) as writer:  # a stage-1 artifact made by hand
        np.save(writer.path / "entity_embeddings.npy", vectors.astype(np.float32))
        (writer.path / "entities.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(kg.entity_names)))
    return kg, embed, root


def test_artifact_layout_and_nmi(synthetic):
    kg, embed, root = synthetic
    dest = run_hierarchy(HierarchyConfig(threads=1), kg, root / "hierarchy", embeddings=embed, log=lambda *_: None)
    manifest = json.loads((dest / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["counts"][0] == 4 and metrics["nmi_level_1"] > 0.8
    arrays = load_hierarchy(dest)
    assert arrays["paths"].shape == (kg.num_entities, 4)
    assert arrays["fused_vectors"].shape[0] == kg.num_entities
    assert arrays["text_centroids"][0] is None  # no text artifact given
    readable = json.loads((dest / "hierarchy.json").read_text())
    assert readable["counts"] == metrics["counts"]
    top = readable["clusters"][0]
    assert top["size"] == max(c["size"] for c in readable["clusters"]) and top["members"] and top["children"]
    # Readable top words of a synthetic top cluster name its type (descriptions say "which is an animal").
    type_names = {name.split("/")[0] for name in kg.type_names[0]}
    assert any(set(c["top_words"]) & type_names for c in readable["clusters"])


def test_wrong_order_of_upstream_vectors_is_refused(synthetic, tmp_path):
    kg, embed, _ = synthetic
    bad = tmp_path / "bad"
    with artifact_dir(bad, stage="embed", config={}) as writer:
        np.save(writer.path / "entity_embeddings.npy", np.load(embed / "entity_embeddings.npy"))
        (writer.path / "entities.tsv").write_text(
            "".join(f"{i}\t{n}\n" for i, n in enumerate(reversed(kg.entity_names))))
    with pytest.raises(ValueError, match="entity order differs"):
        run_hierarchy(HierarchyConfig(threads=1), kg, tmp_path / "h", embeddings=bad, log=lambda *_: None)
    assert not (tmp_path / "h").exists()


def test_quantize_refuses_a_hierarchy_in_another_order_also_for_realm(synthetic, tmp_path):
    """realm reads the tree only for its alignment metrics, and read it in whatever order it came."""
    import shutil

    from kgtok.quantize import QuantizeConfig, run_quantize

    kg, embed, root = synthetic
    tree = run_hierarchy(HierarchyConfig(threads=1), kg, root / "hierarchy", embeddings=embed, log=lambda *_: None)
    moved = tmp_path / "hierarchy"
    shutil.copytree(tree, moved)
    (moved / "entities.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(reversed(kg.entity_names))))
    with pytest.raises(ValueError, match="entity order differs"):
        run_quantize(QuantizeConfig(variant="realm", levels=2, codebook_size=8, threads=1), kg, tmp_path / "q",
                     hierarchy=moved, embeddings=embed, progress=False, log=lambda *_: None)


def test_kgfit_import(synthetic, tmp_path):
    kg, embed, _ = synthetic
    types, names = kg.entity_types, kg.entity_names
    # A KG-FIT-style tree of uneven depth: top type -> subtype -> (fine group as a nested list or a leaf list).
    tree: dict = {}
    for i in range(kg.num_entities - 5):  # the last 5 entities are left out
        top, sub, fine = (f"Cluster_{t}" for t in types[i])
        node = tree.setdefault("Cluster_top", {}).setdefault(top, {}).setdefault(sub, {})
        if types[i, 1] % 2:
            node.setdefault(fine, []).append(names[i])
        else:  # a deeper branch for half of the subtypes
            node.setdefault(fine, {}).setdefault("deeper", []).append(names[i])
    (tmp_path / "seed_hierarchy.json").write_text(json.dumps(tree))
    paths, report = import_kgfit_tree(tmp_path / "seed_hierarchy.json", kg, np.load(embed / "entity_embeddings.npy"), 3)
    assert report["matched_by_id"] == kg.num_entities - 5 and report["missing_entities"] == 5
    listed = slice(0, kg.num_entities - 5)
    assert nmi(types[listed, 0], paths[listed, 0]) == pytest.approx(1.0)
    assert nmi(types[listed, 1], paths[listed, 1]) == pytest.approx(1.0)
    # The 5 unlisted entities join the nearest leaf: its top type is theirs.
    top_of_path = {p: t for p, t in zip(paths[listed, 0], types[listed, 0])}
    assert sum(top_of_path[p] == t for p, t in zip(paths[-5:, 0], types[-5:, 0])) >= 4
    dest = run_hierarchy(HierarchyConfig(levels=3, threads=1), kg, tmp_path / "h", embeddings=embed,
                         tree=tmp_path / "seed_hierarchy.json", log=lambda *_: None)
    assert json.loads((dest / "manifest.json").read_text())["metrics"]["builder"] == "kgfit-import"
    (tmp_path / "broken.json").write_text("{\n  \"a\": [\n")
    with pytest.raises(ValueError, match=r"broken.json:3: not valid JSON"):
        import_kgfit_tree(tmp_path / "broken.json", kg, np.load(embed / "entity_embeddings.npy"), 3)
    (tmp_path / "other.json").write_text(json.dumps({"C": {"c": ["zzz"]}}))  # was "Geometric sequence cannot ..."
    with pytest.raises(ValueError, match=r"other.json: none of its 1 leaf names is an entity id or label"):
        import_kgfit_tree(tmp_path / "other.json", kg, np.load(embed / "entity_embeddings.npy"), 3)
    (tmp_path / "latin1.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match=r"latin1.json: byte 0 is not UTF-8"):
        import_kgfit_tree(tmp_path / "latin1.json", kg, np.load(embed / "entity_embeddings.npy"), 3)


def test_kgfit_labels_are_matched_and_ambiguity_counted(synthetic, tmp_path):
    kg, embed, _ = synthetic
    labels = np.asarray(kg.labels, dtype=object)
    duplicated = [l for l in set(kg.labels) if (labels == l).sum() > 1]
    assert duplicated, "the synthetic KG repeats some labels on purpose"
    tree = {"A": {"B": list(dict.fromkeys(kg.labels))}}
    (tmp_path / "t.json").write_text(json.dumps(tree))
    _, report = import_kgfit_tree(tmp_path / "t.json", kg, np.load(embed / "entity_embeddings.npy"), 2)
    assert report["matched_by_label"] == len(set(kg.labels))
    assert report["ambiguous_label_matches"] == len(duplicated)
    assert report["missing_entities"] == 0  # every entity of a repeated label is kept, by id


def test_two_entities_build_a_tree_instead_of_a_silhouette_error():
    # Silhouette is undefined for 2 clusters of 2 points (scikit-learn: "Number of labels is 2"); the level-1
    # count is then chosen without it.
    hierarchy = SemanticHierarchy(HierarchyConfig(levels=3)).fit(np.random.default_rng(0).normal(size=(2, 8)))
    assert hierarchy.paths_.shape == (2, 3) and hierarchy.counts_[0] == 2


@pytest.mark.parametrize("n", [0, 3, 5, 40])
def test_neighbour_lists_match_every_pair_compared(n):
    """The faiss-candidate neighbour lists equal the all-pairs ranking: siblings first, then the nearest."""
    from kgtok.hierarchy.build import neighbouring_clusters, normalize_rows

    rng = np.random.default_rng(0)
    centroids = normalize_rows(rng.standard_normal((300, 8)).astype(np.float32))
    parents = np.concatenate([np.zeros(2), np.ones(10), rng.integers(2, 60, 288)]).astype(np.int64)  # 2 to 10+ children
    expected = np.full((300, n), -1, dtype=np.int64)
    if n:
        score = centroids @ centroids.T + 4.0 * (parents[:, None] == parents[None, :])
        np.fill_diagonal(score, -np.inf)
        expected = np.argsort(-score, axis=1, kind="stable")[:, :n]
    assert np.array_equal(neighbouring_clusters(centroids, parents, n), expected)
    assert (neighbouring_clusters(centroids[:1], parents[:1], 3) == -1).all()


def test_kgfit_tree_shallower_than_the_code_keeps_its_order(tmp_path):
    """A 3-deep tree for 4 code levels took its leaves first (depths [2, 0, 1, 2]), so every level nested under
    the leaf partition; the deepest level now repeats at the end."""
    from kgtok.data.graph import KnowledgeGraph

    names = [f"e{i}" for i in range(8)]
    kg = KnowledgeGraph.from_arrays(entity_names=names, relation_names=["r"], train=np.array([[0, 0, 1]]),
                                    valid=np.zeros((0, 3)), test=np.zeros((0, 3)))
    tree = {"Cluster_top": {"C0": {"C0_0": ["e0", "e1"], "C0_1": ["e2"]},
                            "C1": {"C1_0": ["e3", "e4"], "C1_1": {"C1_1_0": ["e5"], "C1_1_1": ["e6", "e7"]}}}}
    (tmp_path / "seed_hierarchy.json").write_text(json.dumps(tree))
    fused = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    paths, report = import_kgfit_tree(tmp_path / "seed_hierarchy.json", kg, fused, 4)
    assert report["depths"] == [0, 1, 2, 2]
    assert SemanticHierarchy(HierarchyConfig(levels=4)).set_paths(paths, fused).counts_ == [2, 4, 5, 5]


def test_set_paths_nests_labels_and_kmeans_children_follow_parent_size():
    """set_paths makes a level's cluster (its parent, its label): label 0 under two parents is two clusters;
    recursive k-means gives a parent children in proportion to its size (20 against 180 points: 1 and 9)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    tree = SemanticHierarchy(HierarchyConfig(levels=2)).set_paths(np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), x)
    assert tree.counts_ == [2, 4] and tree.parents_[1].tolist() == [0, 0, 1, 1]
    far = np.r_[np.full(8, 10.0), np.zeros(8)]
    points = np.concatenate([rng.normal(size=(20, 16)) + far, rng.normal(size=(180, 16)) - far]).astype(np.float32)
    tree = SemanticHierarchy(HierarchyConfig(levels=2, builder="kmeans", clusters_per_level=(2, 10), threads=1))
    paths = tree.fit(points).paths_
    children = {int(p): len(np.unique(paths[paths[:, 0] == p, 1])) for p in np.unique(paths[:, 0])}
    assert sorted(children.values()) == [1, 9]


def test_rho_weighs_the_graph_side():
    """rho 0.8: the fused vector is nearer the graph side (every other test uses 0.5, where a swap is invisible)."""
    from kgtok.hierarchy.build import reduce_width

    rng = np.random.default_rng(1)
    graph, text = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    fused = fuse(graph, text, 0.8, 32, seed=0)
    to_graph = (fused * reduce_width(graph, 32, 0)).sum(1).mean()
    to_text = (fused * reduce_width(text, 32, 0)).sum(1).mean()
    assert to_graph > 2 * to_text
