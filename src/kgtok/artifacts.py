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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kgtok.config import config_to_dict

MANIFEST = "manifest.json"

# Packages whose versions decide whether an artifact can be reproduced.
TRACKED_PACKAGES = (
    "kgtok", "torch", "numpy", "scipy", "scikit-learn", "faiss-cpu",
    "transformers", "tokenizers", "peft", "accelerate", "sentence-transformers",
)


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


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, default=_json_default)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


ID_ORDER = "entities.tsv"


def write_id_order(path: str | Path, names: list[str]) -> None:
    """``id<TAB>raw name`` lines: the row order of an artifact's per-entity arrays."""
    Path(path).write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)), encoding="utf-8")


def read_id_order(path: str | Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def load_entity_vectors(artifact: str | Path, filename: str, entity_names: list[str]) -> Any:
    """(N, D) array of an upstream artifact, checked to be in this KG's entity order."""
    import numpy as np

    artifact = Path(artifact)
    path = artifact / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {artifact} a finished stage artifact?")
    vectors = np.load(path)
    order_file = artifact / ID_ORDER
    if order_file.exists() and read_id_order(order_file) != list(entity_names):
        raise ValueError(f"{order_file}: entity order differs from the KG's; was the artifact made from another dataset?")
    if len(vectors) != len(entity_names):
        raise ValueError(f"{path}: {len(vectors)} rows for {len(entity_names)} entities")
    return vectors


def read_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when there is none."""
    path = Path(artifact) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_matches(
    artifact: str | Path, stage: str, config: object, inputs: Mapping[str, str]
) -> bool:
    """True when ``artifact`` was made by ``stage`` with this config and these input hashes."""
    manifest = read_manifest(artifact)
    if manifest is None:
        return False
    return (
        manifest.get("stage") == stage
        and manifest.get("config") == json.loads(json.dumps(config_to_dict(config), default=_json_default))
        and manifest.get("inputs") == dict(inputs)
    )


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

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[name]`` (seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

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
            **self.extra,
        }


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
    ``dest``.  On normal exit the manifest is written and the directory renamed
    to ``dest`` (an older ``dest`` is replaced); on an exception the temporary
    directory is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    writer = ArtifactWriter(path=tmp, stage=stage, config=config, inputs=dict(inputs or {}))
    start = time.perf_counter()
    try:
        yield writer
        writer.timings.setdefault("total", time.perf_counter() - start)
        write_json_atomic(tmp / MANIFEST, writer.manifest())
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
