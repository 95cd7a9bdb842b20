"""What LM-valid under the standard filter changes in a finished run: its stage 5a again, then 5c on its model.

    python bench/llm_lm_valid.py --run runs/bench/first-run-packed --tag default

Stage 5a runs again with today's code and the run's own instruct config (LM-valid's lists now filtered as
test's; LM-train's and test's unchanged, checked), then stage 5c with the run's own fine-tuned model (the
weights never depended on LM-valid): so only what is chosen on LM-valid can move, the fusion weight. Records
LM-valid's stage-1 Hits@1 and MRR before and after, the weights chosen, and every ranker's paired test
difference to the run's own evaluation (95% bootstrap CI, p).  Writes
bench/results/llm_synthetic_lm_valid.json keyed by tag, and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import saved_config  # noqa: E402
from kgtok.llm import run_instruct  # noqa: E402
from kgtok.llm.compare import paired_runs  # noqa: E402
from kgtok.llm.evaluate import run_evaluate  # noqa: E402
from kgtok.pipeline import RunConfig  # noqa: E402


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage1(records: list[dict]) -> dict[str, float]:
    ranks = np.array([r["stage1_rank"] for r in records])
    return {"hits_at_1": float(np.mean(ranks <= 1)), "mrr": float(np.mean(1.0 / ranks)), "queries": len(ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished kgtok run folder")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    config = saved_config(RunConfig, json.loads((args.run / "run_config.json").read_text()))
    kg = json.loads((args.run / "data" / "manifest.json").read_text())["metrics"]["kg_dir"]
    with tempfile.TemporaryDirectory() as scratch:
        instruct = run_instruct(config.instruct, kg, args.run / "embed", Path(scratch) / "instruct",
                                codes=args.run / "quantize" if config.instruct.use_codes else None, log=print)
        old, new = args.run / "instruct", Path(instruct)
        for split in ("test", "lm_train"):  # only LM-valid may differ
            if [(r["id"], r["prompt"], r["answer"]) for r in read(old / f"{split}.jsonl")] != \
                    [(r["id"], r["prompt"], r["answer"]) for r in read(new / f"{split}.jsonl")]:
                raise SystemExit(f"{split}.jsonl differs from the run's: not a comparison of LM-valid alone")
        evaluate = run_evaluate(config.evaluate, args.run / "finetune", new, Path(scratch) / "evaluate",
                                progress=False, log=print)
        before = json.loads((args.run / "evaluate" / "metrics.json").read_text())["fusion"]
        after = json.loads((Path(evaluate) / "metrics.json").read_text())["fusion"]
        versus = paired_runs(evaluate, args.run / "evaluate")
        record = {
            "run": str(args.run),
            "lm_valid_stage1_before": stage1(read(old / "lm_valid.jsonl")),
            "lm_valid_stage1_after": stage1(read(new / "lm_valid.jsonl")),
            "fusion_before": {k: before.get(k) for k in ("weight", "position", "valid_mrr")},
            "fusion_after": {k: after.get(k) for k in ("weight", "position", "valid_mrr")},
            "test_after_minus_before": {key: {m: {k: row[m][k] for k in ("a", "b", "difference", "ci_low",
                                                                          "ci_high", "p_value")}
                                              for m in row} for key, row in versus.items()},
            "command": command(), "machine": machine(),
        }
    record.update({"lm_valid_hits_at_1_before": record["lm_valid_stage1_before"]["hits_at_1"],
                   "lm_valid_hits_at_1_after": record["lm_valid_stage1_after"]["hits_at_1"],
                   "weight_before": before.get("weight"), "weight_after": after.get("weight"),
                   "fused_rerank_hits_at_1_difference": record["test_after_minus_before"].get(
                       "fused_rerank", {}).get("hits_at_1", {}).get("difference")})
    write_result("llm_synthetic_lm_valid", args.tag, record,
                 ["lm_valid_hits_at_1_before", "lm_valid_hits_at_1_after", "weight_before", "weight_after",
                  "fused_rerank_hits_at_1_difference"])
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "test_after_minus_before")}, indent=1))


if __name__ == "__main__":
    main()
