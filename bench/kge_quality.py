"""Stage 1 quality: filtered test MRR and wall time of the shipped config on a dataset.

    python bench/kge_quality.py --dataset wn18rr [--config embed_wn18rr] [key=value ...]
    python bench/kge_quality.py --dataset wn18rr --artifact runs/wn18rr/embed   # a finished stage-1 artifact
    python bench/kge_quality.py --dataset wn18rr --fresh --result kge_timed   # one timed run from scratch

Writes bench/results/kge_<dataset>.json (and .md) and keeps the artifact under
runs/bench/embed-<dataset> (its candidates feed stage 5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import config_to_dict, load_config, saved_config  # noqa: E402
from kgtok.embed import EmbedConfig, run_embed  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", default=None, help="KG directory (default ../shared/datasets/<dataset>)")
    parser.add_argument("--config", default=None, help="YAML or preset name (default embed_<dataset>)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--artifact", default=None,
                        help="report this finished stage-1 artifact (e.g. a kgtok run's embed/) instead of training")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the artifact and its work folder first: a timed run from scratch")
    parser.add_argument("--result", default=None, help="result name (default kge_<dataset>), e.g. kge_timed")
    parser.add_argument("--note", default="", help="recorded with the result (e.g. the machine's load)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    data = Path(args.data) if args.data else DATA / args.dataset
    config = load_config(EmbedConfig, args.config or f"embed_{args.dataset}", args.overrides)
    out = Path(args.out) if args.out else Path("runs/bench") / f"embed-{args.dataset}"
    warnings.simplefilter("ignore")
    if args.fresh and not args.artifact:
        import shutil

        for path in (out, out.with_name(out.name + ".work")):
            shutil.rmtree(path, ignore_errors=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if args.artifact:  # its own config, not the preset's: the record says what was measured
        dest = Path(args.artifact)
        config = saved_config(EmbedConfig, json.loads((dest / "manifest.json").read_text())["config"])
    else:
        dest = run_embed(config, data, out, progress=False)
    seconds = time.perf_counter() - start if not args.artifact else None
    metrics = json.loads((dest / "metrics.json").read_text())
    manifest = json.loads((dest / "manifest.json").read_text())
    test, valid = metrics["test"]["both"], metrics["valid"]["both"]
    record = {
        "model": config.model, "dim": config.dim,
        "mrr": test["mrr"], "hits_at_1": test["hits_at_1"], "hits_at_3": test["hits_at_3"],
        "hits_at_10": test["hits_at_10"], "mr": test["mr"], "valid_mrr": valid["mrr"],
        "seconds": round(seconds, 1) if seconds is not None else None, "artifact": str(dest), "train_seconds": round(manifest["timings"]["train"], 1),
        "evaluate_export_seconds": round(manifest["timings"]["evaluate"], 1),
        "steps": manifest["metrics"]["steps"], "best_step": manifest["metrics"]["best_step"],
        "stopped_by": "max_steps" if manifest["metrics"]["steps"] >= config.max_steps else "patience",
        "from_scratch": bool(args.fresh), "load_average_1m": [load_before, os.getloadavg()[0]], "note": args.note,
        "head": metrics["test"]["head"], "tail": metrics["test"]["tail"],
        "history": metrics["history"], "config": config_to_dict(config),
        "command": command(), "machine": machine(),
    }
    path = write_result(args.result or f"kge_{args.dataset}", args.dataset, record,
                        ["model", "dim", "mrr", "hits_at_1", "hits_at_3", "hits_at_10", "seconds", "best_step",
                         "stopped_by"])
    print(f"{args.dataset}: test MRR {test['mrr']:.4f} -> {path}")


if __name__ == "__main__":
    main()
