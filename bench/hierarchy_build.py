"""Stage 3 speed, memory and shape: fuse stage-1 and stage-2 vectors and build the tree.

    python bench/hierarchy_build.py --dataset wn18rr [--embeddings DIR] [--text DIR] [key=value ...]

Reads the artifacts the other benchmarks keep (runs/bench/embed-<dataset>,
runs/bench/text-<dataset>), times ``run_hierarchy`` with the default builder
and records peak RSS (the process holds only this stage's data), the cluster
counts, the level-1 size spread and the five largest top clusters with their
top words and member labels. Writes bench/results/hierarchy_<dataset>.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import config_to_dict, load_config  # noqa: E402
from kgtok.hierarchy import HierarchyConfig, run_hierarchy  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--embeddings", default=None)
    parser.add_argument("--text", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    data = Path(args.data) if args.data else DATA / args.dataset
    embeddings = Path(args.embeddings or f"runs/bench/embed-{args.dataset}")
    text = Path(args.text or f"runs/bench/text-{args.dataset}")
    out = Path(args.out or f"runs/bench/hierarchy-{args.dataset}")
    config = load_config(HierarchyConfig, None, args.overrides)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    dest = run_hierarchy(config, data, out, embeddings=embeddings if embeddings.exists() else None,
                         text=text if text.exists() else None, log=lambda *_: None)
    seconds = time.perf_counter() - start
    manifest = json.loads((dest / "manifest.json").read_text())
    readable = json.loads((dest / "hierarchy.json").read_text())
    metrics = manifest["metrics"]
    record = {
        "builder": metrics["builder"], "counts": metrics["counts"], "rho": metrics["rho"],
        "seconds": round(seconds, 1), "timings": manifest["timings"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "level_1_largest_share": metrics["level_1_largest_share"],
        "top_silhouettes": metrics["top_silhouettes"],
        "used_embeddings": embeddings.exists(), "used_text": text.exists(),
        "top_clusters": [
            {"size": c["size"], "top_words": c["top_words"][:6], "members": c["members"][:8]}
            for c in readable["clusters"][:5]
        ],
        **{k: v for k, v in metrics.items() if k.startswith("nmi")},
        "config": config_to_dict(config), "command": command(), "machine": machine(),
    }
    path = write_result(f"hierarchy_{args.dataset}", args.dataset, record,
                        ["builder", "counts", "seconds", "peak_rss_mb", "level_1_largest_share"])
    print(json.dumps({k: record[k] for k in ("builder", "counts", "seconds", "peak_rss_mb")}), "->", path)
    for cluster in record["top_clusters"]:
        print(cluster["size"], cluster["top_words"], cluster["members"])


if __name__ == "__main__":
    main()
