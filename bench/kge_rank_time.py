"""Stage 1's ranking time as shipped against the paths it replaced: tie-settling top-k, torch.logsumexp.

    python bench/kge_rank_time.py --data ../shared/datasets/wn18rr --key wn18rr
    python bench/kge_rank_time.py --data /tmp/keep/n1000000/kg --key synthetic --model distmult --dim 32 \
        --triples 512 --repeats 1

rank_triples (both sides, filtered, top-20 candidates, as exported) of the
first ``--triples`` training triples with a freshly initialised model of the
given kind (ranking costs the same for trained and untrained tables; float
scores rarely tie at the 20th place), once as shipped and once with every row
taking the passes over all candidates that choose among a tie at the k-th
place (the only path before), and once with the gold's probability
normalised by torch.logsumexp instead of in place. Ranks, candidates and
probabilities must be equal; the bench checks it. Time it with nothing else running. Writes
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


def torch_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """The gold's log-normaliser as before the in-place one (torch.logsumexp and its temporaries)."""
    return torch.logsumexp(scores, dim=1)


# Each timed path: the functions of kgtok.embed.ranking it replaces.
PATHS = {"shipped_s": {}, "tie_passes_s": {"filtered_top_k": tie_passes},
         "torch_logsumexp_s": {"_logsumexp_": torch_logsumexp}}


def rank(model, kg, triples: torch.Tensor, patches: dict) -> tuple[float, ranking.RankedQueries]:
    saved = {name: getattr(ranking, name) for name in patches}
    for name, function in patches.items():
        setattr(ranking, name, function)
    try:
        start = time.perf_counter()
        out = ranking.rank_triples(model, triples, kg.filter_index, reciprocal=True,
                                   num_base_relations=kg.num_relations, batch_size=512, top_k=20)
        return time.perf_counter() - start, out
    finally:
        for name, function in saved.items():
            setattr(ranking, name, function)


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
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    outputs = {}
    for _ in range(args.repeats):
        for path, patches in PATHS.items():
            seconds, outputs[path] = rank(model, kg, triples, patches)
            times[path].append(round(seconds, 2))
    shipped = outputs["shipped_s"]
    for path, out in outputs.items():
        if not (np.array_equal(shipped.rank, out.rank) and np.array_equal(shipped.candidates, out.candidates)
                and np.allclose(shipped.gold_probability, out.gold_probability, rtol=1e-4, atol=1e-12)):
            raise SystemExit(f"{path} disagrees with the shipped path: ranks, candidates or probabilities differ")
    best = {k: min(v) for k, v in times.items()}
    record = {"entities": kg.num_entities, "triples": args.triples, "queries": 2 * args.triples, "top_k": 20,
              "model": args.model, "dim": args.dim, **best, "all": times,
              "tie_passes_over_shipped": round(best["tie_passes_s"] / best["shipped_s"], 2),
              "torch_logsumexp_over_shipped": round(best["torch_logsumexp_s"] / best["shipped_s"], 2),
              "same_output": True,
              "note": args.note, "command": command(), "machine": machine()}
    print(record, flush=True)
    write_result("kge_rank_time", args.key, record,
                 ["entities", "queries", "shipped_s", "tie_passes_s", "tie_passes_over_shipped", "torch_logsumexp_s",
                  "torch_logsumexp_over_shipped"])


if __name__ == "__main__":
    main()
