"""The files of a stage-2 artifact, named once."""

from __future__ import annotations

from pathlib import Path

from kgtok.artifacts import Artifact


class TextArtifact(Artifact):
    """``kgtok text`` output.

    text_embeddings.npy           (N, D) float32 in entity id order; separate: [label | description]
    label_embeddings.npy          (N, 384) float32, mode separate only
    description_embeddings.npy    (N, 384) float32, mode separate only
    entities.tsv                  id<TAB>raw name: the row order of the arrays
    """

    stage = "text"
    title = "stage-2 (text)"

    @property
    def text_embeddings(self) -> Path:
        return self.path / "text_embeddings.npy"

    @property
    def label_embeddings(self) -> Path:
        return self.path / "label_embeddings.npy"

    @property
    def description_embeddings(self) -> Path:
        return self.path / "description_embeddings.npy"

    @property
    def entities(self) -> Path:
        return self.path / "entities.tsv"

    @property
    def config_yaml(self) -> Path:
        return self.path / "config.yaml"
