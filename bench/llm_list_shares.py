"""How often stage 1's first candidate is the answer, in the lists the LM trains on and in those it is tested on.

    python bench/llm_list_shares.py --dataset umls --data ../shared/datasets/umls --run-dir runs/bench/run-umls

LM-train's lists (validation queries, filtered with train and valid: METHOD.md stage 5) keep a query's
answers held out in test, and these may stand above the gold; LM-valid's and test's lists are filtered with
every split.  Per graph: the share of queries whose gold is first in each kind of list (training queries'
too, where stage 1 exported them: it has seen those answers), and what the candidates above the gold in
LM-train's lists are (a test triple, or false; this uses the test triples, so it explains and never
chooses).  Writes bench/results/llm_list_shares.json keyed by dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.artifacts import ID_ORDER, read_id_order  # noqa: E402
from kgtok.data import load_kg  # noqa: E402
from kgtok.data.graph import _triple_keys  # noqa: E402
from kgtok.embed.layout import EmbedArtifact  # noqa: E402
from kgtok.embed.ranking import RankedQueries  # noqa: E402

SPLITS = ("train", "valid", "test")


def above_gold(ranked: RankedQueries, split_keys: dict[str, np.ndarray], entities: int,
               relations: int) -> dict[str, int]:
    """The candidates listed above the gold, counted by the split whose triple they complete (else false)."""
    candidates = ranked.candidates
    position = np.argmax(candidates == ranked.gold[:, None], axis=1)
    listed = (candidates == ranked.gold[:, None]).any(axis=1)
    above = (np.arange(candidates.shape[1])[None, :] < np.where(listed, position, candidates.shape[1])[:, None])
    triples = np.repeat(ranked.triples[:, None, :], candidates.shape[1], axis=1).copy()
    side = np.where(ranked.direction == 0, 2, 0)  # tail query: the candidate is the tail
    rows = np.arange(len(candidates))
    triples[rows[:, None], np.arange(candidates.shape[1])[None, :], side[:, None]] = candidates
    keys = _triple_keys(triples[above], entities, relations)
    counts, left = {}, np.ones(len(keys), dtype=bool)
    for split in SPLITS:
        hit = np.isin(keys, split_keys[split]) & left
        counts[split] = int(hit.sum())
        left &= ~hit
    counts["false"] = int(left.sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="its key in the result, e.g. umls, wn18rr_6k")
    parser.add_argument("--data", required=True, help="the KG directory the run was made from")
    parser.add_argument("--run-dir", required=True, help="a kgtok run directory with embed/candidates")
    args = parser.parse_args()
    kg = load_kg(args.data)
    embed = EmbedArtifact(Path(args.run_dir) / "embed")
    if read_id_order(embed.path / ID_ORDER) != kg.entity_names:
        parser.error(f"{embed.path / ID_ORDER} is not the entity order of {args.data}")
    n, m = kg.num_entities, kg.num_relations
    split_keys = {s: _triple_keys(kg.triples[s].numpy(), n, m) for s in SPLITS}
    record: dict = {"data": args.data, "run_dir": args.run_dir}
    for name, file in (("lm_train", "valid"), ("lm_valid", "valid_eval"), ("test", "test"), ("train_query", "train")):
        if not embed.candidates(file).exists():  # training queries' lists: exported on request only
            continue
        ranked = RankedQueries.load(embed.candidates(file))
        record[f"{name}_gold_first"] = float(np.mean(ranked.rank == 1))
        record[f"{name}_queries"] = len(ranked.rank)
    counts = above_gold(RankedQueries.load(embed.candidates("valid")), split_keys, n, m)
    record.update({f"lm_train_above_gold_{k}": v for k, v in counts.items()})
    record["command"] = command()
    record["machine"] = machine()
    write_result("llm_list_shares", args.dataset, record,
                 ["lm_train_gold_first", "lm_valid_gold_first", "test_gold_first", "train_query_gold_first",
                  "lm_train_queries",
                  "lm_train_above_gold_test", "lm_train_above_gold_false"])
    print({k: v for k, v in record.items() if k != "machine"})


if __name__ == "__main__":
    main()
