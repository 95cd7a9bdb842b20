"""Choose the first run's stage-5 recipe on LM-valid: fine-tune and evaluate candidates on one run's stages 0-5a.

    python bench/first_run_choose.py --base runs/bench/first-run --tag default
    python bench/first_run_choose.py --base runs/bench/first-run --tag epochs1 finetune.epochs=1

Each candidate is the base run's config with the given overrides; the base's
artifacts up to the first stage the overrides change are linked, not rerun
(:func:`kgtok.pipeline.link_unchanged`), and stage 5c scores the LM-valid
queries (``evaluate.split=lm_valid``): test is not read.  Records each
candidate's instruction, fine-tuning and evaluation seconds (a linked stage's
are the base run's; time them with nothing else running), which stages ran
(``ran``; ``wall_seconds`` is their sum, so it differs between candidates), fine-tuning's valid loss, every
ranker's LM-valid Hits@1 and MRR (fused rankers at fusion weight 1: LM-valid evaluated itself chooses none)
and, when the candidate tagged ``--reference`` (``default``) exists, the paired difference to it.
Writes bench/results/llm_synthetic_first_run_choice.json (keyed by ``--tag``)
and .md; bench/first_run.py then times the chosen recipe from an empty cache
and checks it on test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from first_run import paired_to, ranker_metrics, stage_seconds  # noqa: E402

from kgtok.config import _merge, config_from_dict, config_to_dict, parse_overrides, saved_config  # noqa: E402
from kgtok.pipeline import STAGE_ORDER, RunConfig, link_unchanged, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a finished kgtok run directory (its run_config.json)")
    parser.add_argument("--out", default=None, help="candidates' folder (default: <base>-choose)")
    parser.add_argument("--tag", required=True, help="the candidate's key")
    parser.add_argument("--reference", default="default",
                        help="the candidate (tag, in the same folder) that the paired differences are to")
    parser.add_argument("--note", default="")
    parser.add_argument("overrides", nargs="*", help="kgtok run key=value")
    args = parser.parse_args()
    base_dir = Path(args.base)
    base = saved_config(RunConfig, json.loads((base_dir / "run_config.json").read_text()))
    root = Path(args.out or f"{base_dir}-choose")
    out = root / args.tag
    shutil.rmtree(out, ignore_errors=True)
    changes = parse_overrides([*args.overrides, "evaluate.split=lm_valid", "progress=false"])
    variant = config_from_dict(RunConfig, _merge({**config_to_dict(base), "out": str(out),
                                                  "data": str(base.kg_dir())}, changes))
    linked = link_unchanged(base, variant, tuple(s for s in STAGE_ORDER if s != "synthetic"))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    run(variant)
    wall = time.perf_counter() - start
    finetune = json.loads((out / "finetune" / "metrics.json").read_text())
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    # run() makes a linked stage again when it finds it out of date (a fingerprint): only links left are reused
    linked = [stage for stage in linked if (out / stage).is_symlink()]
    ran = [stage for stage in STAGE_ORDER if (out / stage).is_dir() and not (out / stage).is_symlink()]
    # the same stages for every candidate: a linked one's seconds are the base run's (read through the link)
    seconds = stage_seconds(out, ("instruct", "finetune", "evaluate"))
    record = {
        "overrides": args.overrides, "linked": linked, "ran": ran, "wall_seconds": round(wall, 1),
        "stage_seconds": seconds,
        "split": "lm_valid", "queries": metrics["queries"],
        **ranker_metrics(metrics), "fusion": metrics.get("fusion"),
        **{k: finetune.get(k) for k in ("valid_loss", "valid_code_token_loss", "train_examples", "steps",
                                         "train_tokens_per_second", "learning_rate")},
        "load_average_1m": [load_before, os.getloadavg()[0]], "note": args.note,
    }
    reference = root / args.reference / "evaluate"
    if args.tag != args.reference and (reference / "metrics.json").exists():
        record["vs_reference"] = {"tag": args.reference, **paired_to(out / "evaluate", reference)}
    record.update(command=command(), machine=machine())
    write_result("llm_synthetic_first_run_choice", args.tag, record,
                 ["wall_seconds", "valid_loss", "rerank_mrr", "fused_rerank_mrr", "rerank_hits_at_1",
                  "fused_rerank_hits_at_1"])
    print(f"{args.tag}: {wall:.0f} s; stages {seconds}; valid loss {record['valid_loss']:.4f}")


if __name__ == "__main__":
    main()
