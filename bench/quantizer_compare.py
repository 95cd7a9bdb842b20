"""Stage 4: gsquant vs rq (and realm, flat) on the same inputs: alignment, utilisation, collisions, time.

    python bench/quantizer_compare.py --dataset synthetic            # builds stages 0-3 itself
    python bench/quantizer_compare.py --dataset wn18rr [--hierarchy DIR] [--embeddings DIR] [key=value ...]

For a real graph it reads the artifacts the other benchmarks keep
(runs/bench/hierarchy-<dataset>, runs/bench/embed-<dataset>). Overrides apply
to every variant (e.g. codebook_size=1024 epochs=40). Writes
bench/results/quantizer_<dataset>.json (and .md): one row per variant.
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

from kgtok.config import config_to_dict, load_config  # noqa: E402
from kgtok.quantize import QuantizeConfig, run_quantize  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def synthetic_inputs(threads: int) -> tuple[Path, Path, Path]:
    """Stages 0-3 of the default run on the bundled synthetic KG (cached across calls)."""
    from kgtok.pipeline import RunConfig, run
    from kgtok.config import config_from_dict

    run_dir = Path("runs/bench/synthetic")
    config = config_from_dict(RunConfig, {
        "out": str(run_dir), "progress": False,
        "embed": {"threads": threads, "eval_every": 100, "patience": 3, "max_steps": 5000},
        "text": {"threads": threads}, "hierarchy": {"threads": threads}, "quantize": {"threads": threads, "epochs": 1},
    })
    run(config, until="hierarchy", log=lambda *_: None)
    return run_dir / "synthetic", run_dir / "hierarchy", run_dir / "embed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--hierarchy", default=None)
    parser.add_argument("--embeddings", default=None)
    parser.add_argument("--variants", default="gsquant,rq,realm,flat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result file, e.g. k16 -> quantizer_<dataset>_k16.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.dataset == "synthetic":
        data, hierarchy, embeddings = synthetic_inputs(args.threads)
    else:
        data = DATA / args.dataset
        hierarchy = Path(args.hierarchy or f"runs/bench/hierarchy-{args.dataset}")
        embeddings = Path(args.embeddings or f"runs/bench/embed-{args.dataset}")
    record: dict = {"command": command(), "machine": machine(), "variants": {}}
    for variant in args.variants.split(","):
        overrides = [f"variant={variant}", f"threads={args.threads}", *args.overrides]
        if variant == "realm":  # ReaLM: many stages of residual k-means
            overrides = [o for o in overrides if not o.startswith("levels=")]
        config = load_config(QuantizeConfig, None, overrides)
        out = Path(f"runs/bench/quantize-{args.dataset}{'-' + args.tag if args.tag else ''}-{variant}")
        start = time.perf_counter()
        run_quantize(config, data, out, hierarchy=hierarchy, embeddings=embeddings, progress=False,
                     log=lambda *_: None)
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("history", None)
        record["variants"][variant] = {"seconds": round(seconds, 1), **metrics, "config": config_to_dict(config)}
        print(variant, round(seconds, 1), "s", {k: metrics[k] for k in metrics
                                               if k.startswith(("nmi", "utilization", "collision"))}, flush=True)
    flat = {}
    for variant, row in record["variants"].items():
        flat[f"{variant}_seconds"] = row["seconds"]
        if row.get("best_seconds"):  # training time to the selected (highest-entropy) checkpoint
            flat[f"{variant}_best_seconds"] = row["best_seconds"]
        flat[f"{variant}_min_utilization"] = min(row["utilization"])
        flat[f"{variant}_collision_rate_before"] = row["collision_rate_before"]
        for key in ("nmi_hierarchy_level_1", "homogeneity_hierarchy_level_1", "nmi_types_level_1",
                    "homogeneity_types_level_1", "reconstruction_cosine"):
            if key in row:
                flat[f"{variant}_{key}"] = row[key]
    columns = [k for k in flat if any(s in k for s in ("seconds", "nmi", "homogeneity", "utilization", "collision"))]
    name = f"quantizer_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    write_result(name, args.dataset, record | flat, columns)


if __name__ == "__main__":
    main()
