"""Dataset registry: fetch from a local HTTP server (never the internet), checksums, sources.

The fake datasets are served by ``http.server`` on 127.0.0.1; each test
builds a :class:`DatasetInfo` whose sources point at that server.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kgtok.data.registry import (
    COUNTS,
    DATASETS,
    SHA256,
    SHA256_LF,
    ChecksumError,
    DatasetFile,
    DatasetInfo,
    DatasetSource,
    FetchError,
    fetch,
    get_dataset,
    list_datasets,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KGTOK_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))

SPLITS = {
    "train.txt": b"a\tr1\tb\nb\tr2\tc\nc\tr1\ta\n",
    "valid.txt": b"a\tr2\tc\n",
    "test.txt": b"b\tr1\tc\n",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_lf(data: bytes) -> str:
    return sha(data.replace(b"\r\n", b"\n"))


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over ``tmp_path/www``; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def refused_url():
    """A URL on a port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/toy.tar.gz"


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def toy_info(
    sources: tuple[DatasetSource, ...],
    splits: dict[str, bytes] = SPLITS,
    *,
    wrong: str | None = None,
    optional: dict[str, bytes] | None = None,
) -> DatasetInfo:
    """A DatasetInfo for ``splits``; ``wrong`` names a file given a wrong sha256."""
    files = [
        DatasetFile(name, *((sha(b"x"),) * 2 if name == wrong else (sha(data), sha_lf(data))))
        for name, data in splits.items()
    ]
    files += [
        DatasetFile(name, sha(data), sha_lf(data), optional=True) for name, data in (optional or {}).items()
    ]
    return DatasetInfo(
        name="toy",
        description="toy KG for tests",
        files=tuple(files),
        sources=sources,
        counts={"entities": 3, "relations": 2, "train": 3, "valid": 1, "test": 1},
        license_note="test data",
    )


def tar_source(root: Path, base: str, name: str = "toy.tar.gz", prefix: str = "toy/") -> DatasetSource:
    write_tar(root / name, {prefix + k: v for k, v in SPLITS.items()})
    return DatasetSource(f"{base}/{name}", "tar.gz", {k: prefix + k for k in SPLITS})


