"""The paper's ablation set on the default run: full vs without L1 / L2 / GSR / codes.

    python bench/ablation.py [--out runs/default-ablate] [--threads 1] [--only without_codes --tag default]
                             [run overrides ...]

Runs (or reuses, when cached) ``kgtok.pipeline.ablate`` and writes
bench/results/llm_synthetic_ablation.json (and .md): per run, Hits@1 and MRR of
the LM pick (DIFT rule), the re-rank and the fused re-rank, and the retriever.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import load_config  # noqa: E402
from kgtok.pipeline import ABLATIONS, RunConfig, ablate  # noqa: E402

STAGES = ("embed", "text", "hierarchy", "quantize", "finetune", "evaluate")
RANKERS = ("dift", "rerank", "fused_rerank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default-ablate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated subset of the ablations")
    parser.add_argument("--tag", default="ablation", help="result name: llm_synthetic_<tag>")
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
    record.update(seconds_this_call=round(time.perf_counter() - start, 1), out=args.out, command=command(),
                  machine=machine())
    columns = ["retriever_hits_at_1"] + [f"{name}_{ranker}_hits_at_1" for name in results for ranker in RANKERS]
    path = write_result(f"llm_synthetic_{args.tag}", "synthetic", record, columns)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
