"""Does GSE's L1 need 8,192 drawn centres a step, or do 1,024 give the same codes?

    python bench/scale.py --sizes 100000 --threads 2 --skip-text --keep --work /tmp/keep100k
    python bench/quantizer_l1_negatives.py --work /tmp/keep100k/n100000 --negatives 8192 1024 --seeds 0 1

L1 contrasts each entity's level-l code prefix with its own cluster centre
against every centre of the level, or, where a level has more centres than
``gse.l1_negatives``, against that many drawn ones. At a million entities the
two deepest levels (8,106 and 125,038 centres) cost ~330 of the ~630 ms of a
step at 8,192 (timed by hand on the 2-core AMD EPYC; docs/gpus-and-scaling.md). This runs stage 4 with the
scaling benchmark's settings on its kept 100k-entity graph (its deepest level
is drawn from) for each count and seed, and compares the codes with the
stage-3 hierarchy that L1 pulls toward, and with the synthetic graph's
true types, entity by entity: at level l an entity is *pure* when its
level-l code's most common level-l cluster (or type) is its own (the
per-entity form of homogeneity). The bench's one-epoch stage-1 vectors
carry little of the types (valid MRR ~0), so the hierarchy is the telling
reference. Paired over the same entities: the difference in the share of
pure entities, its bootstrap 95% CI and the exact McNemar p-value
(:func:`kgtok.metrics.paired_comparison`). No test split is read.
``--reuse`` recomputes the comparison from the runs' saved codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine  # noqa: E402
from scale import kgtok, timed_run  # noqa: E402


def purity(codes: np.ndarray, types: np.ndarray) -> np.ndarray:
    """(n,) True where the entity's code shares its most common type with the entity (one level)."""
    width = int(types.max()) + 1
    counts = np.bincount(codes.astype(np.int64) * width + types, minlength=(int(codes.max()) + 1) * width)
    return counts.reshape(-1, width).argmax(axis=1)[codes] == types


def main() -> None:
    from kgtok.data import load_kg
    from kgtok.metrics import format_difference, paired_comparison

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a size folder kept by bench/scale.py --keep")
    parser.add_argument("--negatives", type=int, nargs="+", default=[8192, 1024])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="take runs whose codes exist from the earlier JSON")
    args = parser.parse_args()
    kg = load_kg(args.work / "kg")
    with np.load(args.work / "hierarchy" / "hierarchy.npz") as arrays:
        references = {"hierarchy": arrays["paths"], "types": kg.entity_types}
    env = {**os.environ, "KGTOK_CACHE_DIR": str(args.work / "cache"), "OMP_NUM_THREADS": str(args.threads)}
    path = RESULTS / "quantizer_l1_negatives.json"
    earlier = json.loads(path.read_text())["synthetic"]["runs"] if args.reuse and path.exists() else {}
    runs: dict[str, dict] = {}
    pure: dict[str, dict[str, list[np.ndarray]]] = {}
    for negatives in args.negatives:
        for seed in args.seeds:
            name = f"l1_{negatives}_seed_{seed}"
            out = args.work / f"quantize_{name}"
            argv = kgtok("quantize", "--data", str(args.work / "kg"), "--hierarchy", str(args.work / "hierarchy"),
                         "--out", str(out), "--no-progress", "variant=gsquant", "levels=4", "epochs=2",
                         "eval_every=1", f"seed={seed}", f"gse.l1_negatives={negatives}", f"threads={args.threads}")
            if name in earlier and (out / "codes.npy").exists():
                record = {k: earlier[name][k] for k in ("seconds", "peak_rss_mb")}
            else:
                print(f"l1_negatives: {name} ...", flush=True)
                record = timed_run(argv, env, args.work / "commands.log")
            metrics = json.loads((out / "metrics.json").read_text())
            codes = np.load(out / "codes.npy")
            pure[name] = {}
            for reference, labels in references.items():
                known = (labels >= 0).all(axis=1)
                pure[name][reference] = [purity(codes[known, level], labels[known, level])
                                         for level in range(min(codes.shape[1], labels.shape[1]))]
            runs[name] = {"l1_negatives": negatives, "seed": seed, **record,
                          **{f"pure_share_{r}": [round(float(p.mean()), 4) for p in v] for r, v in pure[name].items()},
                          **{k: metrics[k] for k in ("collision_rate_before", "reconstruction_mse", "best_epoch")},
                          "heldout_entropy": max(h.get("heldout_entropy", -1.0) for h in metrics["history"]),
                          **{k: round(v, 4) for k, v in metrics.items() if k.startswith(("nmi_", "homogeneity_"))}}

    def compare(a: str, b: str) -> dict[str, list[dict[str, float]]]:
        return {reference: [paired_comparison(np.where(pa, 1.0, 2.0), np.where(pb, 1.0, 2.0),
                                              resamples=2000)["hits_at_1"]
                            for pa, pb in zip(pure[a][reference], pure[b][reference])]
                for reference in references}

    base = args.negatives[0]
    comparisons = {}
    for negatives in args.negatives[1:]:
        for seed in args.seeds:
            a, b = f"l1_{negatives}_seed_{seed}", f"l1_{base}_seed_{seed}"
            comparisons[f"{a}_minus_{b}"] = compare(a, b)
    for seed in args.seeds[1:]:  # the same setting, another seed: how far seeds alone move the codes
        a, b = f"l1_{base}_seed_{seed}", f"l1_{base}_seed_{args.seeds[0]}"
        comparisons[f"{a}_minus_{b}"] = compare(a, b)
    result = {"synthetic": {"entities": len(kg.entity_names), "runs": runs, "pure_share_differences": comparisons,
                            "command": command(), "machine": machine()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# quantizer_l1_negatives", "", __doc__.split("\n\n")[0], "",
             f"`{command()}`; {machine()['cpu']}, {args.threads} threads; {len(kg.entity_names):,} entities.", "",
             "| run | seconds | pure share: hierarchy levels 1-4 | pure share: type levels 1-3 | heldout entropy "
             "| rec. MSE | collisions before |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        shares = [", ".join(f"{p:.4f}" for p in r[f"pure_share_{ref}"]) for ref in references]
        lines.append(f"| {name} | {r['seconds']:.0f} | {shares[0]} | {shares[1]} | {r['heldout_entropy']:.3f} | "
                     f"{r['reconstruction_mse']:.4f} | {r['collision_rate_before']:.4f} |")
    lines += ["", "Paired differences in the share of pure entities, per level [95% CI] p:", ""]
    for name, by_reference in comparisons.items():
        for reference, rows in by_reference.items():
            lines.append(f"- {name}, {reference}: "
                         + "; ".join(f"level {i + 1} {format_difference(row, 4)}" for i, row in enumerate(rows)))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
