"""The files of a stage-1 artifact, named once (read by stages 3-5, the report and the CLI)."""

from __future__ import annotations

from pathlib import Path

from kgtok.artifacts import Artifact, File


class EmbedArtifact(Artifact):
    """``kgtok embed`` / ``kgtok embed-import`` output.

    entity_embeddings.npy      (N, D) float32; complex models [re | im]
    relation_embeddings.npy    (R, D_r) float32 (reciprocal relations after the R originals; RotatE: phases)
    entities.tsv, relations.tsv  id<TAB>raw name: the row order of the arrays
    model.pt                   weights + what is needed to rebuild the model
    metrics.json               valid and test metrics (both/head/tail), training history
    candidates/{split}.npz     per query (both sides): top-k filtered candidates, scores, filtered rank
                               (train, valid: filtered by train ∪ valid, training material; test and
                               valid_eval: by train ∪ valid ∪ test, evaluation material)
    """

    stage = "embed"
    title = "stage-1 (embed)"
    entity_embeddings = File("entity_embeddings.npy")
    relation_embeddings = File("relation_embeddings.npy")
    entities = File("entities.tsv")
    relations = File("relations.tsv")
    model = File("model.pt")
    config_yaml = File("config.yaml")

    def candidates(self, split: str) -> Path:
        return self.path / "candidates" / f"{split}.npz"
