"""Stage 4 at several codebook sizes K on the same inputs: how many entities share each code, level by level.

    python bench/quantizer_codebook_size.py --dataset wn18rr_6k --run-dir runs/bench/run-wn18rr_6k \
        --sizes 64 128 256 1024 [--threads 2] [key=value ...]

The auto K (entities / 8, at most 1,024) gives a 6,000-entity graph 1,024
codes a level: a level-1 code is shared by about four entities and the first
two tokens already name most entities, so the LM meets each code token a few
times and the code carries little coarse-to-fine structure for it to use. A
smaller K shares codes more widely but makes more entities collide on the
whole code (the extra disambiguation token then carries them, as arbitrary
as a random ID). For each K this runs stage 4 from the run's stage-1 vectors
and stage-3 hierarchy (``<work>/k<K>``, reused when current) and records the
collision rate before the fix, the distinct prefixes and the median entities
per code at each level, reconstruction and alignment with the hierarchy.
``--max-collisions`` names the rule that picks K without an LM: the smallest K
whose collision rate before the fix is at most that. Writes
bench/results/quantizer_codebook_size.json keyed by dataset (and .md). No
test split is read.
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
from _common import RESULTS, command, machine  # noqa: E402

from kgtok.config import load_config  # noqa: E402
from kgtok.quantize import QuantizeConfig, run_quantize  # noqa: E402


def sharing(codes: np.ndarray, levels: int) -> dict[str, list[float]]:
    """Per level of the base code: distinct prefixes and the median number of entities sharing a level-l code."""
    prefixes, median = [], []
    for level in range(levels):
        prefixes.append(int(np.unique(codes[:, :level + 1], axis=0).shape[0]))
        median.append(float(np.median(np.unique(codes[:, level], return_counts=True)[1])))
    return {"distinct_prefixes": prefixes, "median_entities_per_code": median}


def chosen_size(rows: dict[str, dict], max_collisions: float) -> int | None:
    """The smallest K whose collision rate before the fix is at most ``max_collisions`` (None when none is)."""
    fitting = [int(k) for k, row in rows.items() if row["collision_rate_before"] <= max_collisions]
    return min(fitting) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="the key of the result (e.g. wn18rr_6k)")
    parser.add_argument("--run-dir", type=Path, required=True, help="a kgtok run folder with data, embed, hierarchy")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 1024])
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="stage-4 folders (default <run-dir>/codebook-size)")
    parser.add_argument("--max-collisions", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="quantize key=value for every K")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    kg_dir = json.loads((args.run_dir / "data" / "manifest.json").read_text())["metrics"]["kg_dir"]
    work = args.work or args.run_dir / "codebook-size"
    rows: dict[str, dict] = {}
    for size in args.sizes:
        config = load_config(QuantizeConfig, None, [f"codebook_size={size}", f"levels={args.levels}",
                                                    f"threads={args.threads}", *args.overrides])
        begin = time.perf_counter()
        dest = run_quantize(config, kg_dir, work / f"k{size}", hierarchy=args.run_dir / "hierarchy",
                            embeddings=args.run_dir / "embed", progress=False, log=lambda *_: None)
        seconds = time.perf_counter() - begin
        metrics = json.loads((dest / "metrics.json").read_text())
        codes = np.load(dest / "codes.npy")
        rows[str(size)] = {
            "collision_rate_before": metrics["collision_rate_before"], "width": metrics["width"],
            **sharing(codes, args.levels), "reconstruction_cosine": metrics["reconstruction_cosine"],
            **{f"nmi_hierarchy_level_{level}": metrics[f"nmi_hierarchy_level_{level}"]
               for level in range(1, args.levels + 1) if f"nmi_hierarchy_level_{level}" in metrics},
            "seconds": round(seconds, 1),
        }
        print(f"K={size}: collisions before the fix {metrics['collision_rate_before']:.4f}", flush=True)
    record = {"entities": int(codes.shape[0]), "levels": args.levels, "rows": rows,
              "max_collisions": args.max_collisions, "chosen": chosen_size(rows, args.max_collisions),
              "command": command(), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "quantizer_codebook_size.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.dataset] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "quantizer_codebook_size.md").write_text(table(data))


def table(data: dict[str, dict]) -> str:
    lines = ["# quantizer_codebook_size", "",
             "Stage 4 at several codebook sizes K (same stage-1 vectors and hierarchy). Prefixes and median "
             "entities a code: levels 1..m of the base code, before the disambiguation token.", "",
             "| dataset | entities | K | collisions before fix | distinct prefixes | median entities a code | "
             "reconstruction cosine | NMI with hierarchy level 1 | seconds |", "|" + " --- |" * 9]
    for dataset, record in sorted(data.items()):
        for size, row in record["rows"].items():
            lines.append(f"| {dataset} | {record['entities']} | {size} | {row['collision_rate_before']:.4f} | "
                         f"{', '.join(map(str, row['distinct_prefixes']))} | "
                         f"{', '.join(f'{v:g}' for v in row['median_entities_per_code'])} | "
                         f"{row['reconstruction_cosine']:.3f} | {row.get('nmi_hierarchy_level_1', float('nan')):.3f} | "
                         f"{row['seconds']} |")
    lines += ["", "Chosen K (smallest with collisions before the fix at most the bound; no LM, no test split):", ""]
    lines += [f"- {d}: K={r['chosen']} (bound {r['max_collisions']})" for d, r in sorted(data.items())]
    lines += ["", "Commands (machine in the JSON):", ""] + [f"    {r['command']}" for _, r in sorted(data.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
