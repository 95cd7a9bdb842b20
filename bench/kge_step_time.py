"""Stage 1's 1-vs-all step time on a real graph: blocked cross-entropy against the whole score matrix.

    python bench/kge_step_time.py --dataset wn18rr [--dim 100] [--batch-sizes 100 250 500] [--threads 2]

Times ``training_step`` of ComplEx-N3 (the dataset's batches, in a fixed
shuffled order) with the loss scoring a block of entities at a time
(``ChunkedCrossEntropy``), with ``F.cross_entropy`` over the whole (batch, N)
matrix, and as shipped (whole up to ``_WHOLE_MAX_BYTES``, else blocks).  The
variants alternate in one process, so a busy core slows all alike; each is
reported as its fastest of ``--repeats``.  Then ranks ``--rank-triples``
training triples (both sides, top-20 candidates, as the export does) as
shipped (candidates a block at a time, batches kept near 16 MB of scores on a
CPU) and as before (one product, batches of 512).  Writes
bench/results/kge_step_time.json (keyed by dataset) and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.data import load_kg  # noqa: E402
from kgtok.embed import EmbedConfig  # noqa: E402
from kgtok.embed import train as embed_train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


VARIANTS = {"blocked": 0, "whole": 1 << 62, "shipped": None}  # _WHOLE_MAX_BYTES of each variant


def step_ms(kg, config: EmbedConfig, examples: torch.Tensor, steps: int, variant: str) -> float:
    original = embed_train._WHOLE_MAX_BYTES
    if VARIANTS[variant] is not None:
        embed_train._WHOLE_MAX_BYTES = VARIANTS[variant]
    try:
        model, optimizer = embed_train.build(config, kg)
        b = config.batch_size
        for step in range(3):  # warm-up: allocations, optimizer state
            embed_train.training_step(model, optimizer, examples[step * b:(step + 1) * b], config, step)
        start = time.perf_counter()
        for step in range(3, 3 + steps):
            embed_train.training_step(model, optimizer, examples[step * b:(step + 1) * b], config, step)
        return (time.perf_counter() - start) / steps * 1000
    finally:
        embed_train._WHOLE_MAX_BYTES = original


def rank_seconds(kg, config: EmbedConfig, triples: torch.Tensor, shipped: bool) -> float:
    """rank_triples of ``triples`` with top-20 candidates, as shipped or as before (one product, batch 512)."""
    from kgtok.embed import models, ranking

    saved = models._SCORE_BLOCK, ranking._CPU_SCORE_FLOATS
    if not shipped:
        models._SCORE_BLOCK = ranking._CPU_SCORE_FLOATS = 1 << 62
    try:
        model, _ = embed_train.build(config, kg)
        start = time.perf_counter()
        ranking.rank_triples(model, triples, kg.filter_index, reciprocal=True, num_base_relations=kg.num_relations,
                             batch_size=512, top_k=20)
        return time.perf_counter() - start
    finally:
        models._SCORE_BLOCK, ranking._CPU_SCORE_FLOATS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="wn18rr")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 250, 500])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-triples", type=int, default=2048, help="training triples ranked (both sides)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    kg = load_kg(DATA / args.dataset)
    examples = embed_train.training_examples(kg, reciprocal=True)
    examples = examples[torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))]
    record: dict = {"setting": f"complex dim {args.dim}, 1vsall, N3, fused Adagrad", "threads": args.threads,
                    "entities": kg.num_entities, "batch_sizes": {}}
    flat: dict[str, float] = {}
    for b in args.batch_sizes:
        config = EmbedConfig(dim=args.dim, batch_size=b, threads=args.threads).resolved_for(kg)
        times: dict[str, list[float]] = {f"{v}_ms": [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                times[f"{variant}_ms"].append(round(step_ms(kg, config, examples, args.steps, variant), 1))
        row = {k: min(v) for k, v in times.items()} | {"all": times}
        row["whole_over_blocked"] = round(row["whole_ms"] / row["blocked_ms"], 2)
        row["shipped_examples_per_second"] = round(b / row["shipped_ms"] * 1000, 1)
        record["batch_sizes"][str(b)] = row
        flat |= {f"{k}_{b}": row[k] for k in ("blocked_ms", "whole_ms", "shipped_ms", "shipped_examples_per_second")}
        print(b, row, flush=True)
    if args.rank_triples:
        config = EmbedConfig(dim=args.dim, threads=args.threads)
        times = {"rank_shipped_s": [], "rank_before_s": []}
        for _ in range(args.repeats):
            for shipped in (True, False):
                seconds = rank_seconds(kg, config, kg.train[:args.rank_triples], shipped)
                times["rank_shipped_s" if shipped else "rank_before_s"].append(round(seconds, 2))
        rank = {k: min(v) for k, v in times.items()}
        record["ranking"] = {"triples": args.rank_triples, "top_k": 20, **rank, "all": times,
                             "before_over_shipped": round(rank["rank_before_s"] / rank["rank_shipped_s"], 2)}
        flat |= rank
        print(record["ranking"], flush=True)
    record.update(command=command(), machine=machine())
    write_result("kge_step_time", args.dataset, record | flat, list(flat))


if __name__ == "__main__":
    main()
