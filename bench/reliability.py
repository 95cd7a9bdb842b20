"""Issue 18 replayed through the command line: bad inputs and file-system faults.

    python bench/reliability.py [--baseline SRC]

Every case runs ``python -m kgtok ...`` in a subprocess (cheap commands:
``kgtok data info``, or ones that fail before any training) and is judged
from its exit status and output:

* clear error: exit status 2, one ``error`` line, and the expected phrase
  (which file, line or argument) in it;
* clear warning: input adjusted on request or kept, exit 0, a warning with
  the expected phrase (the name of what was adjusted);
* traceback: a Python traceback reached the user;
* silent wrong: exit 0 and nothing said about the bad input;
* unclear: any other failure (wrong status, the message misses the phrase).

The full-disk and read-only cases mount small tmpfs folders, so they need
root; elsewhere they are skipped (counted under ``skipped``), except that a
chmod 555 folder stands in for the read-only file system.  Three cases
prepare a state first (:class:`Prepared`): a run still holding its output
folder when a second starts on it, the lock a killed run left behind, and a
finished small run whose ``quantize/codes.npy`` was emptied (its rerun must
say so and compute the stage again, not report it cached).

Writes bench/results/reliability.json (integer counts) and reliability.md
(one row per case).  ``--baseline SRC`` replays the same cases against
another checkout's ``src`` folder as well and adds its outcome as a column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

TRAIN = ["a\tlikes\tb", "b\tlikes\tc", "c\thates\ta", "a\thates\td", "d\tlikes\ta"]
VALID = ["a\tlikes\tc", "b\thates\td"]
TEST = ["c\tlikes\td", "d\thates\tb"]


@dataclass(frozen=True)
class Prepared:
    """What a case's setup leaves: values for the placeholders of its phrase (``{pid}``), and how to undo it."""

    fill: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Case:
    """One bad input or fault: the kgtok arguments and what a person must be told.

    In ``args`` and ``phrase``, ``{w}`` stands for the work folder.
    """

    name: str
    args: tuple[str, ...]
    expect: str  # "error" or "warning"
    phrase: str
    needs: str | None = None  # "full" or "readonly": a folder the case writes into
    setup: Callable[[Path, dict[str, str]], Prepared] | None = None  # the state the case starts from
    absent: str | None = None  # said on a good exit, the answer is silently wrong (e.g. "quantize: cached")


def kg_case(name: str, expect: str, phrase: str, *extra: str) -> Case:
    """A case reading the KG folder of the same name with ``kgtok data info``."""
    return Case(name, ("data", "info", f"{{w}}/{name}", *extra), expect, phrase)


# Folders of bad KGs: name -> {file: bytes}; unnamed files are the good splits.
KG_FILES: dict[str, dict[str, bytes]] = {
    "header-tabs": {"train.txt": "\n".join(["head\trelation\ttail", *TRAIN, ""]).encode()},
    "header-spaces": {"train.txt": "\n".join(["head relation tail", *TRAIN, ""]).encode()},
    "header-skipped": {"train.txt": "\n".join(["head\trelation\ttail", *TRAIN, ""]).encode()},
    "empty-relation": {"train.txt": "\n".join([*TRAIN, "a\t\tb", ""]).encode()},
    "empty-head": {"valid.txt": "\n".join(["\tlikes\tb", *VALID, ""]).encode()},
    "empty-tail": {"test.txt": "\n".join([*TEST, "a\tlikes\t", ""]).encode()},
    "leading-space": {"valid.txt": "\n".join([*VALID, " a\tlikes\tb", ""]).encode()},
    "trailing-space": {"test.txt": "\n".join([*TEST, "a\tlikes\tc ", ""]).encode()},
    "whitespace-stripped": {"test.txt": "\n".join([*TEST, "a\tlikes\tc ", ""]).encode()},
    "unseen-entity": {"valid.txt": "\n".join([*VALID, "a\tlikes\tzebra", ""]).encode()},
    "space-separated": {"train.txt": "\n".join([*TRAIN, "a likes b", ""]).encode()},
    "not-utf8": {"train.txt": "\n".join([*TRAIN, ""]).encode() + b"a\tlikes\t\xff\n"},
    "missing-split": {"test.txt": None},  # type: ignore[dict-item]
    "crlf": {"train.txt": "\r\n".join([*TRAIN, ""]).encode()},
    "duplicates": {"train.txt": "\n".join([*TRAIN, TRAIN[0], ""]).encode()},
    "text-id-space": {"entity_text.tsv": b"a\tAlpha\nb \tBeta\n"},
    "good": {},
}

