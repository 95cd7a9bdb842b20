"""Issue 18: bad inputs and file-system faults end in one clear line or a named warning.

Never a traceback, never a silent wrong answer.  Each table row gives what
is fed in, what must come out (an error class or a warning class, or the
CLI's exit status 2), and a phrase the message must contain.  File-system
faults are made for real: a file where a folder is needed, a read-only
directory (a read-only tmpfs as root, chmod 555 otherwise) and a full disk
(a 1 MiB tmpfs, root only; skipped where mounting fails).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TEST, TRAIN, VALID
from kgtok.cli import cli, describe_error
from kgtok.data import KGFormatError, load_kg
from kgtok.data.errors import HeaderLineWarning, UnseenEntityWarning, WhitespaceWarning

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def lines(rows: list[tuple[str, str, str]]) -> list[str]:
    return ["\t".join(row) for row in rows]


# ----------------------------------------------------------------------------
# Bad KG input, through load_kg
# ----------------------------------------------------------------------------

# (case, {file: lines}, load_kg options, expected error or warning class, phrase of the message)
KG_CASES = [
    ("header with tabs", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)]}, {},
     KGFormatError, "train.txt:1: 'head\\trelation\\ttail' looks like a column header"),
    ("header with spaces", {"train.txt": ["head relation tail", *lines(TRAIN)]}, {},
     KGFormatError, "train.txt:1: 'head relation tail' looks like a column header"),
    ("header in test.txt", {"test.txt": ["subject\tpredicate\tobject", *lines(TEST)]}, {},
     KGFormatError, "test.txt:1: 'subject\\tpredicate\\tobject' looks like a column header"),
    ("header skipped when asked", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)]}, {"skip_header": True},
     HeaderLineWarning, "train.txt:1: skipped the header line 'head\\trelation\\ttail'"),
    ("empty relation", {"train.txt": [*lines(TRAIN), "a\t\tb"]}, {},
     KGFormatError, "train.txt:6: relation is empty"),
    ("empty head", {"valid.txt": ["\tlikes\tb", *lines(VALID)]}, {},
     KGFormatError, "valid.txt:1: head is empty"),
    ("empty tail", {"test.txt": [*lines(TEST), "a\tlikes\t"]}, {},
     KGFormatError, "test.txt:3: tail is empty"),
    ("leading space on an id", {"valid.txt": [*lines(VALID), " a\tlikes\tb"]}, {},
     KGFormatError, "valid.txt:3: head ' a' has leading or trailing whitespace"),
    ("trailing space on an id", {"test.txt": [*lines(TEST), "a\tlikes\tc "]}, {},
     KGFormatError, "test.txt:3: tail 'c ' has leading or trailing whitespace"),
    ("space around a relation", {"train.txt": [*lines(TRAIN), "a\tlikes \tc"]}, {},
     KGFormatError, "train.txt:6: relation 'likes ' has leading or trailing whitespace"),
    ("whitespace stripped when asked", {"test.txt": [*lines(TEST), "a\tlikes\tc "]}, {"strip_whitespace": True},
     WhitespaceWarning, "test.txt:3: stripped whitespace around 1 id field(s), e.g. 'c '"),
    ("unseen entity is named", {"valid.txt": [*lines(VALID), "a\tlikes\tzebra"]}, {},
     UnseenEntityWarning, "e.g. entity 'zebra' (line 3)"),
    ("space-separated line", {"train.txt": [*lines(TRAIN), "a likes b"]}, {},
     KGFormatError, "train.txt:6: expected 3 tab-separated fields"),
    ("text id with a trailing space", {"entity_text.tsv": ["a\tAlpha", "b \tBeta"]}, {},
     KGFormatError, "entity_text.tsv:2: id 'b ' has leading or trailing whitespace"),
    ("dictionary name with a space", {"entities.dict": ["0\ta", "1\tb ", "2\tc", "3\td"],
                                      "relations.dict": ["0\tlikes", "1\thates"]}, {},
     KGFormatError, "entities.dict:2: name 'b ' has leading or trailing whitespace"),
]


def write_kg(directory: Path, files: dict[str, list[str]]) -> Path:
    directory.mkdir()
    contents = {"train.txt": lines(TRAIN), "valid.txt": lines(VALID), "test.txt": lines(TEST), **files}
    for name, rows in contents.items():
        (directory / name).write_bytes("".join(row + "\n" for row in rows).encode("utf-8"))
    return directory


@pytest.mark.parametrize("case, files, options, expected, phrase", KG_CASES, ids=[c[0] for c in KG_CASES])
def test_bad_kg_input(tmp_path, case, files, options, expected, phrase):
    directory = write_kg(tmp_path / "kg", files)
    if not issubclass(expected, Warning):
        with pytest.raises(expected) as err:
            load_kg(directory, **options)
        assert phrase in str(err.value)
        assert str(err.value).startswith(str(directory.resolve()))  # which file, first
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kg = load_kg(directory, **options)
    messages = [str(w.message) for w in caught if issubclass(w.category, expected)]
    assert any(phrase in m for m in messages), messages
    assert "" not in kg.entity_names and "" not in kg.relation_names
    assert all(name == name.strip() for name in kg.entity_names + kg.relation_names)


def test_skipped_header_adds_no_entity_or_relation(tmp_path):
    plain = load_kg(write_kg(tmp_path / "plain", {}))
    with pytest.warns(HeaderLineWarning):
        headed = load_kg(write_kg(tmp_path / "headed", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)]}),
                         skip_header=True)
    assert headed.counts() == plain.counts()


def test_kg_is_loaded_once_per_run_and_each_data_warning_shown_once(tmp_path, monkeypatch):
    """kgtok run hands every stage the KG it loaded once, so a data warning is shown once, not once per stage."""
    from kgtok.data import graph
    from kgtok.embed import EmbedConfig
    from kgtok.pipeline import RunConfig, run

    write_kg(tmp_path / "kg", {"valid.txt": [*lines(VALID), "a\tlikes\tzebra"]})
    loads = []
    load = graph.load_kg
    monkeypatch.setattr(graph, "load_kg", lambda *a, **k: loads.append(a) or load(*a, **k))
    logs: list[str] = []
    config = RunConfig(data=str(tmp_path / "kg"), out=str(tmp_path / "run"), progress=False,
                       embed=EmbedConfig(dim=4, max_steps=4, eval_every=2, threads=1, top_k=2))
    run(config, until="embed", log=logs.append)
    shown = [line for line in logs if "UnseenEntityWarning" in line]
    assert len(loads) == 1 and len(shown) == 1 and "'zebra'" in shown[0]


def test_loading_options_reach_every_stage_through_kgtok_run(tmp_path):
    """load.skip_header / load.strip_whitespace: the run's one KG load uses them, and they count in the cache
    record of every stage that reads the KG (a rerun with other options is no cache hit)."""
    from kgtok.data.stage import DataConfig
    from kgtok.embed import EmbedConfig
    from kgtok.pipeline import RunConfig, run

    kg = write_kg(tmp_path / "kg", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)],
                                    "test.txt": [*lines(TEST), "a\tlikes\tc "]})
    config = RunConfig(data=str(kg), out=str(tmp_path / "run"), progress=False,
                       embed=EmbedConfig(dim=4, max_steps=4, eval_every=2, threads=1, top_k=2))
    with pytest.raises(KGFormatError, match="load.skip_header=true in kgtok run"):
        run(config, until="embed", log=lambda *_: None)
    both = dataclasses.replace(config, load=DataConfig(skip_header=True, strip_whitespace=True))
    assert both.stage_config("data") == both.load
    logs: list[str] = []
    results = run(both, until="embed", log=logs.append)
    assert [r.status for r in results] == ["ran", "ran"]
    assert results[0].metrics["train"] == len(TRAIN) and results[0].metrics["entities"] == 4
    assert any("HeaderLineWarning" in line for line in logs) and any("WhitespaceWarning" in line for line in logs)
    assert [r.status for r in run(both, until="embed", log=logs.append)] == ["cached", "cached"]
    # A KG that needs neither option: turning one on changes the record, so the stages run again.
    clean = write_kg(tmp_path / "clean", {})
    plain = dataclasses.replace(config, data=str(clean), out=str(tmp_path / "clean-run"))
    assert [r.status for r in run(plain, until="embed", log=logs.append)] == ["ran", "ran"]
    stripped = dataclasses.replace(plain, load=DataConfig(strip_whitespace=True))
    assert [r.status for r in run(stripped, until="embed", log=logs.append)] == ["ran", "ran"]


def test_stage_commands_take_the_loading_options(tmp_path):
    kg = write_kg(tmp_path / "kg", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)],
                                    "valid.txt": [*lines(VALID), " b\thates\ta"]})
    args = ["embed", "--data", kg, "--out", tmp_path / "embed", "--no-progress", "dim=4", "max_steps=4",
            "eval_every=2", "threads=1", "top_k=2"]
    assert_one_line_error(invoke(*args, "--skip-header"), "--strip-whitespace in kgtok data info and the stage")
    result = invoke(*args, "--skip-header", "--strip-whitespace")
    assert result.exit_code == 0, result.output
    assert "embed: ran" in result.output
    assert "embed: cached" in invoke(*args, "--skip-header", "--strip-whitespace").output
    for command in (["text"], ["hierarchy"], ["quantize"], ["instruct"], ["evaluate"], ["embed-import"],
                    ["dift", "export"], ["dift", "import"]):  # every command that reads a KG
        shown = invoke(*command, "--help").output
        assert "--skip-header" in shown and "--strip-whitespace" in shown, command


# ----------------------------------------------------------------------------
# The CLI: bad arguments, named before any work or config dump
# ----------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_one_line_error(result, phrase: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert phrase in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.output


# (case, arguments (KG stands for a good KG folder, TMP for the test's folder), phrase of the message)
CLI_CASES = [
    ("--data missing", ["run", "--data", "TMP/nowhere"], "Invalid value for '--data': TMP/nowhere: no such directory"),
    ("--data without splits", ["embed", "--data", "TMP/empty"],
     "'--data': TMP/empty: no train.txt, valid.txt, test.txt"),
    ("data= override missing", ["run", "data=TMP/nowhere"], "data (--data): TMP/nowhere: no such directory"),
    ("config not UTF-8", ["data", "synthetic", "TMP/out", "--config", "TMP/latin1.yaml"],
     "config file TMP/latin1.yaml:2: byte 0xe9 at column 6 is not valid UTF-8"),
    ("header via data info", ["data", "info", "TMP/headed"],
     "train.txt:1: 'head\\trelation\\ttail' looks like a column header"),
    ("data info missing folder", ["data", "info", "TMP/nowhere"], "nowhere: no such directory"),
    ("DEST under a file", ["data", "synthetic", "TMP/afile/kg", "num_entities=200"],
     "TMP/afile: is a file, so no folder can be made there"),
]


@pytest.fixture
def cli_folder(tmp_path):
    """A good KG, an empty folder, a file, a Latin-1 config and a KG with a header line."""
    write_kg(tmp_path / "kg", {})
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "latin1.yaml").write_bytes("seed: 1\n# caf\u00e9 au lait\n".encode("latin-1"))
    write_kg(tmp_path / "headed", {"train.txt": ["head\trelation\ttail", *lines(TRAIN)]})
    return tmp_path


@pytest.mark.parametrize("case, args, phrase", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_arguments(cli_folder, case, args, phrase):
    def fill(text: str) -> str:
        return text.replace("TMP", str(cli_folder)).replace("KG", str(cli_folder / "kg"))

    result = invoke(*map(fill, args))
    assert_one_line_error(result, fill(phrase))
    assert "# RunConfig" not in result.output  # refused before the config dump


def test_evaluate_model_that_is_no_model_folder(cli_folder):
    """--model pointing at a folder that is neither a stage-5b artifact nor a HF model: one line naming the flag."""
    instructions = cli_folder / "inst"
    instructions.mkdir()
    (instructions / "manifest.json").write_text('{"stage": "instruct", "files": {}}')
    (instructions / "test.jsonl").write_text('{"prompt": "(a, likes, ?)", "answer": "b"}\n')
    model = cli_folder / "not-a-model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0")
    result = invoke("evaluate", "--model", model, "--instructions", instructions, "--out", cli_folder / "ev",
                    "--no-progress")
    assert_one_line_error(result, f"--model {model}: neither a stage-5b (finetune) artifact")
    assert "Hugging Face model folder (no config.json)" in result.output


def test_out_under_a_file_names_the_cause(cli_folder):
    result = invoke("run", "--data", cli_folder / "kg", "--out", cli_folder / "afile" / "run", "--until", "data",
                    "progress=false")
    assert_one_line_error(result, str(cli_folder / "afile"))
    assert "is a file" in result.output or "not a directory" in result.output


def test_debug_keeps_the_traceback(cli_folder):
    result = invoke("data", "synthetic", cli_folder / "afile" / "kg", "num_entities=200", env={"KGTOK_DEBUG": "1"})
    assert isinstance(result.exception, OSError)


# ----------------------------------------------------------------------------
# File-system faults: read-only output, full disk (also during a checkpoint write)
# ----------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, options) -> a tmpfs folder, unmounted after the test; skips where mounting fails."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        if not IS_ROOT:
            pytest.skip("mounting a tmpfs needs root")
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:  # lazily: a failed torch writer in a kept traceback may still hold a file open
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def full_disk(mount_tmpfs, free: int = 24 * 1024) -> Path:
    """A 1 MiB tmpfs with ``free`` bytes left."""
    folder = mount_tmpfs("full", "size=1m")
    total = os.statvfs(folder).f_blocks * os.statvfs(folder).f_frsize
    (folder / "filler").write_bytes(b"\0" * (total - free))
    return folder


@pytest.fixture
def read_only_dir(tmp_path, mount_tmpfs):
    if IS_ROOT:  # root writes through chmod: use a file system mounted read-only
        yield mount_tmpfs("readonly", "ro,size=64k"), "read-only file system"
        return
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder, "permission denied"
    folder.chmod(0o755)


def test_read_only_out(cli_folder, read_only_dir):
    folder, cause = read_only_dir
    result = invoke("run", "--data", cli_folder / "kg", "--out", folder / "run", "--until", "data", "progress=false")
    assert_one_line_error(result, cause)
    assert str(folder) in result.output


def test_full_disk_while_writing_a_kg(cli_folder, mount_tmpfs):
    folder = full_disk(mount_tmpfs)
    result = invoke("data", "synthetic", folder / "kg", "num_entities=2000")
    assert_one_line_error(result, "disk full")
    assert str(folder) in result.output


def test_full_disk_during_a_checkpoint_write(cli_folder, mount_tmpfs):
    """torch.save's '[enforce fail at inline_container.cc:672]' is reported as a full disk, naming the file."""
    folder = full_disk(mount_tmpfs)
    result = invoke("embed", "--data", cli_folder / "kg", "--out", folder / "embed", "--no-progress",
                    "max_steps=5", "dim=512", "threads=1")
    assert_one_line_error(result, "disk full")
    assert str(folder / "embed") in result.output and "enforce fail" not in result.output


