"""The paper's ablation set on the default run: full vs without L1 / L2 / GSR / codes, and random IDs.

    python bench/ablation.py [--out runs/default-ablate] [--threads 1]
                             [--only without_codes,random_ids --tag default] [--note TEXT] [run overrides ...]

Runs (or reuses, when cached) ``kgtok.pipeline.ablate`` and writes
bench/results/llm_synthetic_<tag>.json (and .md): per run, Hits@1 and MRR of
the LM pick (DIFT rule), the re-rank and the fused re-rank, and the retriever;
then the comparison table of :mod:`kgtok.llm.compare` (every ranker of every
run against the retriever and against the run without IDs: paired difference,
95% bootstrap CI, p-value), the fusion weight each run chose on LM-valid, and
the differences with p < 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import load_config  # noqa: E402
from kgtok.llm.compare import comparison_markdown, comparison_rows, significant  # noqa: E402
from kgtok.pipeline import ABLATIONS, RunConfig, ablate  # noqa: E402

STAGES = ("embed", "text", "hierarchy", "quantize", "finetune", "evaluate")
RANKERS = ("dift", "rerank", "fused_rerank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default-ablate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated subset of the ablations")
    parser.add_argument("--tag", default="ablation", help="result name: llm_synthetic_<tag>")
    parser.add_argument("--note", default="", help="recorded with the result (e.g. whether the machine was shared)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config = load_config(RunConfig, None, [f"out={args.out}", "progress=false",
                                           *[f"{s}.threads={args.threads}" for s in STAGES], *args.overrides])
    start = time.perf_counter()
    names = tuple(args.only.split(",")) if args.only else tuple(ABLATIONS)
    results = ablate(config, names, log=lambda *_: None)
    record: dict = {"retriever_hits_at_1": results["full"]["retriever_hits_at_1"],
                    "retriever_mrr": results["full"]["retriever_mrr"]}
    for name, metrics in results.items():
        for ranker in RANKERS:
            for key in ("hits_at_1", "mrr"):
                if f"{ranker}_{key}" in metrics:
                    record[f"{name}_{ranker}_{key}"] = metrics[f"{ranker}_{key}"]
    run_dir = Path(args.out)
    runs = {name: run_dir / "evaluate" if name == "full" else run_dir / "ablate" / name / "evaluate"
            for name in results}
    rows = comparison_rows(runs, "without_codes" if "without_codes" in runs else None,
                           random_ids="random_ids" if "random_ids" in runs else None)
    fusion = {name: {k: json.loads((path / "metrics.json").read_text())["fusion"].get(k)
                     for k in ("weight", "position", "chosen_on", "grid")} for name, path in runs.items()}
    record.update(comparisons=rows, significant=significant(rows), fusion=fusion, note=args.note,
                  seconds_this_call=round(time.perf_counter() - start, 1), out=args.out, command=command(),
                  machine=machine())
    columns = ["retriever_hits_at_1"] + [f"{name}_{ranker}_hits_at_1" for name in results for ranker in RANKERS]
    path = write_result(f"llm_synthetic_{args.tag}", "synthetic", record, columns)
    text = comparison_text(rows, fusion, record)
    with path.with_suffix(".md").open("a") as handle:
        handle.write(text)
    print(text)
    print(f"-> {path}")


def comparison_text(rows: list[dict], fusion: dict, record: dict) -> str:
    """The markdown after the metric table: comparisons, the choices made on LM-valid, the significant ones."""
    chosen = "".join(f"- {name}: fusion weight {f['weight']} ({f['position']}), chosen on {f['chosen_on']}; "
                     f"grid {f['grid']}\n" for name, f in fusion.items())
    found = "".join(f"- {s}\n" for s in record["significant"]) or "- none\n"
    return (f"\n## Paired comparisons (test)\n\n{comparison_markdown(rows)}\n"
            f"## Chosen on LM-valid (never on test)\n\n{chosen}\n"
            f"## Significant at p < 0.05 (no correction for the number of comparisons)\n\n{found}\n"
            f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores; {record['note']}\n")


if __name__ == "__main__":
    main()
