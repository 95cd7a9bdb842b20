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


@dataclass(frozen=True, kw_only=True)
class LaterStageConfig:
    """StageConfig after a release added a field whose default keeps what the stage computed."""

    dim: int = 8
    sparse: bool | None = None


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


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import subprocess
    import sys

    from kgtok.artifacts import LockedError, StaleLockWarning, folder_lock

    dest = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import socket

        lock = tmp_path / "run.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        with pytest.raises(LockedError, match=rf"in use by another kgtok process \(pid {holder.pid}"):
            with folder_lock(dest):
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(StaleLockWarning, match=f"process {holder.pid}, which no longer runs"):
        with folder_lock(dest):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            with folder_lock(dest):  # re-entrant in one process (kgtok run, then each stage)
                pass
    assert not lock.exists()


def test_a_lock_held_before_its_holder_wrote_its_name_is_still_held(tmp_path):
    """A lock file its holder has created but not yet written (or one several processes race to take over)
    read as no holder and was taken: two processes held the folder.  The kernel's lock decides now."""
    import subprocess
    import sys

    from kgtok.artifacts import LockedError, folder_lock

    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(20)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match="in use by another kgtok process"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path / "run"):  # its process gone, the kernel's lock is free
        pass


def test_two_processes_on_one_output_folder(tmp_path, make_kg):
    """The second of two concurrent stage runs on one --out stops with a message naming the first."""
    import subprocess
    import sys

    code = ("import sys, time; from kgtok.artifacts import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('holding', flush=True); time.sleep(20)")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        second = subprocess.run([sys.executable, "-m", "kgtok", "text", "--data", str(make_kg()),
                                 "--out", str(tmp_path / "out")], capture_output=True, text=True)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert "in use by another kgtok process" in second.stderr and str(first.pid) in second.stderr


def test_emptied_artifact_file_is_noticed(tmp_path):
    from kgtok.artifacts import verify_files

    with artifact_dir(tmp_path / "q", stage="quantize", config=StageConfig()) as writer:
        (writer.path / "codes.npy").write_bytes(b"x" * 100)
        (writer.path / "sub").mkdir()
        (writer.path / "sub" / "a.txt").write_text("a")
    assert verify_files(tmp_path / "q") == []
    (tmp_path / "q" / "codes.npy").write_bytes(b"")
    (tmp_path / "q" / "sub" / "a.txt").write_text("b")
    assert verify_files(tmp_path / "q") == ["codes.npy", "sub/a.txt"]


def test_leftover_temporary_folders_of_a_killed_writer_are_removed(tmp_path):
    from kgtok.artifacts import clean_leftovers

    (tmp_path / ".embed.tmp-abc").mkdir()
    (tmp_path / ".embed.old-1-2").mkdir()
    (tmp_path / ".text.tmp-abc").mkdir()
    clean_leftovers(tmp_path, "embed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".text.tmp-abc"]
    clean_leftovers(tmp_path, "*")  # a name is no pattern: "*" must not match the text writer's folder
    clean_leftovers(tmp_path, "[st]ext")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".text.tmp-abc"]


def test_a_field_added_since_counts_as_its_default(tmp_path):
    """An artifact made before a config field existed is current for the field's default, not for another value
    (else every new field would retrain every cached artifact); the resume check agrees."""
    from kgtok.config import config_changes

    dest = tmp_path / "embed"
    with artifact_dir(dest, stage="embed", config=StageConfig(dim=4), inputs={"train.txt": "abc"}):
        pass
    assert manifest_matches(dest, "embed", LaterStageConfig(dim=4), {"train.txt": "abc"})
    assert not manifest_matches(dest, "embed", LaterStageConfig(dim=4, sparse=True), {"train.txt": "abc"})
    assert not manifest_matches(dest, "embed", LaterStageConfig(dim=5), {"train.txt": "abc"})
    saved = read_manifest(dest)["config"]
    assert config_changes(saved, LaterStageConfig(dim=4)) == ([], [])
    assert config_changes(saved, LaterStageConfig(dim=4, sparse=False)) == ([], ["sparse"])


def test_an_artifact_never_replaces_a_directory_kgtok_did_not_write(tmp_path):
    """``--out`` pointing at a KG directory (or any folder with files and no manifest) deleted it."""
    from kgtok.artifacts import artifact_dir

    data = tmp_path / "kg"
    data.mkdir()
    (data / "train.txt").write_text("a\tr\tb\n")
    with pytest.raises(FileExistsError, match="not a kgtok artifact"):
        with artifact_dir(data, stage="text", config={}):
            pass
    assert (data / "train.txt").read_text() == "a\tr\tb\n"
    with artifact_dir(tmp_path / "empty", stage="text", config={}) as writer:  # new or empty: written
        (writer.path / "x.npy").write_bytes(b"")
    with artifact_dir(tmp_path / "empty", stage="text", config={}):  # its own artifact: replaced
        pass


def test_written_files_and_folders_get_the_umasks_modes_not_the_temporary_ones(tmp_path):
    """mkstemp and mkdtemp make 0600 / 0700: artifacts were unreadable by other users whatever the umask."""
    import os
    import stat

    from kgtok.artifacts import artifact_dir, write_json_atomic

    old = os.umask(0o022)
    try:
        with artifact_dir(tmp_path / "a", stage="text", config={}):
            pass
        write_json_atomic(tmp_path / "f.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_a_manifest_that_is_a_folder_reads_as_no_manifest(tmp_path):
    """An artifact whose manifest.json is a folder is unfinished (made again), not a crash."""
    from kgtok.artifacts import read_manifest

    (tmp_path / "a" / "manifest.json").mkdir(parents=True)
    assert read_manifest(tmp_path / "a") is None


def test_a_lock_whose_pid_went_to_a_later_process_is_taken_over(tmp_path):
    """A killed holder's PID given to another process (containers reuse small PIDs) kept the folder locked for
    ever: that process started after the lock was taken, so it is not the holder."""
    import datetime
    import socket
    import subprocess
    import sys

    from kgtok.artifacts import StaleLockWarning, folder_lock

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        hour_ago = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)).isoformat()
        (tmp_path / "run.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                        "started": hour_ago}))
        with pytest.warns(StaleLockWarning, match=f"process {other.pid}, which no longer runs .* started later"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        other.kill()
        other.wait()
