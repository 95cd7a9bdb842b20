"""Stage 2 speed: sentence-encoder embeddings of every entity's label and description.

    python bench/text_embed.py --dataset wn18rr [--mode separate] [--out DIR] [key=value ...]

Times ``run_text`` on ../shared/datasets/<dataset> with an empty temporary
cache (so every unique text is encoded), then once more from that cache.
Records seconds, entities/s, unique texts/s (model loading included,
importing sentence-transformers not), the number of unique texts and the
process's peak RSS. Keeps the artifact under
runs/bench/text-<dataset> (stage 3 reads it). Writes
bench/results/hierarchy_text.json (and .md), keyed by dataset.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import config_to_dict, load_config  # noqa: E402
from kgtok.text import TextConfig, run_text  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
COLUMNS = ["mode", "entities", "unique_texts", "seconds", "entities_per_second", "texts_per_second",
           "cached_seconds", "peak_rss_mb", "threads"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", default=None, help="KG directory (default ../shared/datasets/<dataset>)")
    parser.add_argument("--config", default=None, help="YAML file of a TextConfig (default: the defaults)")
    parser.add_argument("--mode", default=None, choices=["separate", "joint"], help="shortcut for mode=...")
    parser.add_argument("--out", default=None, help="artifact directory (default runs/bench/text-<dataset>)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    data = Path(args.data) if args.data else DATA / args.dataset
    out = Path(args.out) if args.out else Path("runs/bench") / f"text-{args.dataset}"
    overrides = list(args.overrides) + ([f"mode={args.mode}"] if args.mode else [])
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    import sentence_transformers  # noqa: F401  # a one-off cost (seconds), kept out of the throughput figures
    import_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="kgtok-text-bench-") as cache:
        # A fresh cache: the timing covers model loading and encoding every unique text.
        config = load_config(TextConfig, args.config, [*overrides, f"cache_dir={cache}"])
        start = time.perf_counter()
        dest = run_text(config, data, out, progress=False)
        seconds = time.perf_counter() - start
        metrics = json.loads((dest / "manifest.json").read_text())["metrics"]
        assert not metrics["cache_hit"], "the timed run must not read the cache"
        start = time.perf_counter()
        run_text(config, data, Path(cache) / "cached-artifact", progress=False, log=lambda _: None)
        cached_seconds = time.perf_counter() - start
    record = {
        "mode": config.mode, "model": config.model, "entities": metrics["num_entities"], "dim": metrics["dim"],
        "unique_texts": metrics["unique_texts"], "missing_label": metrics["missing_label"],
        "missing_description": metrics["missing_description"],
        "seconds": round(seconds, 2),  # run_text end to end: KG loading, model loading, encoding, writing
        "encode_seconds": metrics["seconds"],  # texts -> vectors, model loading included
        "import_seconds": round(import_seconds, 2),  # importing sentence-transformers, before the timing
        "entities_per_second": round(metrics["num_entities"] / seconds, 1),
        "texts_per_second": round(metrics["unique_texts"] / metrics["seconds"], 1),
        "cached_seconds": round(cached_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "threads": config.threads,
        "config": {k: v for k, v in config_to_dict(config).items() if k != "cache_dir"},
        "artifact": str(dest), "command": command(), "machine": machine(),
    }
    path = write_result("hierarchy_text", args.dataset, record, COLUMNS)
    print(f"{args.dataset}: {metrics['num_entities']} entities, {metrics['unique_texts']} unique texts in "
          f"{seconds:.1f} s ({record['entities_per_second']} entities/s), cached {cached_seconds:.1f} s, "
          f"peak RSS {record['peak_rss_mb']:.0f} MB -> {path}")


if __name__ == "__main__":
    main()
