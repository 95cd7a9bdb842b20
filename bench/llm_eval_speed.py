"""Stage 5c's speed on a finished run, and whether its numbers are the run's own.

    python bench/llm_eval_speed.py --run runs/bench/first-run-now --tag packed
    python bench/llm_eval_speed.py --run runs/bench/first-run-packed --tag batch16 batch_size=16

Re-runs ``kgtok evaluate`` on the run's stage-5b model and instructions into
a scratch folder, under GNU time, and compares every metric with the run's
own evaluation (timings left out): a faster scorer must give the same
numbers. ``run_stage_seconds`` is the run's own evaluation time, with the code it ran. Writes ``bench/results/llm_synthetic_eval_speed.json`` keyed by tag.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine  # noqa: E402
from scale import kgtok, timed_run  # noqa: E402


def numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics tree by its dotted key, timings and rates left out."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not any(w in key for w in ("second", "per_s", "time")):
            out[prefix + key] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a kgtok run folder (finetune/, instruct/, evaluate/)")
    parser.add_argument("--tag", required=True)
    parser.add_argument("overrides", nargs="*", help="kgtok evaluate key=value (e.g. batch_size=16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "evaluate"
        record = timed_run(kgtok("evaluate", "--model", str(args.run / "finetune"), "--instructions",
                                 str(args.run / "instruct"), "--out", str(out), "--no-progress", *args.overrides),
                           None, Path(scratch) / "log.txt")
        new = json.loads((out / "metrics.json").read_text())
        stage = json.loads((out / "manifest.json").read_text())["timings"]
    old = json.loads((args.run / "evaluate" / "metrics.json").read_text())
    a, b = numbers(old), numbers(new)
    differing = sorted(k for k in a if k in b and abs(a[k] - b[k]) > 1e-9)
    reference = json.loads((args.run / "evaluate" / "manifest.json").read_text())["timings"]["total"]
    record.update({"stage_seconds": round(stage["total"], 1), "queries": new["queries"],
                   "run_stage_seconds": round(reference, 1),  # the run's own evaluation, with its code
                   "numbers_compared": len(a), "numbers_differing": differing,
                   "overrides": args.overrides, "run": str(args.run), "command": command(), "machine": machine()})
    path = RESULTS / "llm_synthetic_eval_speed.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.tag] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