def leftovers(parent: Path, dest: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{dest.name}.tmp-")]


# ----------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------


def test_fetch_tar_archive_verifies_files_and_writes_source_json(server, tmp_path):
    root, base = server
    source = tar_source(root, base)
    dest = tmp_path / "out" / "toy"

    assert fetch(toy_info((source,)), dest, timeout=5, progress=True) == dest

    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.json", "test.txt", "train.txt", "valid.txt"]
    for name, data in SPLITS.items():
        assert (dest / name).read_bytes() == data
    record = json.loads((dest / "SOURCE.json").read_text())
    assert record["url"] == source.url
    assert record["files"] == {name: sha(data) for name, data in SPLITS.items()}
    assert record["matched_by"] == dict.fromkeys(SPLITS, "sha256")
    assert re.match(r"\d{4}-\d{2}-\d{2}T", record["date"])
    assert leftovers(dest.parent, dest) == []


def test_fetch_raw_files_and_zip(server, tmp_path):
    root, base = server
    (root / "raw" / "toy").mkdir(parents=True)
    for name, data in SPLITS.items():
        (root / "raw" / "toy" / name).write_bytes(data)
    with zipfile.ZipFile(root / "toy.zip", "w") as zf:
        for name, data in SPLITS.items():
            zf.writestr("Release/" + name, data)

    raw = DatasetSource(f"{base}/raw/toy/", "raw", {k: k for k in SPLITS})
    packed = DatasetSource(f"{base}/toy.zip", "zip", {k: "Release/" + k for k in SPLITS})
    for source, dest in ((raw, tmp_path / "raw_out"), (packed, tmp_path / "zip_out")):
        fetch(toy_info((source,)), dest, timeout=5, progress=False)
        for name, data in SPLITS.items():
            assert (dest / name).read_bytes() == data


def test_wrong_sha256_raises_checksum_error_and_leaves_nothing(server, tmp_path):
    root, base = server
    info = toy_info((tar_source(root, base),), wrong="valid.txt")
    dest = tmp_path / "out" / "toy"

    with pytest.raises(ChecksumError, match="valid.txt") as caught:
        fetch(info, dest, timeout=5, progress=False)

    message = str(caught.value)
    assert sha(b"x") in message  # expected
    assert sha(SPLITS["valid.txt"]) in message  # actual
    assert not dest.exists()
    assert leftovers(dest.parent, dest) == []


def test_falls_back_to_next_source_after_404_and_refused_connection(server, tmp_path, refused_url):
    root, base = server
    good = tar_source(root, base)
    missing = DatasetSource(f"{base}/no-such-archive.tar.gz", "tar.gz", good.members)
    refused = DatasetSource(refused_url, "tar.gz", good.members)
    dest = tmp_path / "toy"

    fetch(toy_info((missing, refused, good)), dest, timeout=5, progress=False)

    assert json.loads((dest / "SOURCE.json").read_text())["url"] == good.url
    assert (dest / "train.txt").read_bytes() == SPLITS["train.txt"]


def test_all_sources_failing_raises_fetch_error_naming_each_url(server, tmp_path, refused_url):
    root, base = server
    missing = DatasetSource(f"{base}/raw/", "raw", {k: k for k in SPLITS})  # 404 on train.txt
    refused = DatasetSource(refused_url, "tar.gz", {k: k for k in SPLITS})
    dest = tmp_path / "toy"

    with pytest.raises(FetchError) as caught:
        fetch(toy_info((missing, refused)), dest, timeout=5, progress=False)

    message = str(caught.value)
    assert f"{base}/raw/train.txt" in message and "404" in message
    assert refused_url in message
    assert not dest.exists() and leftovers(tmp_path, dest) == []


def test_missing_member_raises_fetch_error(server, tmp_path):
    root, base = server
    write_tar(root / "toy.tar.gz", {"train.txt": SPLITS["train.txt"], "valid.txt": SPLITS["valid.txt"]})
    source = DatasetSource(f"{base}/toy.tar.gz", "tar.gz", {k: k for k in SPLITS})
    dest = tmp_path / "toy"

    with pytest.raises(FetchError, match="no member 'test.txt'"):
        fetch(toy_info((source,)), dest, timeout=5, progress=False)
    assert not dest.exists() and leftovers(tmp_path, dest) == []


def test_crlf_registry_value_accepts_lf_download_via_sha256_lf(server, tmp_path):
    # The registry records the CRLF bytes (as the shared FB15k-237 copy has
    # them); the mirror serves LF.  The file matches sha256_lf and is kept as
    # downloaded.
    crlf = {name: data.replace(b"\n", b"\r\n") for name, data in SPLITS.items()}
    root, base = server
    source = tar_source(root, base)  # serves the LF bytes
    info = toy_info((source,), crlf)
    assert info.files[0].sha256 != info.files[0].sha256_lf
    dest = tmp_path / "toy"

    fetch(info, dest, timeout=5, progress=False)

    assert (dest / "train.txt").read_bytes() == SPLITS["train.txt"]
    record = json.loads((dest / "SOURCE.json").read_text())
    assert record["matched_by"]["train.txt"] == "sha256_lf"
    assert record["files"]["train.txt"] == sha(SPLITS["train.txt"])


def test_crlf_file_with_other_content_is_refused(server, tmp_path):
    root, base = server
    source = tar_source(root, base)
    other = dict(SPLITS, **{"test.txt": b"c\tr2\tb\r\n"})
    with pytest.raises(ChecksumError, match="test.txt"):
        fetch(toy_info((source,), other), tmp_path / "toy", timeout=5, progress=False)


def test_existing_verified_dest_is_returned_without_download(server, tmp_path, refused_url, capsys):
    root, base = server
    dest = tmp_path / "toy"
    fetch(toy_info((tar_source(root, base),)), dest, timeout=5, progress=False)
    before = (dest / "SOURCE.json").read_bytes()

    # Only a refused source now: any download attempt would raise FetchError.
    unreachable = DatasetSource(refused_url, "tar.gz", {k: k for k in SPLITS})
    assert fetch(toy_info((unreachable,)), dest, timeout=5, progress=False) == dest
    assert (dest / "SOURCE.json").read_bytes() == before
    assert "already holds a verified copy" in capsys.readouterr().err


def test_existing_dest_that_does_not_verify_raises_file_exists_error(tmp_path):
    dest = tmp_path / "toy"
    dest.mkdir()
    (dest / "train.txt").write_bytes(b"not the data\n")
    info = toy_info((DatasetSource("http://127.0.0.1:9/none.tar.gz", "tar.gz", {k: k for k in SPLITS}),))

    with pytest.raises(FileExistsError, match=re.escape(str(dest))) as caught:
        fetch(info, dest, timeout=5, progress=False)
    assert "train.txt has sha256" in str(caught.value)
    assert "valid.txt is missing" in str(caught.value)


def test_optional_file_without_source_is_noted_not_required(server, tmp_path, capsys):
    root, base = server
    info = toy_info((tar_source(root, base),), optional={"entity_text.tsv": b"a\tA\tthe letter a\n"})
    dest = tmp_path / "toy"

    fetch(info, dest, timeout=5, progress=False)

    assert not (dest / "entity_text.tsv").exists()
    assert "entity_text.tsv" in json.loads((dest / "SOURCE.json").read_text())["not_fetched"]
    assert "must be supplied by the user" in capsys.readouterr().err


def test_archive_members_outside_the_named_ones_are_never_written(server, tmp_path):
    # The named members are fine; the archive also carries entries that
    # extractall() would write outside the temporary directory.
    root, base = server
    write_tar(
        root / "evil.tar.gz",
        {
            **SPLITS,
            "../evil.txt": b"escaped\n",
            "../../evil2.txt": b"escaped\n",
            "sub/../../evil3.txt": b"escaped\n",
        },
    )
    source = DatasetSource(f"{base}/evil.tar.gz", "tar.gz", {k: k for k in SPLITS})
    dest = tmp_path / "out" / "toy"

    fetch(toy_info((source,)), dest, timeout=5, progress=False)

    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.json", "test.txt", "train.txt", "valid.txt"]
    escaped = [p for p in tmp_path.rglob("evil*") if p.parent != root]
    assert escaped == []


def test_named_member_that_is_a_link_is_refused(server, tmp_path):
    root, base = server
    with tarfile.open(root / "link.tar.gz", "w:gz") as tar:
        for name in ("valid.txt", "test.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(SPLITS[name])
            tar.addfile(info, io.BytesIO(SPLITS[name]))
        link = tarfile.TarInfo("train.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../secret.txt"
        tar.addfile(link)
    source = DatasetSource(f"{base}/link.tar.gz", "tar.gz", {k: k for k in SPLITS})
    dest = tmp_path / "toy"

    with pytest.raises(FetchError, match="not a regular file"):
        fetch(toy_info((source,)), dest, timeout=5, progress=False)
    assert not dest.exists() and leftovers(tmp_path, dest) == []


def test_sha256_file_streams_large_files(tmp_path):
    data = os.urandom(3 << 20) + b"tail"  # more than one 1 MiB chunk
    (tmp_path / "big.bin").write_bytes(data)
    assert sha256_file(tmp_path / "big.bin") == sha(data)


# ----------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------


def test_unknown_dataset_name_lists_known_names():
    with pytest.raises(ValueError, match="yago3") as caught:
        get_dataset("yago3")
    for name in ("wn18rr", "fb15k237", "umls", "kinship", "nations"):
        assert name in str(caught.value)
    with pytest.raises(ValueError, match="yago3"):
        fetch("yago3", "/nonexistent/never-created", progress=False)


def test_names_are_matched_loosely():
    assert get_dataset("FB15k-237") is DATASETS["fb15k237"]
    assert get_dataset("WN18RR") is DATASETS["wn18rr"]


def test_registry_entries_are_complete():
    assert [d.name for d in list_datasets()] == ["wn18rr", "fb15k237", "umls", "kinship", "nations"]
    for info in list_datasets():
        required = {f.path for f in info.files if not f.optional}
        assert required == {"train.txt", "valid.txt", "test.txt"}
        assert info.sources and all(s.url.startswith("https://") for s in info.sources)
        assert set(info.counts) == {"entities", "relations", "train", "valid", "test"}
        optional = {f.path for f in info.files if f.optional}
        assert optional == ({"entity_text.tsv"} if info.name in ("wn18rr", "fb15k237") else set())
        for source in info.sources:  # text files have no public source: never in a source
            assert not optional & set(source.members)


def test_inconsistent_entry_reports_every_problem():
    with pytest.raises(ValueError) as caught:
        DatasetInfo(
            name="bad",
            description="",
            files=(
                DatasetFile("../train.txt", "0" * 64, "nothex"),
                DatasetFile("test.txt", "0" * 64, "0" * 64),
            ),
            sources=(
                DatasetSource("https://x.invalid/x.rar", "rar", {"train.txt": "t"}),  # type: ignore[arg-type]
            ),
            counts={},
            license_note="",
        )
    message = str(caught.value)
    for part in (
        "'../train.txt': expected a relative path",
        "sha256_lf 'nothex'",
        "kind 'rar'",
        "no member for required file(s) ['../train.txt', 'test.txt']",
        "unregistered file(s) ['train.txt']",
    ):
        assert part in message


def read_readme_table(readme: Path) -> dict[str, dict[str, int]]:
    table = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in DATASETS:
            numbers = [int(c.replace(",", "")) for c in cells[1:6]]
            table[cells[0]] = dict(zip(("entities", "relations", "train", "valid", "test"), numbers))
    return table


def test_registry_counts_equal_the_readme_table():
    readme = SHARED / "README.md"
    if not readme.exists():
        pytest.skip(f"{readme} not present")
    table = read_readme_table(readme)
    assert set(table) == set(DATASETS)
    assert {name: info.counts for name, info in DATASETS.items()} == table
    assert COUNTS == table


def test_registry_sha256_equal_the_readme_list():
    readme = SHARED / "README.md"
    if not readme.exists():
        pytest.skip(f"{readme} not present")
    listed = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^\s*([0-9a-f]{64})\s+(\S+/\S+)\s*$", readme.read_text(), re.MULTILINE)
    )
    registered = {f"{name}/{path}": value for name, files in SHA256.items() for path, value in files.items()}
    assert registered == listed


@pytest.mark.parametrize(
    ("name", "path"), [(name, f.path) for name, info in DATASETS.items() for f in info.files]
)
def test_registered_sha256_match_the_shared_files(name, path):
    file = SHARED / name / path
    if not file.exists():
        pytest.skip(f"{file} not present")
    data = file.read_bytes()
    entry = next(f for f in DATASETS[name].files if f.path == path)
    assert entry.sha256 == sha(data) == SHA256[name][path]
    assert entry.sha256_lf == sha_lf(data) == SHA256_LF[name][path]
