"""Shared helpers of the benchmarks: machine description and result files.

Every benchmark writes ``bench/results/<stage>_<name>.json`` keyed by dataset
and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# $KGTOK_BENCH_RESULTS redirects the result files (the tests run benchmarks without touching bench/results)
RESULTS = Path(os.environ.get("KGTOK_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, Any]:
    import torch

    from kgtok.artifacts import git_hash, package_versions
    from kgtok.runtime import cpu_model

    cpu = cpu_model()

    gpu = {"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}
    return {
        "cpu": cpu, "cores": os.cpu_count(), **gpu, "python": platform.python_version(),
        "versions": {k: v for k, v in package_versions().items() if v}, "git": git_hash(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_result(name: str, dataset: str, record: dict[str, Any], columns: list[str]) -> Path:
    """Merge ``record`` under ``dataset`` into results/<name>.json and rewrite the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    dropped = (data.get(dataset) or {}).get("versus", {})
    if dropped and "versus" not in record:  # paired_runs' comparisons were of the runs this record replaces
        print(f"{path}: {dataset}'s paired comparisons ({', '.join(dropped)}) are dropped with the record they "
              "were added to; if their runs are unchanged, run again:\n" + "".join(
                  f"    {entry.get('command', '(no command recorded)')}\n" for entry in dropped.values()),
              file=sys.stderr)
    data[dataset] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"| dataset | {' | '.join(columns)} |", "|" + " --- |" * (len(columns) + 1)]
    for key, value in sorted(data.items()):
        cells = []
        for column in columns:
            cell = value.get(column, "")
            cells.append(f"{cell:.4f}" if isinstance(cell, float) else str(cell))
        lines.append(f"| {key} | {' | '.join(cells)} |")
    commands = sorted({c for v in data.values() for c in (v.get("command", ""), v.get("compare_command")) if c})
    text = f"# {name}\n\n" + "\n".join(lines) + "\n\nCommands:\n\n" + "".join(f"    {c}\n" for c in commands)
    (RESULTS / f"{name}.md").write_text(text)
    return path


def variant_main(name: str, doc: str, measure: Callable[[Path], dict[str, Any]], shown: tuple[str, ...]) -> None:
    """The command line of a benchmark that measures stage-5 variant folders (``label=DIR``, each with
    ``instruct/`` and ``evaluate/``) on one dataset: ``measure(DIR)``'s keys stored as ``<label>_<key>`` in
    results/<name>.json, the ``shown`` ones in its table."""
    import argparse

    from kgtok.llm.layout import EvaluateArtifact

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="its key in the JSON, e.g. fb15k237_3k")
    parser.add_argument("runs", nargs="+", help="label=DIR, a stage-5 variant folder")
    args = parser.parse_args()
    record: dict[str, Any] = {}
    for item in args.runs:
        label, _, folder = item.partition("=")
        if not folder or not EvaluateArtifact(Path(folder) / "evaluate").predictions.exists():
            parser.error(f"{item}: give label=DIR, DIR a stage-5 variant folder with evaluate/predictions.jsonl")
        record.update({f"{label}_{key}": value for key, value in measure(Path(folder)).items()})
    record.update(command=command(), machine=machine())
    labels = [item.partition("=")[0] for item in args.runs]
    path = write_result(name, args.dataset, record, [f"{label}_{key}" for label in labels for key in shown])
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1), f"\n-> {path}")
