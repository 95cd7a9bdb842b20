"""The files of the data stage's artifact (``kgtok run``'s check and summary of the KG)."""

from __future__ import annotations

from kgtok.artifacts import Artifact, File


class DataArtifact(Artifact):
    """``summary.json``: counts, unseen entities, relation statistics (as ``kgtok data info --json``)."""

    stage = "data"
    title = "data"
    summary = File("summary.json")
