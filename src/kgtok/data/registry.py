"""Registry of the benchmark knowledge graphs: where to download them, how to check them.

``kgtok data list`` prints :data:`DATASETS`; ``kgtok data fetch NAME DEST``
calls :func:`fetch`, which downloads a dataset from its public sources into
``DEST`` and refuses any file whose sha256 differs from the value recorded
here, so every user trains and evaluates on the same bytes.

Sources (the comment above ``_CONVE`` below says how each was confirmed):

- the ConvE paper's repository (Dettmers et al., 2018), which ships one
  archive per dataset at its root (``WN18RR.tar.gz``, ``FB15k-237.tar.gz``,
  ``umls.tar.gz``, ``kinship.tar.gz``, ``nations.tar.gz``) holding
  ``train.txt``, ``valid.txt`` and ``test.txt`` at the archive root (its
  ``preprocess.sh`` extracts each with ``tar -xvf X.tar.gz -C data/X`` and
  ``wrangle_KG.py`` then reads ``data/X/train.txt``; a ``./`` prefix on
  member names is tolerated);
- the RotatE paper's repository (Sun et al., 2019), which holds the same
  WN18RR and FB15k-237 splits as plain files under ``data/<name>/``;
- Microsoft's original FB15K-237 release (Toutanova and Chen, 2015), a zip
  whose splits sit under ``Release/``.

The entity text files (``entity_text.tsv`` of wn18rr and fb15k237) were
assembled by the kgtok team and have no public download; they are registered
as optional files with no source, and :func:`fetch` says so.

Layout of ``DEST/SOURCE.json`` written by :func:`fetch`::

    {"dataset": "wn18rr", "url": "https://...", "kind": "tar.gz",
     "date": "2025-01-01T12:00:00+00:00",
     "files": {"train.txt": "<sha256>", ...},
     "matched_by": {"train.txt": "sha256" | "sha256_lf", ...},
     "not_fetched": {"entity_text.tsv": "<why>"}}
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import posixpath
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Literal, get_args

from kgtok.artifacts import atomic_dir, sha256_file

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DatasetFile",
    "DatasetInfo",
    "DatasetSource",
    "FetchError",
    "fetch",
    "get_dataset",
    "list_datasets",
    "sha256_file",
]

SourceKind = Literal["tar.gz", "zip", "raw"]
SOURCE_FILE = "SOURCE.json"
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")
_CHUNK = 1 << 20  # bytes read or written at a time while streaming
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------
# Recorded values (from shared/datasets/README.md and the files themselves)
# ----------------------------------------------------------------------------

# sha256 of each file's bytes as distributed, copied from the team's
# shared/datasets/README.md.
SHA256: dict[str, dict[str, str]] = {
    "wn18rr": {
        "train.txt": "038612e783c215ee5f3ca9fbfca27b8d0739be1028fe4ee7c174aecf0b83d5df",
        "valid.txt": "453ce7202afa58094a04d2b1560ee2b02660f1c260b32ce6651c8ccedd1028ab",
        "test.txt": "0383bceaaa1096cf3c03ec021ed0048068e2355dbfc0239b292cefdac821cec5",
        "entity_text.tsv": "0d854fd85f275cdd96dc48a5417ffc80f60bb77e6ad2f39723a3a5fc706ad259",
    },
    "fb15k237": {
        "train.txt": "6e4c2782169af21e9743f3b1d200886f5d595bf6bc504ec1351720949c5cdfae",
        "valid.txt": "cf6309010852f6a8d47a45df830a426415d1ee6f7a3970a8376ff1fb81db4a5c",
        "test.txt": "5711cf41623ceb4eacc50eb6108a3ca6565c7492e3caaf82a3e355cc660d1574",
        "entity_text.tsv": "1ba5111b83306d01431f5d3a555513d7c187e1b412820510327d76a844014a5c",
    },
    "umls": {
        "train.txt": "873ef4925516b83e7f6f8cc02b4be51d848828710a7f65a956f0ac4a9e452f35",
        "valid.txt": "025c98f8a4891e2a6582ec5b40ee0d904031edad9c52554522f4b7904820c98e",
        "test.txt": "a7eb529a3d2810fcc96341ccc97c625a5e202f8389673aa6bd317eeebbb79014",
    },
    "kinship": {
        "train.txt": "738612111a6acf0e39662bde24c7e72a4d1edf20931beea077da367dda689731",
        "valid.txt": "c56f8630a583178b1e569f11a64aa535ae1ce0b0912d8b1e24716be2b37f04da",
        "test.txt": "05e5733265761d55be9c05bfaff5a8d0808df46f9c1e9d66cc3f2fe114e43d88",
    },
    "nations": {
        "train.txt": "0830fa9da8e5bba2ccdaa45b7bdc9130451ba66b09ff2708f35fccaf82473e57",
        "valid.txt": "2b337a62e51a2f45c283eac98a70d21b7e0e102136be1539b2a52c652a7b0530",
        "test.txt": "3971085165b47b6aeaec68058c6d8d98b3005e929db81268410b95ae4db770ab",
    },
}

# sha256 of the same files after turning every CRLF into LF.  The shared
# FB15k-237 triple files have Windows (CRLF) line endings, as does Microsoft's
# original release, and SHA256 above is of those bytes.  A mirror that
# re-committed the files (or git with autocrlf) may serve the same triples
# with LF endings; such a file is accepted when its LF-normalised content
# hashes to the value below.  The file is then kept exactly as downloaded
# (the readers accept either ending), and SOURCE.json records which hash
# matched.  Computed from shared/datasets/*; equal to SHA256 for LF files.
SHA256_LF: dict[str, dict[str, str]] = {
    "wn18rr": {
        "train.txt": "038612e783c215ee5f3ca9fbfca27b8d0739be1028fe4ee7c174aecf0b83d5df",
        "valid.txt": "453ce7202afa58094a04d2b1560ee2b02660f1c260b32ce6651c8ccedd1028ab",
        "test.txt": "0383bceaaa1096cf3c03ec021ed0048068e2355dbfc0239b292cefdac821cec5",
        "entity_text.tsv": "0d854fd85f275cdd96dc48a5417ffc80f60bb77e6ad2f39723a3a5fc706ad259",
    },
    "fb15k237": {
        "train.txt": "61099230e4439f90885ca9767739e31e8e32f54736fa1c35952b27997bc7c08a",
        "valid.txt": "749cbe9d923bac7b9354da5614ecfed2e0220256d442c3e04a6b303db1f273d9",
        "test.txt": "e2e35e8e6113de220140b6f44dc71a5207b0fc6872d575e874aefe13259b655b",
        "entity_text.tsv": "1ba5111b83306d01431f5d3a555513d7c187e1b412820510327d76a844014a5c",
    },
    "umls": {
        "train.txt": "873ef4925516b83e7f6f8cc02b4be51d848828710a7f65a956f0ac4a9e452f35",
        "valid.txt": "025c98f8a4891e2a6582ec5b40ee0d904031edad9c52554522f4b7904820c98e",
        "test.txt": "a7eb529a3d2810fcc96341ccc97c625a5e202f8389673aa6bd317eeebbb79014",
    },
    "kinship": {
        "train.txt": "738612111a6acf0e39662bde24c7e72a4d1edf20931beea077da367dda689731",
        "valid.txt": "c56f8630a583178b1e569f11a64aa535ae1ce0b0912d8b1e24716be2b37f04da",
        "test.txt": "05e5733265761d55be9c05bfaff5a8d0808df46f9c1e9d66cc3f2fe114e43d88",
    },
    "nations": {
        "train.txt": "0830fa9da8e5bba2ccdaa45b7bdc9130451ba66b09ff2708f35fccaf82473e57",
        "valid.txt": "2b337a62e51a2f45c283eac98a70d21b7e0e102136be1539b2a52c652a7b0530",
        "test.txt": "3971085165b47b6aeaec68058c6d8d98b3005e929db81268410b95ae4db770ab",
    },
}

# Entities, relations and triples per split, from the table in
# shared/datasets/README.md (entities and relations over all three splits).
COUNTS: dict[str, dict[str, int]] = {
    "wn18rr": {"entities": 40_943, "relations": 11, "train": 86_835, "valid": 3_034, "test": 3_134},
    "fb15k237": {"entities": 14_541, "relations": 237, "train": 272_115, "valid": 17_535, "test": 20_466},
    "umls": {"entities": 135, "relations": 46, "train": 5_216, "valid": 652, "test": 661},
    "kinship": {"entities": 104, "relations": 25, "train": 8_544, "valid": 1_068, "test": 1_074},
    "nations": {"entities": 14, "relations": 55, "train": 1_592, "valid": 199, "test": 201},
}


# ----------------------------------------------------------------------------
# Registry types
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset directory.

    Parameters
    ----------
    path : name inside the dataset directory, e.g. ``"train.txt"``.
    sha256 : hex sha256 of the file's bytes as distributed.
    sha256_lf : hex sha256 of the bytes with CRLF turned into LF (equal to
        ``sha256`` for a file without CRLF); a download matching it is accepted.
    optional : an optional file may be absent (it has no public source); when
        present it must still match.
    """

    path: str
    sha256: str
    sha256_lf: str
    optional: bool = False


