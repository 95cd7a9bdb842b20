"""The files of the data stage's artifact (``kgtok run``'s check and summary of the KG)."""

from __future__ import annotations

from pathlib import Path

from kgtok.artifacts import Artifact


class DataArtifact(Artifact):
    """``summary.json``: counts, unseen entities, relation statistics (as ``kgtok data info --json``)."""

    stage = "data"
    title = "data"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"
