"""Stage 5 in bf16 autocast against fp32 on this CPU: speed, and what it changes on LM-valid.

    python bench/llm_precision.py --run runs/bench/umls-smollm2-s27 --dataset umls finetune.max_steps=100

On a finished run's stage-5a instructions (and stage-4 codes), with the run's
own finetune and evaluate configs (plus ``finetune.*`` / ``evaluate.*``
overrides): fine-tunes once in fp32 and once in bf16 autocast, then scores
LM-valid three times (fp32 model in fp32, bf16 model in bf16, fp32 model in
bf16: the last isolates the evaluation's precision).  Records each arm's
seconds, training tokens/s, LM-valid loss, queries/s, every ranker's LM-valid
Hits@1 and MRR, the paired difference of each bf16 arm to the fp32 one (95%
bootstrap CI, p) and the share of queries whose top-1 is the same.  Time it
with nothing else running.  Writes bench/results/llm_precision.json keyed by
``--dataset``, and .md.

Adoption rule (written before any SmolLM2 result): ``precision: auto`` (bf16
where it measures faster) becomes the default of finetune and evaluate if, on
UMLS with run_smollm2's stage 5 at 100 steps, each bf16 arm against fp32 on
LM-valid shows, for LM pick and re-rank Hits@1, no significant difference
(p >= 0.05) and an absolute difference of at most 0.02; else the default is
fp32 and bf16 stays a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from first_run import RANKERS, paired_to, ranker_metrics  # noqa: E402

from kgtok.config import _merge, config_from_dict, config_to_dict, parse_overrides, saved_config  # noqa: E402
from kgtok.llm.config import EvaluateConfig, FinetuneConfig  # noqa: E402
from kgtok.llm.evaluate import STAGE as EVALUATE  # noqa: E402
from kgtok.llm.finetune import STAGE as FINETUNE  # noqa: E402
from kgtok.pipeline import RunConfig  # noqa: E402
from kgtok.stage import run_stage  # noqa: E402

ARMS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16"))  # (training, evaluation) precision


def same_top1(a: Path, b: Path) -> dict[str, float]:
    """Per LM ranker, the share of queries whose first-ranked candidate is the same in both evaluations."""
    rows = [{r["id"]: r for r in map(json.loads, (path / "predictions.jsonl").open())} for path in (a, b)]
    common = [q for q in rows[0] if q in rows[1]]
    out = {"dift": sum(rows[0][q]["pick"] == rows[1][q]["pick"] for q in common) / len(common)}
    for key in ("rerank_rank", "dift_rank"):
        out[key] = sum(rows[0][q][key] == rows[1][q][key] for q in common) / len(common)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a kgtok run directory with instruct/ and quantize/")
    parser.add_argument("--dataset", required=True, help="the result's key (umls, synthetic, ...)")
    parser.add_argument("--out", default=None, help="arms' folder (default: <run>-precision)")
    parser.add_argument("--note", default="")
    parser.add_argument("overrides", nargs="*", help="finetune.key=value or evaluate.key=value")
    args = parser.parse_args()
    run_dir = Path(args.run)
    base = saved_config(RunConfig, json.loads((run_dir / "run_config.json").read_text()))
    changes = parse_overrides(args.overrides)
    unknown = set(changes) - {"finetune", "evaluate"}
    if unknown:
        raise SystemExit(f"overrides of {sorted(unknown)}: only finetune.* and evaluate.* are varied here")
    finetune = config_from_dict(FinetuneConfig, _merge(config_to_dict(base.finetune), changes.get("finetune", {})))
    evaluate = config_from_dict(EvaluateConfig, _merge(config_to_dict(base.evaluate), changes.get("evaluate", {})))
    root = Path(args.out or f"{run_dir}-precision")
    inputs = {"instructions": run_dir / "instruct",
              "codes": run_dir / "quantize" if (run_dir / "quantize").is_dir() else None}
    record: dict = {"overrides": args.overrides, "split": "lm_valid", "arms": {}}
    for train in ("fp32", "bf16"):
        start = time.perf_counter()
        run_stage(FINETUNE, dataclasses.replace(finetune, precision=train), root / f"finetune-{train}",
                  inputs=inputs, progress=False)
        metrics = json.loads((root / f"finetune-{train}" / "metrics.json").read_text())
        record[f"finetune_{train}"] = {"seconds": round(time.perf_counter() - start, 1), **{
            k: metrics.get(k) for k in ("precision", "precision_step_ms", "steps", "train_tokens_per_second",
                                        "train_loss", "valid_loss", "valid_code_token_loss")}}
    for train, scored in ARMS:
        arm = f"{train}_{scored}"
        dest = root / f"evaluate-{arm}"
        start = time.perf_counter()
        run_stage(EVALUATE, dataclasses.replace(evaluate, split="lm_valid", precision=scored), dest,
                  inputs={"model": root / f"finetune-{train}", "instructions": run_dir / "instruct"}, progress=False)
        metrics = json.loads((dest / "metrics.json").read_text())
        record["arms"][arm] = {"seconds": round(time.perf_counter() - start, 1), "queries": metrics["queries"],
                               "queries_per_second": metrics["queries_per_second"],
                               "precision": metrics["precision"], **ranker_metrics(metrics)}
        if arm != "fp32_fp32":
            reference = root / "evaluate-fp32_fp32"
            print(f"{arm} - fp32_fp32:")
            record["arms"][arm]["vs_fp32"] = paired_to(dest, reference)
            record["arms"][arm]["same_top1_as_fp32"] = same_top1(dest, reference)
    rule = {arm: all(abs(record["arms"][arm]["vs_fp32"][r]["hits_at_1"]["difference"]) <= 0.02
                     and record["arms"][arm]["vs_fp32"][r]["hits_at_1"]["p_value"] >= 0.05
                     for r in ("dift", "rerank")) for arm in ("bf16_bf16", "fp32_bf16")}
    record.update(
        rule_met=rule, note=args.note, load_average_1m=os.getloadavg()[0], command=command(), machine=machine(),
        speedup_train=round(record["finetune_bf16"]["train_tokens_per_second"]
                            / record["finetune_fp32"]["train_tokens_per_second"], 2),
        speedup_evaluate=round(record["arms"]["bf16_bf16"]["queries_per_second"]
                               / record["arms"]["fp32_fp32"]["queries_per_second"], 2),
        **{f"{arm}_{r}_hits_at_1_diff": record["arms"][arm]["vs_fp32"][r]["hits_at_1"]["difference"]
           for arm in ("bf16_bf16", "fp32_bf16") for r in ("dift", "rerank")})
    write_result("llm_precision", args.dataset, record,
                 ["speedup_train", "speedup_evaluate", "bf16_bf16_dift_hits_at_1_diff",
                  "bf16_bf16_rerank_hits_at_1_diff", "fp32_bf16_dift_hits_at_1_diff",
                  "fp32_bf16_rerank_hits_at_1_diff", "rule_met"])
    print(json.dumps({k: record[k] for k in ("speedup_train", "speedup_evaluate", "rule_met")}))


if __name__ == "__main__":
    assert set(RANKERS) >= {"dift", "rerank"}
    main()
