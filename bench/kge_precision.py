"""Stage 1 in bf16 against fp32: validation and test MRR of two runs of one preset, and the step-time ratio.

    python bench/kge_precision.py --dataset wn18rr --fp32 runs/bench/embed-wn18rr-s28-fp32 \
        --bf16 runs/bench/embed-wn18rr-s28-bf16 [--note TEXT]

Both artifacts come from ``bench/kge_quality.py --fresh`` with the same preset, one with ``precision=fp32``,
one with ``precision=bf16``.  Reports each run's validation MRR (every validation triple, both sides,
filtered, at its best checkpoint), the paired test MRR and Hits@1 difference over the same test queries (95%
bootstrap CI, sign-flip permutation p for MRR, exact McNemar p for Hits@1), and the forward+backward step
time of both precisions on the preset's model, measured alternately in this process (a ratio, not a wall
time).  Writes bench/results/kge_precision.json keyed by dataset, and .md.

The rule, written before the bf16 run's result was known (session 28): ``precision: auto`` (bf16 where a
step measures >= 1.25x faster, kgtok.runtime.BF16_MIN_SPEEDUP) stays stage 1's default if, on WN18RR with
the preset ``embed_wn18rr`` trained from scratch on one machine where auto picks bf16, the bf16 run's
validation MRR is at least the fp32 run's minus 0.005.  Otherwise the default becomes fp32 and bf16 an
explicit option.  Test numbers are reported, never used for the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import load_config  # noqa: E402
from kgtok.embed import EmbedConfig, RankedQueries  # noqa: E402
from kgtok.embed.layout import EmbedArtifact  # noqa: E402
from kgtok.metrics import format_difference, paired_comparison  # noqa: E402
from kgtok.stage import read_manifest  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MARGIN = 0.005  # the rule's largest validation MRR loss of bf16


def arm(path: Path) -> dict[str, Any]:
    """One run's numbers from its artifact: metrics, the precision it trained in, its training seconds."""
    artifact = EmbedArtifact(path).checked()
    metrics = json.loads(artifact.metrics_path.read_text())
    manifest = read_manifest(path)
    return {
        "precision": manifest["metrics"].get("precision", "fp32"),
        "valid_mrr": metrics["valid"]["both"]["mrr"], "test_mrr": metrics["test"]["both"]["mrr"],
        **{f"test_{name}": metrics["test"]["both"][name] for name in ("hits_at_1", "hits_at_10")},
        "best_step": metrics["best_step"], "steps": manifest["metrics"].get("steps"),
        "train_seconds": round(manifest["timings"]["train"], 1),
        "valid_curve": [round(h["valid_mrr"], 4) for h in metrics["history"]],
    }


def step_ratio(kg: Any, config: EmbedConfig, repeats: int) -> dict[str, float]:
    """Forward+backward ms of the preset's model in fp32 and bf16, alternately, on ``repeats`` random batches."""
    import torch

    from kgtok.embed import train as embed_train

    config = config.resolved_for(kg)
    model, _ = embed_train.build(config, kg)
    examples = embed_train.training_examples(kg, config.resolved_reciprocal)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(repeats):
        batch = examples[torch.randint(len(examples), (config.batch_size,), generator=generator)]
        rows.append(embed_train.step_timings(model, batch, config))
    fp32, bf16 = (statistics.median(row[name] for row in rows) for name in ("fp32", "bf16"))
    return {"step_ms_fp32": round(fp32, 1), "step_ms_bf16": round(bf16, 1),
            "step_speedup_bf16": round(statistics.median(row["fp32"] / row["bf16"] for row in rows), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", default=None, help="KG directory (default ../shared/datasets/<dataset>)")
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 run's stage-1 artifact")
    parser.add_argument("--bf16", required=True, type=Path, help="the bf16 run's stage-1 artifact")
    parser.add_argument("--repeats", type=int, default=5, help="batches the step-time ratio is measured on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the step timing (0: all)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    import torch

    from kgtok.data import load_kg

    arms = {"fp32": arm(args.fp32), "bf16": arm(args.bf16)}
    for name, numbers in arms.items():
        if numbers["precision"] != name:
            parser.error(f"--{name} {getattr(args, name)}: that artifact trained in {numbers['precision']}")
    ranks = {name: RankedQueries.load(EmbedArtifact(getattr(args, name)).candidates("test")) for name in arms}
    if not np.array_equal(ranks["fp32"].triples, ranks["bf16"].triples):
        parser.error("the two artifacts ranked different test queries")
    paired = paired_comparison(ranks["bf16"].rank, ranks["fp32"].rank)
    config = load_config(EmbedConfig, args.fp32 / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kg = load_kg(args.data or DATA / args.dataset)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    valid_loss = arms["fp32"]["valid_mrr"] - arms["bf16"]["valid_mrr"]
    record = {
        **{f"{name}_{key}": value for name, numbers in arms.items() for key, value in numbers.items()
           if key != "precision"},
        "valid_mrr_bf16_minus_fp32": round(-valid_loss, 4),
        "rule": f"bf16 valid MRR >= fp32 valid MRR - {MARGIN} (validation only)",
        "rule_met": bool(valid_loss <= MARGIN),
        "test_bf16_minus_fp32": {measure: {k: v for k, v in row.items() if k not in ("a", "b")}
                                 for measure, row in paired.items()},
        "test_queries": int(len(ranks["fp32"].rank)),
        **step_ratio(kg, config, args.repeats), "threads": torch.get_num_threads(),
        "note": args.note, "command": command(), "machine": machine(),
    }
    path = write_result("kge_precision", args.dataset, record, [
        "fp32_valid_mrr", "bf16_valid_mrr", "rule_met", "fp32_test_mrr", "bf16_test_mrr", "fp32_best_step",
        "bf16_best_step", "step_ms_fp32", "step_ms_bf16", "step_speedup_bf16"])
    for measure, row in paired.items():
        print(f"test {measure} bf16 - fp32: {format_difference(row)}")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1), f"\n-> {path}")


if __name__ == "__main__":
    main()
