"""Atomic artifact directories with manifests; input hashing; cache matching."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from kgtok.artifacts import (
    artifact_dir,
    hash_inputs,
    manifest_matches,
    read_manifest,
    sha256_file,
    write_json_atomic,
)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    dim: int = 8


def test_artifact_is_written_with_manifest(tmp_path):
    dest = tmp_path / "embed"
    with artifact_dir(dest, stage="embed", config=StageConfig(dim=4), inputs={"train.txt": "abc"}) as writer:
        (writer.path / "vectors.txt").write_text("1 2 3\n")
        writer.metrics["mrr"] = 0.5
        with writer.timed("train"):
            pass
        assert not dest.exists()  # nothing visible before success
    manifest = read_manifest(dest)
    assert manifest["stage"] == "embed" and manifest["config"] == {"dim": 4}
    assert manifest["inputs"] == {"train.txt": "abc"} and manifest["metrics"] == {"mrr": 0.5}
    assert set(manifest["timings"]) == {"train", "total"}
    assert manifest["versions"]["numpy"] is not None
    assert (dest / "vectors.txt").read_text() == "1 2 3\n"
    assert manifest_matches(dest, "embed", StageConfig(dim=4), {"train.txt": "abc"})
    assert not manifest_matches(dest, "embed", StageConfig(dim=5), {"train.txt": "abc"})
    assert not manifest_matches(dest, "embed", StageConfig(dim=4), {"train.txt": "abd"})
    assert not manifest_matches(dest, "text", StageConfig(dim=4), {"train.txt": "abc"})


def test_failure_leaves_old_artifact_and_no_temp(tmp_path):
    dest = tmp_path / "embed"
    with artifact_dir(dest, stage="embed", config=StageConfig()) as writer:
        (writer.path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with artifact_dir(dest, stage="embed", config=StageConfig(dim=9)) as writer:
            (writer.path / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed"]
    assert (dest / "old.txt").exists() and not (dest / "new.txt").exists()
    assert read_manifest(dest)["config"] == {"dim": 8}


def test_rewrite_replaces_old_artifact(tmp_path):
    dest = tmp_path / "a"
    for dim in (1, 2):
        with artifact_dir(dest, stage="s", config=StageConfig(dim=dim)) as writer:
            (writer.path / f"f{dim}").write_text("x")
    assert sorted(p.name for p in dest.iterdir()) == ["f2", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_hash_inputs(tmp_path):
    (tmp_path / "f.txt").write_text("hello")
    assert sha256_file(tmp_path / "f.txt") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    with artifact_dir(tmp_path / "art", stage="s", config=StageConfig()):
        pass
    hashes = hash_inputs({"file": tmp_path / "f.txt", "art": tmp_path / "art", "none": tmp_path / "missing"})
    assert hashes["file"] == sha256_file(tmp_path / "f.txt")
    assert hashes["art"] == sha256_file(tmp_path / "art" / "manifest.json")
    assert "none" not in hashes


def test_write_json_atomic(tmp_path):
    import numpy as np

    path = write_json_atomic(tmp_path / "m.json", {"x": np.float32(0.5), "y": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": 0.5, "y": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "m.json", {"x": object()})
    assert json.loads(path.read_text()) == {"x": 0.5, "y": [0, 1, 2]}  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_replace_dir_over_a_symlink_replaces_the_link_only(tmp_path):
    from kgtok.artifacts import replace_dir

    target = tmp_path / "partial"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    link = tmp_path / "artifact"
    link.symlink_to(target.name)
    new = tmp_path / "new"
    new.mkdir()
    (new / "fresh.txt").write_text("y")
    replace_dir(new, link)
    assert not link.is_symlink() and (link / "fresh.txt").read_text() == "y"
    assert (target / "keep.txt").read_text() == "x"  # what the link pointed to is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "partial"]  # nothing left aside