CASES = [
    kg_case("header-tabs", "error", "train.txt:1: 'head\\trelation\\ttail' looks like a column header"),
    kg_case("header-spaces", "error", "train.txt:1: 'head relation tail' looks like a column header"),
    kg_case("header-skipped", "warning", "train.txt:1: skipped the header line", "--skip-header"),
    kg_case("empty-relation", "error", "train.txt:6: relation is empty"),
    kg_case("empty-head", "error", "valid.txt:1: head is empty"),
    kg_case("empty-tail", "error", "test.txt:3: tail is empty"),
    kg_case("leading-space", "error", "valid.txt:3: head ' a' has leading or trailing whitespace"),
    kg_case("trailing-space", "error", "test.txt:3: tail 'c ' has leading or trailing whitespace"),
    kg_case("whitespace-stripped", "warning", "test.txt:3: stripped whitespace around 1 id field(s), e.g. 'c '",
            "--strip-whitespace"),
    kg_case("unseen-entity", "warning", "e.g. entity 'zebra' (line 3)"),
    kg_case("space-separated", "error", "train.txt:6: expected 3 tab-separated fields"),
    kg_case("not-utf8", "error", "train.txt:6: byte(s) 0xff at column 9 are not valid UTF-8"),
    kg_case("missing-split", "error", "missing split file(s) ['test.txt']"),
    kg_case("crlf", "warning", "train.txt: Windows (CRLF) line endings"),
    kg_case("duplicates", "warning", "train.txt: 1 duplicate triple(s)"),
    kg_case("text-id-space", "error", "entity_text.tsv:2: id 'b ' has leading or trailing whitespace"),
    Case("data info on a missing folder", ("data", "info", "{w}/nowhere"), "error", "nowhere: no such directory"),
    Case("run --data missing", ("run", "--data", "{w}/nowhere"), "error", "'--data': {w}/nowhere: no such directory"),
    Case("embed --data without splits", ("embed", "--data", "{w}/empty"), "error",
         "'--data': {w}/empty: no train.txt, valid.txt, test.txt"),
    Case("run data= missing", ("run", "data={w}/nowhere"), "error", "data (--data): {w}/nowhere: no such directory"),
    Case("config not UTF-8", ("data", "synthetic", "{w}/out", "--config", "{w}/latin1.yaml"), "error",
         "config file {w}/latin1.yaml:2: byte 0xe9 at column 6 is not valid UTF-8"),
    Case("config missing", ("data", "synthetic", "{w}/out", "--config", "{w}/none.yaml"), "error",
         "config file {w}/none.yaml does not exist"),
    Case("DEST under a file", ("data", "synthetic", "{w}/afile/kg", "num_entities=200"), "error",
         "{w}/afile: is a file"),
    Case("--out under a file", ("run", "--data", "{w}/good", "--out", "{w}/afile/run", "--until", "data",
                                "progress=false"), "error", "{w}/afile"),
    Case("--out read-only", ("run", "--data", "{w}/good", "--out", "{w}/readonly/run", "--until", "data",
                             "progress=false"), "error", "{w}/readonly", needs="readonly"),
    Case("disk full writing a KG", ("data", "synthetic", "{w}/full/kg", "num_entities=2000"), "error",
         "disk full", needs="full"),
    Case("disk full writing a checkpoint", ("embed", "--data", "{w}/good", "--out", "{w}/full/embed",
                                            "--no-progress", "max_steps=5", "dim=512", "threads=1"), "error",
         "{w}/full/embed", needs="full"),
]


KGTOK = (sys.executable, "-m", "kgtok")
# A small run up to stage 4 (about 30 s on one core); its quantize/codes.npy is emptied for the stale-artifact case.
SMALL_RUN = ("run", "--out", "{w}/small", "--until", "quantize", "progress=false", "synthetic.num_entities=200",
             "embed.dim=16", "embed.max_steps=40", "embed.eval_every=20", "embed.threads=1", "embed.top_k=5",
             "text.mode=joint", "text.threads=1", "hierarchy.levels=3", "hierarchy.threads=1", "quantize.levels=3",
             "quantize.codebook_size=16", "quantize.code_dim=16", "quantize.encoder_hidden=[32]",
             "quantize.epochs=2", "quantize.threads=1")
# A run that holds its folder for long: stage 1 on the tiny good KG with no end in sight.
ENDLESS_RUN = ("run", "--data", "{w}/good", "--out", "{w}/{name}", "progress=false", "embed.max_steps=100000000",
               "embed.eval_every=100000000", "embed.threads=1")


