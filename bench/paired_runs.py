"""Pair runs across two stage-5 results: the same variant with a setting changed (e.g. 400 against 100
fine-tuning steps), per ranker, over the test queries both evaluated (no training).

    python bench/paired_runs.py --result llm_umls_smollm2_long --dataset umls --name steps_400_vs_100 \
        codes=runs/bench/run-umls/llm-...-long-codes/evaluate:runs/bench/run-umls/llm-...-order-codes/evaluate

Each ``name=A:B`` gives A minus B (:func:`kgtok.llm.compare.paired_runs`: paired difference, 95% bootstrap CI,
p-value) for the pick, re-rank and fused rankers.  Stored under ``versus.<name>`` of
bench/results/<result>.json at <dataset>, and appended to its markdown with the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

from kgtok.llm.compare import difference_lines, evaluation_ranks, paired_runs  # noqa: E402

RANKERS = ("dift", "rerank", "fused_pick", "fused_rerank", "generative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", required=True, help="result name, e.g. llm_umls_smollm2_long")
    parser.add_argument("--dataset", required=True, help="its key in the JSON, e.g. umls")
    parser.add_argument("--name", required=True, help="what A minus B measures, e.g. steps_400_vs_100")
    parser.add_argument("--same-queries-as", default=None, metavar="DIR",
                        help="a stage-5c artifact: pair over the test queries it evaluated only (e.g. a run on "
                             "fewer queries, to set two older runs beside it on the same ones)")
    parser.add_argument("pairs", nargs="+", help="label=A:B, two stage-5c artifacts (A minus B)")
    args = parser.parse_args()
    path = RESULTS / f"{args.result}.json"
    if not path.exists():
        parser.error(f"{path} not found")
    data = json.loads(path.read_text())
    if args.dataset not in data:
        parser.error(f"{path} has no {args.dataset!r} (it has {', '.join(data)})")
    queries = None
    if args.same_queries_as is not None:
        if not (Path(args.same_queries_as) / "predictions.jsonl").exists():
            parser.error(f"--same-queries-as {args.same_queries_as}: no predictions.jsonl (not a stage-5c artifact)")
        queries = evaluation_ranks(args.same_queries_as)[0]
    pairs = {}
    for item in args.pairs:
        label, sep, paths = item.partition("=")
        a, sep2, b = paths.partition(":")
        if not (sep and sep2 and label and a and b):
            parser.error(f"{item!r}: expected label=A:B")
        for run in (a, b):
            if not (Path(run) / "predictions.jsonl").exists():
                parser.error(f"{item!r}: {run} has no predictions.jsonl (not a stage-5c artifact)")
        pairs[label] = paired_runs(a, b, RANKERS, queries)
    command = "python " + " ".join(sys.argv)
    same = {"same_queries_as": args.same_queries_as} if queries is not None else {}
    data[args.dataset].setdefault("versus", {})[args.name] = {"pairs": pairs, "command": command, **same}
    path.write_text(json.dumps(data, indent=2) + "\n")
    text = f"\n## {args.name} (A minus B, same test queries)\n\n"
    for label, rows in pairs.items():
        text += f"- {label}:\n" + difference_lines(rows, "  ")
    text += f"\nWith:\n\n    {command}\n"
    with path.with_suffix(".md").open("a") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
