"""The first run a new user makes: ``kgtok run`` on the bundled synthetic KG, timed from an empty cache.

    python bench/first_run.py --out runs/bench/first-run --tag default
    python bench/first_run.py --out runs/bench/first-run-fast --tag fast \
        --baseline runs/bench/first-run/evaluate finetune.batch_size=32 ...

Runs ``python -m kgtok.cli run`` with the given overrides in a fresh run
directory and a fresh ``KGTOK_CACHE_DIR`` (nothing reused), and records the
wall time, each stage's seconds (from its manifest), the test Hits@1 and MRR
of every ranker and, with ``--baseline`` (another run's stage-5c artifact),
each ranker's paired difference to it over the same test queries (95%
bootstrap CI, p-value), and every LM ranker's paired difference to the
retriever (``vs_retriever``; with ``--compare-only``, for a run already at
``--out``, added to the tag's record without running). The LM-valid numbers (fine-tuning's valid loss, the
fused MRR at the chosen weight) are recorded too: recipes are chosen on
them, test only checks the choice. Writes bench/results/llm_synthetic_first_run.json
(keyed by ``--tag``) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine, write_result  # noqa: E402

from kgtok.llm.compare import comparison_rows, paired_runs  # noqa: E402
from kgtok.metrics import format_difference  # noqa: E402

RANKERS = ("retriever", "dift", "rerank", "fused_pick", "fused_rerank")
RESULT = "llm_synthetic_first_run"
COLUMNS = ["wall_seconds", "retriever_hits_at_1", "dift_hits_at_1", "rerank_hits_at_1", "fused_rerank_hits_at_1",
           "fused_rerank_mrr", "valid_loss", "rerank_hits_at_1_vs_retriever", "fused_rerank_hits_at_1_vs_retriever"]
STAGES = ("synthetic", "data", "embed", "text", "hierarchy", "quantize", "instruct", "finetune", "evaluate")


def stage_seconds(run_dir: Path, stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Each of ``stages``' seconds from its manifest (those the run has)."""
    return {stage: round(json.loads((run_dir / stage / "manifest.json").read_text())["timings"]["total"], 1)
            for stage in stages if (run_dir / stage / "manifest.json").exists()}


def ranker_metrics(metrics: dict) -> dict[str, float]:
    """Every ranker's Hits@1 and MRR from a stage-5c metrics.json."""
    return {f"{r}_{m}": metrics[f"{r}_{m}"] for m in ("hits_at_1", "mrr") for r in RANKERS}


def paired_to(evaluate: Path, other: Path) -> dict:
    """Each ranker of ``evaluate`` minus ``other`` over their common queries, printed as it is returned."""
    rows = paired_runs(evaluate, other, RANKERS)
    for r, row in rows.items():
        print(f"{r}: Hits@1 {format_difference(row['hits_at_1'])}, MRR {format_difference(row['mrr'])}")
    return rows


def versus_retriever(evaluate: Path) -> dict:
    """Each LM ranker minus the retriever over the run's test queries (``vs_retriever``: per ranker and
    measure) and, for the table, each one's Hits@1 difference as text."""
    rows = {row["ranker"]: row["vs_retriever"] for row in comparison_rows({"run": evaluate}) if row["vs_retriever"]}
    return {"vs_retriever": rows,
            **{f"{r}_hits_at_1_vs_retriever": format_difference(row["hits_at_1"]) for r, row in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run directory (deleted first)")
    parser.add_argument("--tag", required=True, help="the result's key, e.g. default or fast")
    parser.add_argument("--baseline", default=None, help="stage-5c artifact of the run to compare with")
    parser.add_argument("--note", default="")
    parser.add_argument("--compare-only", action="store_true",
                        help="add vs_retriever to --tag's record from the run already at --out (no run)")
    parser.add_argument("overrides", nargs="*", help="kgtok run key=value")
    args = parser.parse_args()
    out = Path(args.out)
    if args.compare_only:
        record = json.loads((RESULTS / f"{RESULT}.json").read_text())[args.tag]
        record.update(versus_retriever(out / "evaluate"), compare_command=command())
        write_result(RESULT, args.tag, record, COLUMNS)
        return
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kgtok-cache-") as cache:
        env = {**os.environ, "KGTOK_CACHE_DIR": cache}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kgtok.cli", "run", f"out={out}", "progress=false", *args.overrides],
                       env=env, check=True)
        wall = time.perf_counter() - start
    seconds = stage_seconds(out)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    trained = json.loads((out / "finetune" / "metrics.json").read_text())
    record = {
        "wall_seconds": round(wall, 1), "stage_seconds": seconds, "overrides": args.overrides,
        **ranker_metrics(metrics), "queries": metrics["queries"], "fusion": metrics.get("fusion"),
        "valid_loss": trained.get("valid_loss"), "train_examples": trained.get("train_examples"),
        "steps": trained.get("steps"), "train_tokens_per_second": trained.get("train_tokens_per_second"),
        "load_average_1m": [load_before, os.getloadavg()[0]], "note": args.note,
        **versus_retriever(out / "evaluate"),
    }
    if args.baseline:
        record["baseline"] = args.baseline
        record["vs_baseline"] = paired_to(out / "evaluate", Path(args.baseline))
    record.update(command=command(), machine=machine())
    write_result(RESULT, args.tag, record, COLUMNS)
    print(f"{args.tag}: {wall:.0f} s; stages {seconds}")


if __name__ == "__main__":
    main()
