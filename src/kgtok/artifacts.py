"""Artifact directories shared by every stage.

A stage writes its outputs into a temporary sibling directory and renames it
into place only when everything succeeded, so a crash never leaves a
half-written artifact that a later stage (or the cache) would trust.  Each
artifact holds ``manifest.json``: stage, config, input hashes, package
versions, git hash, seed, metrics and timings.

Layout of ``manifest.json``::

    {"stage": "embed", "kgtok_version": "0.1.0", "created": "...",
     "config": {...}, "inputs": {"train.txt": "<sha256>", ...},
     "versions": {"torch": "2.13.0+cpu", ...}, "git": "<hash or null>",
     "metrics": {...}, "timings": {"train": 12.3}}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from kgtok.config import config_to_dict, result_config, saved_result_config

MANIFEST = "manifest.json"

# Packages whose versions decide whether an artifact can be reproduced.
TRACKED_PACKAGES = (
    "kgtok", "torch", "numpy", "scipy", "scikit-learn", "faiss-cpu",
    "transformers", "tokenizers", "peft", "accelerate", "sentence-transformers",
)


def cache_root() -> Path:
    """kgtok's cache of things made once per machine (text vectors, converted backbones): ``$KGTOK_CACHE_DIR``
    when set, else ``~/.cache/kgtok``."""
    root = os.environ.get("KGTOK_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kgtok"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files use little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_inputs(paths: Mapping[str, str | Path]) -> dict[str, str]:
    """Content hash of each named input: a file's sha256, or an artifact's manifest hash.

    For an artifact directory the hash of its ``manifest.json`` stands for the
    whole directory: the manifest records its own inputs and config, so it
    changes whenever the artifact would.
    """
    out = {}
    for name, path in paths.items():
        path = Path(path)
        if path.is_dir():
            manifest = path / MANIFEST
            if manifest.exists():
                out[name] = sha256_file(manifest)
            else:  # a plain data directory: hash its files in name order
                digest = hashlib.sha256()
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(str(file.relative_to(path)).encode())
                    digest.update(sha256_file(file).encode())
                out[name] = digest.hexdigest()
        elif path.exists():
            out[name] = sha256_file(path)
    return out


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape results (no imports: cheap)."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_hash(cwd: str | Path | None = None) -> str | None:
    """Commit of the kgtok checkout, when it runs from one."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary sibling of ``path`` to write; renamed onto ``path`` when the block succeeds.

    The one write-then-rename helper of the package: a kill or a full disk
    never leaves a half-written file under the real name, and two processes
    writing the same file never share a temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and back): what plain files and folders get, the temporary
    ones (0600 / 0700) are given before they take their real name."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON through :func:`atomic_path` (never half-written); ``indent=None``: one line, by json's C
    encoder (an indent makes it take the pure-Python one: 37 s for a 1M-entity hierarchy.json)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


ID_ORDER = "entities.tsv"


def write_id_order(path: str | Path, names: list[str]) -> None:
    """``id<TAB>raw name`` lines: the row order of an artifact's per-entity arrays."""
    write_text_atomic(path, "".join(f"{i}\t{n}\n" for i, n in enumerate(names)))