def _start_holding(work: Path, env: dict[str, str], name: str) -> subprocess.Popen:
    """Start ENDLESS_RUN on ``{w}/name`` and return once it holds ``{w}/name.lock`` (or after a minute without
    one: a kgtok without locks, replayed by --baseline, is judged on what it then does)."""
    args = [a.replace("{w}", str(work)).replace("{name}", name) for a in ENDLESS_RUN]
    first = subprocess.Popen([*KGTOK, *args], env=env, cwd=work, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock, deadline = work / f"{name}.lock", time.monotonic() + 60
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return first


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def busy_folder(work: Path, env: dict[str, str]) -> Prepared:
    """A first run still working on ``{w}/busy`` when the case starts a second run there."""
    first = _start_holding(work, env, "busy")
    return Prepared({"pid": str(first.pid)}, lambda: _stop(first))


def killed_run(work: Path, env: dict[str, str]) -> Prepared:
    """The lock of a run killed (SIGKILL) while it held ``{w}/stale``: its process is gone, its lock stays."""
    first = _start_holding(work, env, "stale")
    first.send_signal(signal.SIGKILL)
    first.wait()
    return Prepared({"pid": str(first.pid)})


def emptied_artifact(work: Path, env: dict[str, str]) -> Prepared:
    """A finished small run whose stage-4 codes file was then emptied (a full disk, a careless ``: >``)."""
    subprocess.run([*KGTOK, *(a.replace("{w}", str(work)) for a in SMALL_RUN)], env=env, cwd=work,
                   capture_output=True, timeout=900)
    codes = work / "small" / "quantize" / "codes.npy"
    if codes.exists():  # else the run failed: the case's own run then shows why
        codes.write_bytes(b"")
    return Prepared()


CASES += [
    Case("second run on a busy --out", ("run", "--data", "{w}/good", "--out", "{w}/busy", "--until", "data",
                                        "progress=false"), "error",
         "{w}/busy is in use by another kgtok process (pid {pid}", setup=busy_folder),
    Case("stale lock of a killed run", ("run", "--data", "{w}/good", "--out", "{w}/stale", "--until", "data",
                                        "progress=false"), "warning",
         "{w}/stale.lock: taking over the lock of process {pid}, which no longer runs", setup=killed_run),
    Case("emptied artifact file", SMALL_RUN, "warning",
         "{w}/small/quantize: codes.npy changed since the artifact was written", setup=emptied_artifact,
         absent="quantize: cached"),
]


def prepare(work: Path) -> None:
    """The good and bad KG folders, an empty folder, a file, two configs."""
    for name, files in KG_FILES.items():
        folder = work / name
        folder.mkdir()
        contents = {"train.txt": TRAIN, "valid.txt": VALID, "test.txt": TEST}
        for split, rows in contents.items():
            (folder / split).write_bytes("".join(f"{row}\n" for row in rows).encode())
        for file, data in files.items():
            if data is None:
                (folder / file).unlink()
            else:
                (folder / file).write_bytes(data)
    (work / "empty").mkdir()
    (work / "afile").write_text("not a folder\n")
    (work / "latin1.yaml").write_bytes("seed: 1\n# caf\u00e9 au lait\n".encode("latin-1"))


def mount_fault(work: Path, needs: str, mounted: list[Path]) -> bool:
    """Make the folder a case writes into: a nearly full tmpfs, or a read-only one.  False when impossible."""
    folder = work / needs
    if folder.exists():
        _unmount(folder, mounted)
        folder.rmdir()
    folder.mkdir()
    if needs == "readonly" and not IS_ROOT:
        folder.chmod(0o555)
        return True
    if not IS_ROOT:
        return False
    options = "ro,size=64k" if needs == "readonly" else "size=1m"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        return False
    mounted.append(folder)
    if needs == "full":  # leave 24 KiB: enough to start, too little to finish
        stat = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (stat.f_blocks * stat.f_frsize - 24 * 1024))
    return True


def _unmount(folder: Path, mounted: list[Path]) -> None:
    if folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
        mounted.remove(folder)