@dataclass(frozen=True)
class DatasetSource:
    """A place to download a dataset's files from.

    Parameters
    ----------
    url : the archive's URL (``kind`` ``"tar.gz"`` or ``"zip"``), or the base
        URL that ``members`` are relative to (``kind`` ``"raw"``).
    kind : ``"tar.gz"``, ``"zip"`` or ``"raw"``.
    members : our file name -> member path in the archive, or -> URL path
        relative to ``url`` for raw files.  Only these members are ever read.
    """

    url: str
    kind: SourceKind
    members: dict[str, str]

    def member_url(self, file_name: str) -> str:
        """The URL of one raw file (``kind == "raw"``)."""
        return self.url.rstrip("/") + "/" + self.members[file_name].lstrip("/")


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its files, where to get them, what it holds.

    Parameters
    ----------
    name : registry name, e.g. ``"wn18rr"``.
    description : one paragraph for ``kgtok data list``.
    files : every file of the dataset directory, with its checksums.
    sources : download places, tried in order (the next one only after a
        network error on the previous).
    counts : ``entities``, ``relations``, ``train``, ``valid``, ``test``.
    license_note : the terms the data comes under, and where text comes from.
    """

    name: str
    description: str
    files: tuple[DatasetFile, ...]
    sources: tuple[DatasetSource, ...]
    counts: dict[str, int] = field(default_factory=dict)
    license_note: str = ""

    def __post_init__(self) -> None:
        # Report every inconsistency at once (a registry entry is written by
        # hand; one run of the tests should show all its mistakes).
        problems = []
        names = [f.path for f in self.files]
        if len(set(names)) != len(names):
            problems.append(f"files: duplicate names in {names}")
        for f in self.files:
            if not _is_plain_relative(f.path):
                problems.append(f"file {f.path!r}: expected a relative path without '..'")
            for attr in ("sha256", "sha256_lf"):
                value = getattr(f, attr)
                if not _HEX64.fullmatch(value):
                    problems.append(f"file {f.path!r}: {attr} {value!r} is not 64 lowercase hex digits")
        required = {f.path for f in self.files if not f.optional}
        for i, source in enumerate(self.sources):
            where = f"source {i} ({source.url})"
            if source.kind not in get_args(SourceKind):
                problems.append(f"{where}: kind {source.kind!r}; expected one of {get_args(SourceKind)}")
            if missing := sorted(required - set(source.members)):
                problems.append(f"{where}: no member for required file(s) {missing}")
            if unknown := sorted(set(source.members) - set(names)):
                problems.append(f"{where}: members name unregistered file(s) {unknown}")
        if problems:
            raise ValueError(f"dataset {self.name!r} is inconsistent:\n  " + "\n  ".join(problems))


def _is_plain_relative(path: str) -> bool:
    """True for a path such as ``train.txt`` or ``a/b.txt``: relative, no ``..``, no backslash."""
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


class ChecksumError(ValueError):
    """A file's sha256 differs from the registered value."""

    def __init__(
        self,
        path: str | Path,
        expected: str,
        actual: str,
        *,
        expected_lf: str | None = None,
        source: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        self.source = source
        lf = ""
        if expected_lf and expected_lf != expected:
            lf = f" (nor, with CRLF turned into LF, {expected_lf})"
        origin = f" downloaded from {source}" if source else ""
        super().__init__(
            f"{self.path}{origin}: sha256 is {actual}; expected {expected}{lf}. The file differs "
            "from the registered dataset (a corrupted download, or the source changed)."
        )


class FetchError(RuntimeError):
    """A dataset could not be downloaded or unpacked; the message names the URL and the cause."""


# ----------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------

# Sources of the standard splits.  Confirmed in stored copies of the
# repositories: TimDettmers/ConvE holds WN18RR.tar.gz, FB15k-237.tar.gz,
# umls.tar.gz, kinship.tar.gz and nations.tar.gz at its root;
# DeepGraphLearning/KnowledgeGraphEmbedding holds data/wn18rr/{train,valid,
# test}.txt (sizes equal to ours; wn18rr/test.txt compared byte for byte over
# its first 16 kB) and data/FB15k-237/{valid,test}.txt (CRLF, sizes equal to
# ours; train.txt is too large for the stored copy but is read by that repo's
# scripts and fetched from this URL by other public code).  The github.com
# /raw/master/ archive URLs are the ones PyKEEN and TensorFlow Datasets use
# (PyKEEN reads WN18RR's splits as train.txt etc. at the archive root).  The
# Microsoft URL and its Release/ layout are the ones public code uses; its
# bytes were not compared with ours: the checksums decide.
_CONVE = "https://github.com/TimDettmers/ConvE/raw/master/"
_ROTATE = "https://raw.githubusercontent.com/DeepGraphLearning/KnowledgeGraphEmbedding/master/data/"
# Microsoft's original FB15K-237 release; the zip holds Release/train.txt etc.
_FB15K237_MICROSOFT = (
    "https://download.microsoft.com/download/8/7/0/8700516A-AB3D-4850-B4BB-805C515AECE1/FB15K-237.2.zip"
)


def _splits(prefix: str = "") -> dict[str, str]:
    return {name: prefix + name for name in SPLIT_FILES}


def _files(name: str, optional: tuple[str, ...] = ()) -> tuple[DatasetFile, ...]:
    return tuple(
        DatasetFile(path, SHA256[name][path], SHA256_LF[name][path], optional=path in optional)
        for path in SHA256[name]
    )


_CONVE_TERMS = (
    "Splits as distributed in the ConvE repository (github.com/TimDettmers/ConvE); "
    "cite Kok and Domingos (2007) for the original data."
)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="wn18rr",
            description=(
                "WN18RR (Dettmers et al., 2018): WordNet 3.0 synsets linked by 11 relations, "
                "WN18 without its inverse-relation test leakage. Ids are WordNet synset offsets. "
                "entity_text.tsv (lemma + WordNet gloss) is optional and not downloaded."
            ),
            files=_files("wn18rr", optional=("entity_text.tsv",)),
            sources=(
                DatasetSource(_CONVE + "WN18RR.tar.gz", "tar.gz", _splits()),
                DatasetSource(_ROTATE + "wn18rr/", "raw", _splits()),
            ),
            counts=COUNTS["wn18rr"],
            license_note=(
                "WordNet 3.0 license (Princeton University; permissive, keep the copyright "
                "notice). entity_text.tsv was assembled by the kgtok team from WordNet 3.0 and "
                "has no public download: supply it yourself."
            ),
        ),
        DatasetInfo(
            name="fb15k237",
            description=(
                "FB15k-237 (Toutanova and Chen, 2015): Freebase entities and 237 relations, FB15k "
                "without near-duplicate and inverse relations. Ids are Freebase mids; the triple "
                "files use CRLF line endings. entity_text.tsv (Wikidata label + description) is "
                "optional and not downloaded."
            ),
            files=_files("fb15k237", optional=("entity_text.tsv",)),
            sources=(
                DatasetSource(_CONVE + "FB15k-237.tar.gz", "tar.gz", _splits()),
                DatasetSource(_ROTATE + "FB15k-237/", "raw", _splits()),
                DatasetSource(_FB15K237_MICROSOFT, "zip", _splits("Release/")),
            ),
            counts=COUNTS["fb15k237"],
            license_note=(
                "Terms of Microsoft's FB15K-237 release (see its README.txt). entity_text.tsv: "
                "Wikidata labels and descriptions as collected by the KG-FIT authors, assembled "
                "by the kgtok team; no public download: supply it yourself."
            ),
        ),
        DatasetInfo(
            name="umls",
            description=(
                "UMLS (Kok and Domingos, 2007): 135 biomedical concepts of the Unified Medical "
                "Language System semantic network and 46 relations; ids are readable names."
            ),
            files=_files("umls"),
            sources=(DatasetSource(_CONVE + "umls.tar.gz", "tar.gz", _splits()),),
            counts=COUNTS["umls"],
            license_note=_CONVE_TERMS,
        ),
        DatasetInfo(
            name="kinship",
            description=(
                "Kinship (Kok and Domingos, 2007): Alyawarra kinship terms between 104 people, "
                "25 relations; ids are anonymous. About 48% of relations have inverses "
                "(ConvE README): a sanity benchmark, not a research one."
            ),
            files=_files("kinship"),
            sources=(DatasetSource(_CONVE + "kinship.tar.gz", "tar.gz", _splits()),),
            counts=COUNTS["kinship"],
            license_note=_CONVE_TERMS,
        ),
        DatasetInfo(
            name="nations",
            description=(
                "Nations (Kok and Domingos, 2007): 14 countries and 55 political, economic and "
                "military relations; ids are country names. Over 95% of relations have inverses "
                "(ConvE README): a sanity benchmark, not a research one."
            ),
            files=_files("nations"),
            sources=(DatasetSource(_CONVE + "nations.tar.gz", "tar.gz", _splits()),),
            counts=COUNTS["nations"],
            license_note=_CONVE_TERMS,
        ),
    )
}


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset, in registry order."""
    return list(DATASETS.values())


def get_dataset(name: str) -> DatasetInfo:
    """The registered dataset called ``name`` (case, ``-`` and ``_`` ignored: ``FB15k-237`` works).

    Raises
    ------
    ValueError
        naming the unknown name and the known ones.
    """
    key = re.sub(r"[-_\s]", "", name.lower())
    if key in DATASETS:
        return DATASETS[key]
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------

# What counts as a network error, after which the next source is tried:
# URLError covers HTTP errors (404, 500) and refused connections; OSError
# covers timeouts and resets; HTTPException covers truncated responses.
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def fetch(
    name_or_info: str | DatasetInfo,
    dest: str | Path,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download a dataset into ``dest`` and verify every file's sha256.

    The files are downloaded and unpacked into a temporary sibling of
    ``dest`` (``.NAME.tmp-XXXX``), checked, then renamed to ``dest``, so
    ``dest`` either holds the complete verified dataset or does not exist.

    Parameters
    ----------
    name_or_info : a registered name (see :func:`get_dataset`) or a DatasetInfo.
    dest : the dataset directory to create, e.g. ``data/wn18rr``.
    timeout : seconds to wait on each network operation (default 60).
    progress : show a progress bar (bytes) for each download (default True).

    Returns
    -------
    Path
        ``dest``.  If ``dest`` already holds the verified files it is
        returned without downloading anything.

    Raises
    ------
    FetchError
        every source failed with a network error, or an archive lacks a
        member (or names a link instead of a file).
    ChecksumError
        a downloaded file's sha256 differs from the registered one.
    FileExistsError
        ``dest`` exists but its files are missing or do not verify.
    """
    # Over 60 lines on purpose: download, verify, extract, rename: the steps in the order they must happen.
    info = name_or_info if isinstance(name_or_info, DatasetInfo) else get_dataset(name_or_info)
    dest = Path(dest).expanduser()
    if dest.exists():
        problems = _existing_problems(info, dest)
        if problems:
            raise FileExistsError(
                f"{dest} already exists but does not hold a verified copy of {info.name}: "
                + "; ".join(problems)
                + ". Remove it or choose another destination."
            )
        _say(f"{dest} already holds a verified copy of {info.name}; nothing downloaded")
        return dest

    with atomic_dir(dest) as tmp:
        source = _download_any(info, tmp, timeout=timeout, progress=progress)
        hashes, matched_by = {}, {}
        for f in info.files:
            if (tmp / f.path).exists():
                url = source.member_url(f.path) if source.kind == "raw" else source.url
                hashes[f.path], matched_by[f.path] = _verify(
                    tmp / f.path, f, label=f"{info.name}/{f.path}", source=url
                )
        not_fetched = {}
        for f in info.files:
            if f.optional and f.path not in matched_by:
                why = (
                    "no public source is registered; text must be supplied by the user "
                    f"(place it at {dest / f.path}; expected sha256 {f.sha256})"
                )
                not_fetched[f.path] = why
                _say(f"note: {info.name}: {f.path} was not downloaded: {why}")
        record = {
            "dataset": info.name,
            "url": source.url,
            "kind": source.kind,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": hashes,
            "matched_by": matched_by,
            "not_fetched": not_fetched,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _say(f"{info.name}: {len(matched_by)} file(s) verified in {dest}")
    return dest


def _download_any(info: DatasetInfo, tmp: Path, *, timeout: float, progress: bool) -> DatasetSource:
    """Fetch the dataset's files into ``tmp`` from the first source that answers."""
    if not info.sources:
        raise FetchError(f"dataset {info.name!r} has no registered source to download from")
    failures: list[tuple[str, BaseException]] = []
    for source in info.sources:
        written: list[Path] = []
        url = source.url
        try:
            if source.kind == "raw":
                for file_name in source.members:
                    url = source.member_url(file_name)
                    written.append(tmp / file_name)
                    _download(url, tmp / file_name, timeout=timeout, progress=progress)
            else:
                archive = tmp / (".archive." + source.kind)
                written.append(archive)
                _download(url, archive, timeout=timeout, progress=progress)
                _extract_members(info, source, archive, tmp)
                archive.unlink()
            return source
        except _NETWORK_ERRORS as e:
            failures.append((url, e))
            _say(f"{info.name}: could not download {url}: {_describe(e)}")
            for path in written:
                path.unlink(missing_ok=True)
    lines = "\n  ".join(f"{url}: {_describe(e)}" for url, e in failures)
    raise FetchError(
        f"could not download {info.name} from any of its {len(failures)} source(s):\n  {lines}\n"
        "Check the network connection (or proxy settings), or download the files by hand "
        "and compare their sha256 with the registry (kgtok.data.registry)."
    ) from failures[-1][1]


def _download(url: str, path: Path, *, timeout: float, progress: bool) -> None:
    """Stream ``url`` into ``path`` with a byte progress bar."""
    from tqdm import tqdm  # imported here: `kgtok data list` never downloads

    request = urllib.request.Request(url, headers={"User-Agent": "kgtok-dataset-fetch"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with open(path, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1], disable=not progress, file=sys.stderr,
        ) as bar:
            received = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise http.client.IncompleteRead(b"", total - received)


def _extract_members(info: DatasetInfo, source: DatasetSource, archive: Path, tmp: Path) -> None:
    """Copy the named members of ``archive`` to ``tmp / our_name``.

    Only the members named in ``source.members`` are read, each as a file
    object, and written under our own file name; no member name is ever used
    as an output path (no ``extractall``), so an archive entry such as
    ``../evil`` or a link cannot write outside ``tmp``.  A named member that
    is not a regular file (a symlink, a hard link, a directory) is refused.
    """
    optional = {f.path for f in info.files if f.optional}
    try:
        with _Archive(archive, source.kind) as reader:
            for file_name, member in source.members.items():
                try:
                    data = reader.open(member)
                except KeyError as e:
                    if file_name in optional:
                        continue
                    raise FetchError(f"{source.url}: {e.args[0]}") from None
                with data, open(tmp / file_name, "wb") as out:
                    shutil.copyfileobj(data, out, _CHUNK)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise FetchError(f"{source.url}: cannot read the {source.kind} archive: {e}") from e


class _Archive:
    """Read-only access to the regular-file members of a tar.gz or zip archive, by name."""

    def __init__(self, path: Path, kind: SourceKind) -> None:
        self.kind = kind
        if kind == "tar.gz":
            self._tar = tarfile.open(path, "r:gz")
            self._entries = {_normalise_member(i.name): i for i in self._tar.getmembers()}
        elif kind == "zip":
            self._zip = zipfile.ZipFile(path)
            self._entries = {_normalise_member(i.filename): i for i in self._zip.infolist()}
        else:
            raise ValueError(f"source kind {kind!r} is not an archive")

    def open(self, member: str) -> IO[bytes]:
        """A file object for ``member``; KeyError with a readable message when absent."""
        entry = self._entries.get(_normalise_member(member))
        if entry is None:
            shown = sorted(self._entries)
            listing = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")
            raise KeyError(f"archive has no member {member!r}; it holds: {listing or 'nothing'}")
        if self.kind == "tar.gz":
            if not entry.isfile():  # a symlink or hard link could point anywhere
                raise KeyError(f"member {member!r} is not a regular file (tar type {entry.type!r}); refused")
            handle = self._tar.extractfile(entry)
            assert handle is not None  # regular files always have data
            return handle
        if entry.is_dir():
            raise KeyError(f"member {member!r} is a directory, not a file")
        return self._zip.open(entry)

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        (self._tar if self.kind == "tar.gz" else self._zip).close()


def _normalise_member(name: str) -> str:
    # "./train.txt" and "train.txt" name the same member: tar archives made
    # with `tar -C dir .` prefix every name with "./".
    return posixpath.normpath(name.replace("\\", "/")).lstrip("/")


def _verify(path: Path, expected: DatasetFile, *, label: str, source: str | None = None) -> tuple[str, str]:
    """Check one file; return its sha256 and which registered hash matched it.

    The second value is ``"sha256"`` (the bytes match) or ``"sha256_lf"``
    (they match once CRLF is turned into LF).

    ``label`` names the file in the error (the temporary path means nothing
    to the reader once it is removed).
    """
    actual = sha256_file(path)
    if actual == expected.sha256:
        return actual, "sha256"
    if _sha256_lf_file(path) == expected.sha256_lf:
        return actual, "sha256_lf"
    raise ChecksumError(label, expected.sha256, actual, expected_lf=expected.sha256_lf, source=source)


def _sha256_lf_file(path: str | Path) -> str:
    """sha256 of a file's bytes with every CRLF turned into LF, streamed in chunks."""
    digest = hashlib.sha256()
    carry = b""  # a CR at the end of a chunk may start a CRLF split across chunks
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""
            if carry:
                chunk = chunk[:-1]
            digest.update(chunk.replace(b"\r\n", b"\n"))
    digest.update(carry)
    return digest.hexdigest()


def _existing_problems(info: DatasetInfo, dest: Path) -> list[str]:
    """Why ``dest`` is not a verified copy of ``info`` (empty when it is)."""
    if not dest.is_dir():
        return ["it is not a directory"]
    problems = []
    for f in info.files:
        path = dest / f.path
        if not path.is_file():
            if not f.optional:
                problems.append(f"{f.path} is missing")
            continue
        try:
            _verify(path, f, label=str(path))
        except ChecksumError as e:
            problems.append(f"{f.path} has sha256 {e.actual}, expected {f.sha256}")
    return problems


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}"


def _say(message: str) -> None:
    """Tell the person running the fetch (stderr, so stdout stays machine-readable)."""
    print(message, file=sys.stderr)
