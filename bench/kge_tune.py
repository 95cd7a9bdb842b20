"""Stage 1: the shipped default EmbedConfig vs what ``kgtok embed --tune`` finds, on several graphs.

    python bench/kge_tune.py [--datasets umls,kinship,nations,wn18rr_6k,fb15k237_3k] [--budget 300]
                             [--max-trials 12] [--threads 2] [--note TEXT] [key=value ...]

Per dataset: stage 1 with the default config (plus the given overrides), then
the search (validation MRR only), then stage 1 with the chosen config. The
test MRR of both, their paired difference (tuned - default) with a 95%
bootstrap CI and a sign-flip p-value over test queries, the chosen settings
and the trials. The target: the default within 0.02 test MRR of the tuned
config everywhere. ``wn18rr_6k`` and ``fb15k237_3k`` are subsets written by
``kgtok data subset`` (seed 0) under runs/bench/subsets.
Writes bench/results/kge_tune.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import config_to_dict, load_config  # noqa: E402
from kgtok.data import load_kg  # noqa: E402
from kgtok.embed import EmbedConfig, run_embed  # noqa: E402
from kgtok.embed.layout import EmbedArtifact  # noqa: E402
from kgtok.embed.tune import TuneConfig, tune  # noqa: E402
from kgtok.metrics import paired_comparison  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SUBSETS = {"wn18rr_6k": ("wn18rr", 6000), "fb15k237_3k": ("fb15k237", 3000)}


def kg_dir(name: str) -> Path:
    if name not in SUBSETS:
        return DATA / name
    from kgtok.data.subset import write_subset

    source, entities = SUBSETS[name]
    dest = Path("runs/bench/subsets") / name
    if not (dest / "train.txt").exists():
        write_subset(DATA / source, dest, entities=entities, seed=0)
    return dest


def test_ranks(artifact: Path) -> np.ndarray:
    with np.load(EmbedArtifact(artifact).candidates("test")) as data:
        return data["rank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="umls,kinship,nations,wn18rr_6k,fb15k237_3k")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of search per dataset")
    parser.add_argument("--max-trials", type=int, default=0, help="stop the search after this many trials (0: budget)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/tune")
    parser.add_argument("--note", default="")
    parser.add_argument("overrides", nargs="*", help="EmbedConfig key=value applied to both runs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for name in args.datasets.split(","):
        data = kg_dir(name)
        out = Path(args.out) / name
        base = load_config(EmbedConfig, None, [f"threads={args.threads}", *args.overrides])
        start = time.perf_counter()
        run_embed(base, data, out / "default", progress=False, log=lambda *_: None)
        default_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = tune(load_kg(data), base, TuneConfig(budget=args.budget, max_trials=args.max_trials),
                      log=lambda m: print(f"{name}: {m}", flush=True))
        tune_seconds = time.perf_counter() - start
        start = time.perf_counter()
        run_embed(result.chosen, data, out / "tuned", progress=False, log=lambda *_: None)
        tuned_seconds = time.perf_counter() - start
        metrics = {k: json.loads((out / k / "metrics.json").read_text()) for k in ("default", "tuned")}
        compared = paired_comparison(test_ranks(out / "tuned"), test_ranks(out / "default"))
        chosen = config_to_dict(result.chosen)
        record = {
            "default_valid_mrr": metrics["default"]["valid"]["both"]["mrr"],
            "tuned_valid_mrr": metrics["tuned"]["valid"]["both"]["mrr"],
            "default_test_mrr": metrics["default"]["test"]["both"]["mrr"],
            "tuned_test_mrr": metrics["tuned"]["test"]["both"]["mrr"],
            "tuned_minus_default_mrr": compared["mrr"],
            "tuned_minus_default_hits_at_1": compared["hits_at_1"],
            "within_0_02": bool(compared["mrr"]["difference"] <= 0.02),
            "chosen": {k: chosen[k] for k in ("dim", "batch_size", "regularizer_weight", "lr")},
            "search_valid_mrr": {"given": result.given_valid_mrr, "chosen": result.chosen_valid_mrr},
            "trials": result.trials,
            "seconds": {"default": round(default_seconds, 1), "tune": round(tune_seconds, 1),
                        "tuned": round(tuned_seconds, 1)},
            "chosen_on": "valid MRR (the search); test is read only for this table",
            "budget": args.budget, "max_trials": args.max_trials, "note": args.note,
            "command": command(), "machine": machine(), "threads": args.threads,
        }
        d = compared["mrr"]
        print(f"{name}: default test MRR {record['default_test_mrr']:.4f}, tuned {record['tuned_test_mrr']:.4f} "
              f"(diff {d['difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] p={d['p_value']:.3g})",
              flush=True)
        write_result("kge_tune", name, record, ["default_test_mrr", "tuned_test_mrr", "within_0_02",
                                                "default_valid_mrr", "tuned_valid_mrr", "chosen"])


if __name__ == "__main__":
    main()
