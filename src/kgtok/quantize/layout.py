"""The files of a stage-4 artifact, named once."""

from __future__ import annotations

from pathlib import Path

from kgtok.artifacts import Artifact


class QuantizeArtifact(Artifact):
    """``kgtok quantize`` output.

    codes.npy         (N, width) int64 codes in entity-id order (the disambiguation code last)
    tokens.txt        id<TAB>raw name<TAB>token string, one line per entity
    metrics.json      per-level code statistics, collisions, reconstruction, alignment, training history
    tokenizer/        EntityTokenizer.save_pretrained(): reload with EntityTokenizer.from_pretrained
    """

    stage = "quantize"
    title = "stage-4 (quantize)"

    @property
    def codes(self) -> Path:
        return self.path / "codes.npy"

    @property
    def tokens(self) -> Path:
        return self.path / "tokens.txt"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"
