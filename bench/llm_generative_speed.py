"""Stage 5c's generative ranker: one query per beam search against ``evaluate.batch_size`` queries per search
(left-padded), on one fine-tuned run; seconds, and whether the ranks agree.

    python bench/llm_generative_speed.py --run runs/bench/run-umls/llm-tiny-tiny_bench-codes \
        --data ../shared/datasets/umls --dataset umls --queries 100 --beams 10

Each size runs twice (alternating, the first pass warms up); the fusion weight is fixed (no LM-valid
scoring), so the seconds are the test queries' scoring plus the beam searches.  Writes
bench/results/llm_<dataset>_generative_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.llm.evaluate import EvaluateConfig, run_evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a variant folder with finetune/ and instruct/")
    parser.add_argument("--data", required=True, help="the KG (the generative ranker's filter)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {}
    ranks: dict[int, list] = {}
    with tempfile.TemporaryDirectory() as work:
        for size in [*args.batch_sizes, *args.batch_sizes]:
            dest = Path(work) / f"b{size}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(f"{dest}.work", ignore_errors=True)
            config = EvaluateConfig(generative_beams=args.beams, batch_size=size, fusion_weight=1.0,
                                    max_queries=args.queries, threads=args.threads)
            begin = time.perf_counter()
            run_evaluate(config, args.run / "finetune", args.run / "instruct", dest, data=args.data, progress=False,
                         log=lambda *_: None)
            seconds.setdefault(size, []).append(round(time.perf_counter() - begin, 1))
            ranks[size] = [json.loads(line)["generative_rank"] for line in (dest / "predictions.jsonl").open()]
    first = ranks[args.batch_sizes[0]]
    record = {"queries": args.queries, "beams": args.beams, "threads": args.threads,
              **{f"batch_{s}_seconds": seconds[s][-1] for s in args.batch_sizes},
              **{f"batch_{s}_seconds_first_pass": seconds[s][0] for s in args.batch_sizes},
              "same_ranks": all(ranks[s] == first for s in args.batch_sizes),
              "command": command(), "machine": machine()}
    columns = ["queries", "beams", *[f"batch_{s}_seconds" for s in args.batch_sizes], "same_ranks"]
    path = write_result(f"llm_{args.dataset}_generative_speed", args.dataset, record, columns)
    print(json.dumps(record, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