def read_id_order(path: str | Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def check_id_order(order_file: str | Path, names: list[str], what: str = "entity") -> None:
    """An artifact's row order (its entities.tsv or relations.tsv) must be the KG's: its ids are rows there."""
    order_file = Path(order_file)
    if order_file.exists() and read_id_order(order_file) != list(names):
        raise ValueError(f"{order_file}: {what} order differs from the KG's; was the artifact made from another "
                         "dataset?")


def load_entity_vectors(path: str | Path, entity_names: list[str]) -> Any:
    """(N, D) array of an upstream artifact's file, checked to be in this KG's entity order.

    The order is the artifact's ``entities.tsv`` beside the file.
    """
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a finished stage artifact?")
    vectors = np.load(path)
    check_id_order(path.parent / ID_ORDER, entity_names)
    if len(vectors) != len(entity_names):
        raise ValueError(f"{path}: {len(vectors)} rows for {len(entity_names)} entities")
    return vectors


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing or cannot be read (torn, foreign)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when there is none or it is unreadable (or not a JSON
    object): then the artifact is not finished, and is made again."""
    manifest = read_json(Path(artifact) / MANIFEST)
    return manifest if isinstance(manifest, dict) else None


def warn_if_made_from_another(artifact: str | Path, name: str, given: str | Path) -> None:
    """``artifact``'s manifest records the ``name`` input it was made from: given another one (a model scored on
    instructions it was not trained on, instructions fine-tuned with other codes), a stage runs without error, so
    it is said."""
    import warnings

    recorded = ((read_manifest(artifact) or {}).get("inputs") or {}).get(name)
    if recorded is not None and recorded != hash_inputs({name: given})[name]:
        warnings.warn(f"{artifact} was made from other {name} than {given} (its manifest's input hash differs): "
                      f"are these the {name} it belongs with?", stacklevel=3)


def manifest_matches(
    artifact: str | Path, stage: str, config: object, inputs: Mapping[str, str]
) -> bool:
    """True when ``artifact`` was made by ``stage`` with this config and these input hashes.

    Fields marked ``machine`` in the config (threads, scoring batch sizes) are
    left out of the comparison: they never change what a stage computes.
    """
    manifest = read_manifest(artifact)
    if manifest is None:
        return False
    return (
        manifest.get("stage") == stage
        and saved_result_config(manifest.get("config") or {}, type(config))
        == result_config(config_to_dict(config), type(config))
        and manifest.get("inputs") == dict(inputs)
    )


# ----------------------------------------------------------------------------
# What an artifact holds: file sizes and fast content hashes, checked on reuse
# ----------------------------------------------------------------------------

WHOLE_FILE_LIMIT = 64 << 20  # files up to this size are hashed whole; larger ones by size and sampled chunks
SAMPLE = 4 << 20


def file_fingerprint(path: Path) -> str:
    """blake2b of the whole file, or of its size and first/middle/last chunks when it is large.

    Cheap enough to run on every reuse (a 500 MB model is read in 12 MB),
    and catches what goes wrong in practice: truncation, an emptied or
    replaced file.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        else:
            for offset in (0, size // 2, size - SAMPLE):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "hash"}}`` of every file below ``root`` but the manifest."""
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "hash": file_fingerprint(p)}
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def verify_files(artifact: str | Path) -> list[str]:
    """The files of an artifact that are missing or differ from its manifest's record (empty: intact).

    Manifests written before files were recorded have nothing to check.
    """
    artifact = Path(artifact)
    recorded = (read_manifest(artifact) or {}).get("files") or {}
    bad = []
    for name, record in recorded.items():
        path = artifact / name
        if not path.is_file() or path.stat().st_size != record["size"] or file_fingerprint(path) != record["hash"]:
            bad.append(name)
    return bad


@dataclass
class ArtifactWriter:
    """Collects metrics and timings while a stage writes into ``path`` (a temp dir)."""

    path: Path
    stage: str
    config: object
    inputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Add the wall time of the block to ``timings[name]`` (seconds)."""
        return timed(self.timings, name)

    def manifest(self) -> dict[str, Any]:
        versions = package_versions()
        return {
            "stage": self.stage,
            "kgtok_version": versions.get("kgtok"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config_to_dict(self.config),
            "inputs": self.inputs,
            "versions": versions,
            "git": git_hash(),
            "metrics": self.metrics,
            "timings": self.timings,
            "files": file_records(self.path),
            **self.extra,
        }


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[name]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """A unique temporary sibling directory of ``dest``, moved onto ``dest`` when the block succeeds.

    On an exception the temporary directory is removed and ``dest`` is left
    as it was.  Every directory the package writes goes through here.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the folder from other users
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def artifact_dir(
    dest: str | Path,
    *,
    stage: str,
    config: object,
    inputs: Mapping[str, str] | None = None,
) -> Iterator[ArtifactWriter]:
    """Write a stage's artifact atomically.

    Yields an :class:`ArtifactWriter` whose ``path`` is a temporary sibling of
    ``dest``.  On normal exit the manifest (with every file's size and hash)
    is written and the directory renamed to ``dest`` (an older ``dest`` is
    replaced); on an exception nothing changes.
    """
    start = time.perf_counter()
    refuse_foreign_dir(Path(dest), stage)
    with atomic_dir(dest) as tmp:
        writer = ArtifactWriter(path=tmp, stage=stage, config=config, inputs=dict(inputs or {}))
        yield writer
        writer.timings.setdefault("total", time.perf_counter() - start)
        write_json_atomic(tmp / MANIFEST, writer.manifest())


