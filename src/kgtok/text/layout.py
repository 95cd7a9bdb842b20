"""The files of a stage-2 artifact, named once."""

from __future__ import annotations

from kgtok.artifacts import Artifact, File


class TextArtifact(Artifact):
    """``kgtok text`` output.

    text_embeddings.npy           (N, D) float32 in entity id order; separate: [label | description]
    label_embeddings.npy          (N, 384) float32, mode separate only
    description_embeddings.npy    (N, 384) float32, mode separate only
    entities.tsv                  id<TAB>raw name: the row order of the arrays
    """

    stage = "text"
    title = "stage-2 (text)"
    text_embeddings = File("text_embeddings.npy")
    label_embeddings = File("label_embeddings.npy")
    description_embeddings = File("description_embeddings.npy")
    entities = File("entities.tsv")
    config_yaml = File("config.yaml")
