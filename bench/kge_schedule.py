"""Stage 1 schedules compared on validation: MRR after each of the first epochs, per candidate.

    python bench/kge_schedule.py --dataset wn18rr --epochs 5 --jobs 2 \\
        --candidate base --candidate lr02:lr=0.2 --candidate b500:batch_size=500,lr=0.2

Each candidate is the dataset's preset (``embed_<dataset>``) with its
overrides; it trains ``--epochs`` epochs from scratch, validating at every
epoch's end on the preset's validation subset.  Candidates run ``--jobs`` at a
time with one thread each, so their wall times are not comparable with each
other or with a run alone: the curve per epoch is the measurement, and the step
time alone comes from bench/kge_step_time.py.  Nothing here looks at test.
Writes bench/results/kge_schedule.json (keyed by dataset) and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run(dataset: str, name: str, overrides: list[str], epochs: int, work: Path) -> dict:
    import math

    import torch

    from kgtok.config import load_config
    from kgtok.data import load_kg
    from kgtok.embed import EmbedConfig
    from kgtok.embed.train import train_model

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    kg = load_kg(DATA / dataset)
    config = load_config(EmbedConfig, f"embed_{dataset}", overrides)
    per_epoch = math.ceil(2 * len(kg.triples["train"]) / config.batch_size)
    config = replace(config, eval_every=per_epoch, max_steps=epochs * per_epoch, patience=epochs, threads=1)
    start = time.perf_counter()
    _, state = train_model(kg, config, work / name, progress=False, log=lambda _: None)
    curve = [round(h["valid_mrr"], 4) for h in state.history]
    return {"overrides": overrides, "batch_size": config.batch_size, "lr": config.resolved_lr,
            "valid_mrr_by_epoch": curve, "seconds_shared": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="wn18rr")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--candidate", action="append", required=True,
                        help="NAME or NAME:key=value,key=value (overrides of the preset)")
    parser.add_argument("--work", default="runs/bench/kge-schedule", help="resumable training folders")
    args = parser.parse_args()
    work = Path(args.work) / args.dataset
    candidates = {}
    for spec in args.candidate:
        name, _, rest = spec.partition(":")
        candidates[name] = [kv for kv in rest.split(",") if kv]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(run, args.dataset, name, o, args.epochs, work) for name, o in candidates.items()}
        rows = {name: f.result() for name, f in futures.items()}
    for name, row in rows.items():
        print(name, row, flush=True)
    flat = {f"{name}_epoch_{e + 1}": mrr for name, row in rows.items()
            for e, mrr in enumerate(row["valid_mrr_by_epoch"])}
    record = {"candidates": rows, "epochs": args.epochs, "jobs": args.jobs, "command": command(),
              "machine": machine()} | flat
    write_result("kge_schedule", args.dataset, record, list(flat))


if __name__ == "__main__":
    main()