def test_torch_write_error_is_disk_full(mount_tmpfs):
    torch = pytest.importorskip("torch")
    folder = full_disk(mount_tmpfs, free=8 * 1024)
    with pytest.raises(RuntimeError) as err:
        torch.save(torch.zeros(100_000), str(folder / "x.pt"))
    message = describe_error(err.value)
    assert message.startswith(f"{folder / 'x.pt'}: could not write the checkpoint: disk full"), message


def test_cli_subprocess_has_no_traceback(tmp_path):
    """The installed entry point (main) has the same boundary as the commands."""
    (tmp_path / "afile").write_text("x\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "kgtok", "data", "synthetic", str(tmp_path / "afile" / "x"),
                           "num_entities=200"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'afile'}: is a file" in done.stderr


def test_checkpoint_write_checks_free_space_first(tmp_path, monkeypatch):
    """A checkpoint that replaces a bigger one than the free space is refused before torch.save starts."""
    import errno
    import shutil
    from collections import namedtuple

    torch = pytest.importorskip("torch")
    from kgtok.runtime import torch_save_atomic

    path = tmp_path / "last.pt"
    torch_save_atomic(torch.zeros(1000), path)
    before = path.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(OSError) as err:
        torch_save_atomic(torch.ones(1000), path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert describe_error(err.value).startswith(f"{path}: disk full")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
