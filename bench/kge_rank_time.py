"""Stage 1's ranking time with the one-topk path of filtered_top_k against the passes that settle ties.

    python bench/kge_rank_time.py --data ../shared/datasets/wn18rr --key wn18rr
    python bench/kge_rank_time.py --data /tmp/keep/n1000000/kg --key synthetic --model distmult --dim 32 \
        --triples 512 --repeats 1

rank_triples (both sides, filtered, top-20 candidates, as exported) of the
first ``--triples`` training triples with a freshly initialised model of the
given kind (ranking costs the same for trained and untrained tables; float
scores rarely tie at the 20th place), once as shipped and once with every row
taking the passes over all candidates that choose among a tie at the k-th
place (the only path before). Ranks and candidates must be equal; the bench
checks it. Time it with nothing else running. Writes
bench/results/kge_rank_time.json (and .md), keyed by ``--key``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok import metrics  # noqa: E402
from kgtok.data import load_kg  # noqa: E402
from kgtok.embed import EmbedConfig, ranking  # noqa: E402
from kgtok.embed import train as embed_train  # noqa: E402


def tie_passes(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """filtered_top_k as before the one-topk path (rank_triples passes scores already without NaN)."""
    return metrics._top_k_with_ties(scores.float(), min(k, scores.shape[1]))


def rank(model, kg, triples: torch.Tensor, shipped: bool) -> tuple[float, ranking.RankedQueries]:
    saved = ranking.filtered_top_k
    if not shipped:
        ranking.filtered_top_k = tie_passes
    try:
        start = time.perf_counter()
        out = ranking.rank_triples(model, triples, kg.filter_index, reciprocal=True,
                                   num_base_relations=kg.num_relations, batch_size=512, top_k=20)
        return time.perf_counter() - start, out
    finally:
        ranking.filtered_top_k = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--key", required=True, help="the result's key (wn18rr, synthetic, ...)")
    parser.add_argument("--model", default="complex")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--triples", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    kg = load_kg(args.data)
    config = EmbedConfig(model=args.model, dim=args.dim, threads=args.threads)
    torch.set_num_threads(args.threads)
    model, _ = embed_train.build(config, kg)
    triples = kg.train[:args.triples]
    times: dict[str, list[float]] = {"shipped_s": [], "tie_passes_s": []}
    for _ in range(args.repeats):
        shipped_s, shipped = rank(model, kg, triples, True)
        before_s, before = rank(model, kg, triples, False)
        times["shipped_s"].append(round(shipped_s, 2))
        times["tie_passes_s"].append(round(before_s, 2))
    if not (np.array_equal(shipped.rank, before.rank) and np.array_equal(shipped.candidates, before.candidates)):
        raise SystemExit("the two paths disagree: ranks or candidates differ")
    best = {k: min(v) for k, v in times.items()}
    record = {"entities": kg.num_entities, "triples": args.triples, "queries": 2 * args.triples, "top_k": 20,
              "model": args.model, "dim": args.dim, **best, "all": times,
              "tie_passes_over_shipped": round(best["tie_passes_s"] / best["shipped_s"], 2), "same_output": True,
              "note": args.note, "command": command(), "machine": machine()}
    print(record, flush=True)
    write_result("kge_rank_time", args.key, record,
                 ["entities", "queries", "shipped_s", "tie_passes_s", "tie_passes_over_shipped"])


if __name__ == "__main__":
    main()
