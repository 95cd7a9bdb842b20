"""How far stage 5 is from the best possible answer on the synthetic KG.

    kgtok run --out runs/default            # or kgtok ablate --out runs/default (adds the ablations' rows)
    python bench/synthetic_ceiling.py --run-dir runs/default

The generator knows P(tail | head, relation) exactly
(:func:`kgtok.data.synthetic.true_tail_probabilities`), so ranking by it is
the ceiling of any link predictor, and re-ranking each query's stage-1 list
by it is the ceiling of any re-ranker of those lists. Writes
bench/results/llm_synthetic_ceiling.json (and .md): Hits@1 and MRR on the
run's test queries of the retriever, the two oracles, and the LM rankers of
the run (and of its ablations when present).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.config import config_from_dict  # noqa: E402
from kgtok.data.graph import load_kg  # noqa: E402
from kgtok.data.synthetic import (SyntheticConfig, oracle_ranks, true_head_probabilities,  # noqa: E402
                                  true_tail_probabilities)
from kgtok.metrics import rank_metrics, rerank_rank  # noqa: E402


def oracle_rerank(config: SyntheticConfig, kg, records: list[dict]) -> np.ndarray:
    """Ranks when each listed candidate is scored by the generator's probability (gold outside: stage-1 rank)."""
    entity = np.array([int(name[1:]) for name in kg.entity_names])
    relation = np.array([int(name[1:].split("_")[0]) for name in kg.relation_names])
    entity_id = {name: i for i, name in enumerate(kg.entity_names)}
    relation_id = {name: i for i, name in enumerate(kg.relation_names)}
    h = np.array([entity_id[r["triple"][0]] for r in records])
    rel = np.array([relation_id[r["triple"][1]] for r in records])
    t = np.array([entity_id[r["triple"][2]] for r in records])
    tail = np.array([r["direction"] == "tail" for r in records])
    p = np.zeros((len(records), kg.num_entities))
    p[tail] = true_tail_probabilities(config, entity[h[tail]], relation[rel[tail]])[:, entity]
    p[~tail] = true_head_probabilities(config, relation[rel[~tail]], entity[t[~tail]])[:, entity]
    candidates = np.array([r["candidates"] for r in records])
    gold_index = np.array([r["candidates"].index(r["gold"]) if r["gold"] in r["candidates"] else -1 for r in records])
    stage1 = np.array([r["stage1_rank"] for r in records])
    return rerank_rank(np.take_along_axis(p, candidates, 1), gold_index, stage1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/default")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    run_dir = Path(args.run_dir)
    run_config = json.loads((run_dir / "run_config.json").read_text())
    if run_config.get("data") is not None:
        raise SystemExit(f"{run_dir} is not a run on the synthetic KG")
    config = config_from_dict(SyntheticConfig, run_config["synthetic"])
    kg = load_kg(run_dir / "synthetic")
    records = [json.loads(line) for line in (run_dir / "instruct" / "test.jsonl").read_text().splitlines()]
    stage1 = np.array([r["stage1_rank"] for r in records])
    full = oracle_ranks(config, kg, "test")
    rows = {
        "retriever": rank_metrics(stage1),
        "oracle_full_ranking": rank_metrics(np.concatenate([full["head"], full["tail"]])),
        "oracle_rerank_of_list": rank_metrics(oracle_rerank(config, kg, records)),
    }
    runs = {"full": run_dir, **{p.name: p for p in sorted((run_dir / "ablate").glob("*")) if p.is_dir()}}
    for name, path in runs.items():
        metrics_path = path / "evaluate" / "metrics.json"
        if not metrics_path.exists():
            continue
        metrics = json.loads(metrics_path.read_text())
        for ranker in ("dift", "rerank", "fused_rerank"):
            if ranker in metrics:
                rows[f"{name}_{ranker}"] = metrics[ranker]["both"]
    record = {f"{name}_{key}": row[key] for name, row in rows.items() for key in ("hits_at_1", "mrr")}
    record.update(queries=len(records), gold_in_list=float(np.mean([r["gold"] in r["candidates"] for r in records])),
                  run_dir=str(run_dir), command=command(), machine=machine())
    columns = [f"{name}_hits_at_1" for name in rows] + ["retriever_mrr", "oracle_rerank_of_list_mrr"]
    path = write_result("llm_synthetic_ceiling", "synthetic", record, columns)
    for name, row in rows.items():
        print(f"{name:28s} Hits@1 {row['hits_at_1']:.3f}  MRR {row['mrr']:.3f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
