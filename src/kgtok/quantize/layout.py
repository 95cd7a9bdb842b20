"""The files of a stage-4 artifact, named once."""

from __future__ import annotations

from kgtok.artifacts import Artifact, File


class QuantizeArtifact(Artifact):
    """``kgtok quantize`` output.

    codes.npy         (N, width) int64 codes in entity-id order (the disambiguation code last)
    tokens.txt        id<TAB>raw name<TAB>token string, one line per entity
    metrics.json      per-level code statistics, collisions, reconstruction, alignment, training history
    tokenizer/        EntityTokenizer.save_pretrained(): reload with EntityTokenizer.from_pretrained
    """

    stage = "quantize"
    title = "stage-4 (quantize)"
    codes = File("codes.npy")
    tokens = File("tokens.txt")
    tokenizer = File("tokenizer")
