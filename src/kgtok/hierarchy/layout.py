"""The files of a stage-3 artifact, named once."""

from __future__ import annotations

from kgtok.artifacts import Artifact, File


class HierarchyArtifact(Artifact):
    """``kgtok hierarchy`` output.

    fused_vectors.npy      (N, D) float32 unit rows s_x: the quantizer's input
    hierarchy.npz          paths (N, levels); per level l: parents_l, centroids_l, neighbours_l, text_centroids_l
    hierarchy.json         for people: clusters with sizes, top words, member labels
    entities.tsv           id<TAB>raw name: the row order
    """

    stage = "hierarchy"
    title = "stage-3 (hierarchy)"
    fused_vectors = File("fused_vectors.npy")
    arrays = File("hierarchy.npz")
    tree_json = File("hierarchy.json")
    entities = File("entities.tsv")