def refuse_foreign_dir(dest: Path, stage: str | None = None) -> None:
    """A directory that holds files but no kgtok manifest is someone's data (a KG, notes), and one that holds
    another stage's artifact is most likely an --out mistyped: written there, either would be replaced, so the
    write is refused before any work (``stage``: the stage about to write; None: any artifact may be replaced)."""
    if dest.exists() and not dest.is_dir():  # replace_dir would move the user's file aside and leave it there
        raise FileExistsError(f"{dest}: is a file, not a folder; kgtok writes an artifact folder there and "
                              "replaces only its own artifacts: give another --out, or remove it")
    manifest = read_manifest(dest) if dest.is_dir() else None  # read once for both checks
    refuse_unmarked_dir(dest, lambda _: manifest is not None, f"has no {MANIFEST}, so it is not a kgtok "
                        "artifact; kgtok replaces only its own artifacts: give another --out, or remove it")
    held = manifest.get("stage") if manifest is not None and stage is not None else None
    if held is not None and held != stage:
        raise FileExistsError(f"{dest}: holds a {held} artifact, which a {stage} artifact would replace: give "
                              "another --out, or remove it")


def refuse_unmarked_dir(dest: Path, marked: Callable[[Path], bool], why: str) -> None:
    """Refuse to replace a non-empty directory that ``marked`` does not know as kgtok's (``why`` says so)."""
    if dest.is_dir() and not dest.is_symlink() and any(dest.iterdir()) and not marked(dest):
        raise FileExistsError(f"{dest}: exists, is not empty and {why}")


def replace_dir(src: Path, dest: Path) -> None:
    """Move directory ``src`` to ``dest``, replacing an existing ``dest``.

    POSIX cannot rename over a non-empty directory, so the old one is first
    moved aside; the window in which ``dest`` is missing is two renames long.
    """
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None and old.is_symlink():  # a link is replaced; what it pointed to stays
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(parent: Path, name: str, max_age_s: float = 0.0) -> None:
    """Remove temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) that a killed process left behind.

    Called while holding the folder's lock, so no live writer owns them.
    """
    import glob

    name = glob.escape(name)  # an --out named "a[1]" or "x*" must not match another folder's leftovers
    for leftover in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        if leftover.is_dir() and time.time() - leftover.stat().st_mtime >= max_age_s:
            shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------
# One process per output folder
# ----------------------------------------------------------------------------


