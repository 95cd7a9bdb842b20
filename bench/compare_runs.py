"""Recompute the paired comparisons of a stage-5 result from its evaluation artifacts (no training).

    python bench/compare_runs.py --result llm_umls --dataset umls --no-ids no_codes --random-ids random_ids \
        codes=runs/bench/run-umls/llm-tiny-codes/evaluate random_ids=... no_codes=...

Rewrites the ``comparisons`` and ``significant`` entries (and issue 15's
``headline`` when the runs have LM-valid metrics, GS-Quant minus ReaLM when
``codes`` and ``realm_codes`` are among them) of
bench/results/<result>.json under <dataset>, and the markdown after its
metric table, with :func:`kgtok.llm.compare.comparison_rows` (every ranker
against the retriever, the run without IDs and the run with random IDs).
For tables written before a comparison column existed; the metrics and the
runs stay as they were measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

from llm_compare import gsquant_vs_realm, result_text, run_headline  # noqa: E402

from kgtok.llm.compare import comparison_rows, significant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", required=True, help="result name, e.g. llm_umls")
    parser.add_argument("--dataset", required=True, help="its key in the JSON, e.g. umls")
    parser.add_argument("--no-ids", default=None, help="name of the run without IDs")
    parser.add_argument("--random-ids", default=None, help="name of the run with random IDs")
    parser.add_argument("runs", nargs="+", help="name=stage-5c artifact, in table order")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    path = RESULTS / f"{args.result}.json"
    data = json.loads(path.read_text())
    record = data[args.dataset]
    rows = comparison_rows(runs, args.no_ids, random_ids=args.random_ids)
    record.update(comparisons=rows, significant=significant(rows))
    paths = {name: Path(p) for name, p in runs.items()}
    record.update(gsquant_vs_realm(paths))
    found = run_headline(paths)
    if found is not None:  # issue 15's headline, by the variants' names (bench/llm_compare.py)
        record["headline"] = found
    path.write_text(json.dumps(data, indent=2) + "\n")
    fusion = {name: {k: json.loads((Path(p) / "metrics.json").read_text())["fusion"].get(k)
                     for k in ("weight", "position", "chosen_on", "grid")} for name, p in runs.items()}
    markdown = path.with_suffix(".md")
    head = markdown.read_text().split("\n## Paired comparisons")[0].rstrip("\n") + "\n"
    command = "python " + " ".join(sys.argv)
    markdown.write_text(head + result_text(rows, fusion, record)
                        + f"\nComparisons recomputed from the runs' evaluations with:\n\n    {command}\n")
    print(markdown.read_text())


if __name__ == "__main__":
    main()
