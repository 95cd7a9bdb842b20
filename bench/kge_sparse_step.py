"""Stage 1's step time with dense and with row (sparse) updates, as the entity table grows.

    python bench/kge_sparse_step.py [--sizes 10000 100000 1000000] [--threads 2]

The scaling benchmark's stage-1 setting (DistMult dim 32, sampled negatives
64 per positive, batch 1,000): a dense step passes over the whole table
(Adam's moments decay everywhere), so its time grows with the entity count,
and a graph's epoch has proportionally more steps.  Row updates
(``EmbedConfig.sparse``) touch the batch's rows only; with shared negatives
(``EmbedConfig.shared_negatives``, one draw of ``--shared-negatives`` for the
whole batch, as DGL-KE and PyTorch-BigGraph) a step gathers that many
negative rows instead of batch x 64.  Both variants at each
size are timed in one process, alternating, so a busy core slows both alike.
Writes bench/results/scale_sparse_step.json (keyed by ``synthetic``) and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.embed import EmbedConfig  # noqa: E402
from kgtok.embed.train import build, training_step  # noqa: E402


class Shape:
    """What ``build`` reads of a graph: its sizes (no triples are needed to time a step)."""

    def __init__(self, entities: int, relations: int) -> None:
        self.num_entities, self.num_relations = entities, relations


def step_ms(config: EmbedConfig, entities: int, steps: int) -> float:
    model, optimizer = build(config, Shape(entities, 24))
    generator = torch.Generator().manual_seed(0)
    batch = torch.stack([torch.randint(entities, (config.batch_size,), generator=generator),
                         torch.randint(24, (config.batch_size,), generator=generator),
                         torch.randint(entities, (config.batch_size,), generator=generator)], 1)
    for step in range(3):  # warm-up: allocations, optimizer state
        training_step(model, optimizer, batch, config, step)
    start = time.perf_counter()
    for step in range(steps):
        training_step(model, optimizer, batch, config, step)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared-negatives", type=int, default=256,
                        help="negatives of the shared variant (one draw for the whole batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record: dict = {"setting": "distmult dim 32, nssa, 64 negatives (shared variant: --shared-negatives), batch 1000", "threads": args.threads, "sizes": {}}
    for n in args.sizes:
        variants = {"dense_ms": {"sparse": False}, "sparse_ms": {"sparse": True},
                    "shared_sparse_ms": {"sparse": True, "shared_negatives": True,
                                         "num_negatives": args.shared_negatives}}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, changes in variants.items():
                config = EmbedConfig(**{"model": "distmult", "dim": 32, "loss": "nssa", "num_negatives": 64,
                                        "batch_size": 1000} | changes)
                times[key].append(round(step_ms(config, n, args.steps), 1))
        row = {k: min(v) for k, v in times.items()} | {"all": times}
        row["dense_over_sparse"] = round(row["dense_ms"] / row["sparse_ms"], 2)
        record["sizes"][str(n)] = row
        print(n, row, flush=True)
    record.update(command=command(), machine=machine())
    flat = {f"{k}_{n}": v[k] for n, v in record["sizes"].items() for k in ("dense_ms", "sparse_ms", "shared_sparse_ms")}
    write_result("scale_sparse_step", "synthetic", record | flat, list(flat))


if __name__ == "__main__":
    main()
