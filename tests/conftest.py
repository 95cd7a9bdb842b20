"""Shared fixtures: tiny KG directories written on the fly, the shared datasets' path."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

# Tests run in parallel processes on a 2-core machine: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Caches (text embeddings) go to a temporary directory, never the user's home.
os.environ.setdefault("KGTOK_CACHE_DIR", tempfile.mkdtemp(prefix="kgtok-test-cache-"))
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SHARED_DATASETS = Path(os.environ.get("KGTOK_SHARED_DATASETS", SHARED_DATASETS))

TRAIN = [("a", "likes", "b"), ("b", "likes", "c"), ("c", "hates", "a"), ("a", "hates", "d"), ("d", "likes", "a")]
VALID = [("a", "likes", "c"), ("b", "hates", "d")]
TEST = [("c", "likes", "d"), ("d", "hates", "b")]


def write_lines(path: Path, lines: Iterable[str], newline: str = "\n") -> Path:
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


@pytest.fixture
def make_kg(tmp_path: Path) -> Callable[..., Path]:
    """Write a KG directory; splits given as lists of (h, r, t) or of raw lines."""

    def make(
        train: list = TRAIN, valid: list = VALID, test: list = TEST, name: str = "kg", **extra_files: list[str]
    ) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for split, rows in (("train", train), ("valid", valid), ("test", test)):
            if rows is None:
                continue
            lines = [row if isinstance(row, str) else "\t".join(row) for row in rows]
            write_lines(directory / f"{split}.txt", lines)
        for filename, lines in extra_files.items():
            write_lines(directory / filename.replace("__", "."), lines)
        return directory

    return make


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not (path / "train.txt").exists():
        pytest.skip(f"shared dataset {name} not found at {path}")
    return path