class LockedError(RuntimeError):
    """Another live kgtok process writes the same output folder."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reused(pid: int, taken: Any) -> bool:
    """The live process ``pid`` started after the lock was taken (``taken``: the file's ISO time), so it is not
    the holder: a killed holder's PID went to another process (containers reuse small PIDs). Linux only."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        begun = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks since boot
        return begun > _dt.datetime.fromisoformat(str(taken)).timestamp() + 2.0  # its times are whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return False


@contextlib.contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (holder PID, host, start time) while a stage or run writes ``path``.

    The lock is the kernel's (``flock``), so two processes never both hold it,
    and a killed holder's is free at once; the file says who holds it.  A
    second process on the same folder stops with a message naming the holder;
    the file of a process that is gone is taken over with a warning (a live
    process named in a file it does not lock, as older kgtok wrote them, still
    counts, unless it started after the lock was taken: a reused PID).
    Re-entrant within one process (``kgtok run`` locks the run folder, then
    each stage its own).
    """
    import fcntl
    import socket
    import warnings

    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        holder = _lock_holder(fd)
        if holder.get("pid") == me["pid"] and holder.get("host") == me["host"] and not locked:
            os.close(fd)
            yield  # this process holds it already
            return
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same_file = False
        if locked and not same_file:  # the holder let go and removed the file after we opened it: again
            os.close(fd)
            continue
        pid = holder.get("pid")
        live = holder.get("host") == me["host"] and isinstance(pid, int) and pid != me["pid"] and _alive(pid)
        reused = live and locked and _reused(pid, holder.get("started"))
        live = live and not reused
        if not locked or live:
            os.close(fd)
            raise LockedError(
                f"{path} is in use by another kgtok process (pid {pid}, started {holder.get('started')}); "
                f"wait for it to finish, or give another output folder. If no such process runs, delete {lock}")
        if holder.get("host") not in (None, me["host"]):
            os.close(fd)
            raise LockedError(f"{path} is locked by a process on host {holder['host']} (pid {pid}); "
                              f"if it is gone, delete {lock}")
        if pid is not None and pid != me["pid"]:
            warnings.warn(f"{lock}: taking over the lock of process {pid}, which no longer runs "
                          f"(started {holder.get('started')})" + ("; its PID is now another process's, started "
                                                                  "later" if reused else ""),
                          StaleLockWarning, stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # before letting go: a process that opened it sees it gone, above
            os.close(fd)
        return
    raise LockedError(f"could not take {lock}: other processes keep taking it")


def _lock_holder(fd: int) -> dict[str, Any]:
    """The holder a lock file names (empty while its holder has not written it yet, or for a new file)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


# ----------------------------------------------------------------------------
# Artifact layouts: each stage's files, read through typed accessors
# ----------------------------------------------------------------------------


class File:
    """A file of an artifact layout: ``codes = File("codes.npy")`` makes ``artifact.codes`` its path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, artifact: Artifact | None, owner: type) -> Path:
        if artifact is None:
            return Path(self.name)  # on the class: the name relative to the artifact
        return artifact.path / self.name


class ArtifactError(ValueError):
    """A directory given as a stage's artifact is not one (or not of that stage)."""


@dataclass(frozen=True)
class Artifact:
    """A finished artifact directory of one stage; subclasses name its files.

    Every reader of an artifact (later stages, the report, the CLI) goes
    through a subclass's accessors, so a file name is written in one place.
    """

    path: Path
    stage: ClassVar[str] = ""
    title: ClassVar[str] = ""  # e.g. "stage-1 (embed)": used in messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path) or {}

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def metrics(self) -> dict[str, Any]:
        """The stage's full metrics file (or the manifest's summary where there is none)."""
        if self.metrics_path.exists():
            return json.loads(self.metrics_path.read_text(encoding="utf-8"))
        return self.manifest.get("metrics", {})

    def exists(self) -> bool:
        return read_manifest(self.path) is not None

    def checked(self, flag: str | None = None) -> Artifact:
        """Self, once it is sure to be a finished artifact of this stage; else an error naming ``flag``."""
        what = f"{flag} {self.path}" if flag else str(self.path)
        expected = self.title or self.stage
        if not self.path.is_dir():
            raise ArtifactError(f"{what}: no such directory; expected a {expected} artifact")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise ArtifactError(f"{what}: not a finished kgtok artifact (no readable {MANIFEST}); "
                                f"expected a {expected} artifact")
        if self.stage and manifest.get("stage") != self.stage:
            raise ArtifactError(f"{what}: a {manifest.get('stage')!r} artifact, but a {expected} artifact "
                                f"is expected here")
        return self