def judge(case: Case, returncode: int, output: str) -> str:
    """clear / traceback / silent_wrong / unclear, as the module docstring defines them."""
    if "Traceback (most recent call last)" in output:
        return "traceback"
    said = case.phrase in output
    if returncode == 0 and case.absent is not None and case.absent in output:
        return "silent_wrong"
    if case.expect == "warning":
        return "clear" if returncode == 0 and said else ("silent_wrong" if returncode == 0 else "unclear")
    if returncode == 0:
        return "silent_wrong"
    errors = [line for line in output.splitlines() if re.match(r"(?i)error\b", line)]
    return "clear" if returncode == 2 and said and len(errors) == 1 else "unclear"


def replay(src: Path) -> list[dict[str, object]]:
    """Run every case against the kgtok package in ``src``; one record per case."""
    rows = []
    mounted: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="kgtok-reliability-") as tmp:
        work = Path(tmp).resolve()
        prepare(work)
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1",
               "KGTOK_CACHE_DIR": str(work / "cache"), "COLUMNS": "200"}
        env.pop("KGTOK_DEBUG", None)
        try:
            for case in CASES:
                if case.needs and not mount_fault(work, case.needs, mounted):
                    rows.append({"case": case.name, "outcome": "skipped", "message": "needs root to mount a tmpfs"})
                    continue
                args = [a.replace("{w}", str(work)) for a in case.args]
                prepared = case.setup(work, env) if case.setup else Prepared()
                try:
                    done = subprocess.run([*KGTOK, *args], capture_output=True, text=True, env=env, cwd=work,
                                          timeout=300)
                finally:
                    prepared.cleanup()
                fill = {"w": str(work), **prepared.fill}
                filled = Case(case.name, tuple(args), case.expect, _filled(case.phrase, fill), absent=case.absent)
                output = done.stdout + done.stderr
                outcome = judge(filled, done.returncode, output)
                message = _shown_line(output, filled.phrase)
                for key, value in fill.items():  # the table shows placeholders, not this replay's folder and pids
                    message = message.replace(value, "{" + key + "}")
                rows.append({"case": case.name, "command": "kgtok " + " ".join(case.args), "expect": case.expect,
                             "outcome": outcome, "returncode": done.returncode, "message": message[:200]})
                print(f"{outcome:>12}  {case.name}: {rows[-1]['message']}", flush=True)
                if case.needs:
                    _unmount(work / case.needs, mounted)
                    if case.needs == "readonly" and not IS_ROOT:
                        (work / case.needs).chmod(0o755)
        finally:
            for folder in list(mounted):
                _unmount(folder, mounted)
    return rows


def _filled(text: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return text


def _shown_line(output: str, phrase: str) -> str:
    """The line a person reads: the one with the phrase, else the last error/note/traceback line."""
    lines = output.strip().splitlines()
    said = [line for line in lines if phrase in line] or [
        line for line in lines if re.match(r"(?i)(error|note|warning)\b", line) or "Traceback" in line]
    return said[-1] if said else (lines[-1] if lines else "")


def counts(rows: list[dict[str, object]]) -> dict[str, int]:
    ran = [r for r in rows if r["outcome"] != "skipped"]
    return {
        "cases": len(ran),
        "clear_errors": sum(r["outcome"] == "clear" and r["expect"] == "error" for r in ran),
        "clear_warnings": sum(r["outcome"] == "clear" and r["expect"] == "warning" for r in ran),
        "tracebacks": sum(r["outcome"] == "traceback" for r in ran),
        "silent_wrong": sum(r["outcome"] == "silent_wrong" for r in ran),
        "unclear": sum(r["outcome"] == "unclear" for r in ran),
        "skipped": len(rows) - len(ran),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="Another checkout's src folder to replay as well (e.g. before a fix).")
    args = parser.parse_args()
    rows = replay(SRC)
    before = replay(args.baseline.resolve()) if args.baseline else None
    totals = counts(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(totals, indent=2) + "\n")
    columns = ["case", "expected", "outcome", *(["before"] if before else []), "what the user sees"]
    lines = ["# reliability (issue 18)", "",
             "Each case runs `python -m kgtok ...` in a subprocess; `{w}` is the work folder.", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for i, row in enumerate(rows):
        cells = [row["case"], str(row.get("expect", "")), str(row["outcome"])]
        if before:
            cells.append(str(before[i]["outcome"]))
        cells.append("`" + str(row["message"]).replace("|", "\\|").replace("`", "'") + "`")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Totals: " + ", ".join(f"{k} {v}" for k, v in totals.items())]
    if before:
        lines.append("Before (baseline): " + ", ".join(f"{k} {v}" for k, v in counts(before).items()))
    lines += ["", "Command:", "", f"    {command()}", ""]
    (RESULTS / "reliability.md").write_text("\n".join(lines))
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
