"""Stage 2 in bf16 against fp32: how close the vectors are, and how much faster, on this machine.

    python bench/text_precision.py --dataset fb15k237 [--sample 4000] [--threads 2]

Encodes a sample of the graph's distinct entity texts (labels and descriptions,
as ``mode=separate`` does; seed 0) with the stage's own encoder in both
precisions, block by block in turn (fp32 then bf16 on each eighth of the
sample), so the speed ratio holds under a load that the absolute times do
not.  Records the per-text cosine between the two (min, 1st percentile,
mean), the nearest-neighbour agreement within the sample (top-1 and the mean
overlap of the 10 nearest, fp32 against bf16, the first 1,000 texts as
queries), texts/s in each, and what ``precision: auto`` chooses here
(``kgtok.text.encode.encoding_precision``).  Writes
bench/results/hierarchy_text_precision.json (and .md), keyed by dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.data.graph import load_kg  # noqa: E402
from kgtok.runtime import torch_threads  # noqa: E402
from kgtok.text import TextConfig  # noqa: E402
from kgtok.text.encode import (  # noqa: E402
    _encode_unique, check_model, encoding_precision, entity_texts, load_encoder, model_identity)

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
COLUMNS = ["texts", "cosine_min", "cosine_mean", "top1_agreement", "top10_overlap", "fp32_texts_per_second",
           "bf16_texts_per_second", "speedup", "auto_choice"]


def neighbours(vectors: np.ndarray, queries: int, k: int) -> np.ndarray:
    """(queries, k) indices of each of the first ``queries`` rows' nearest other rows by cosine."""
    scores = vectors[:queries] @ vectors.T  # (queries, n): unit rows
    scores[np.arange(queries), np.arange(queries)] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", default=None, help="KG directory (default ../shared/datasets/<dataset>)")
    parser.add_argument("--sample", type=int, default=4000, help="distinct texts encoded (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    kg = load_kg(Path(args.data) if args.data else DATA / args.dataset)
    texts = entity_texts(kg)
    unique = np.unique(np.asarray(texts.labels + texts.descriptions, dtype=object))
    if args.sample and args.sample < len(unique):
        unique = np.random.default_rng(0).choice(unique, args.sample, replace=False)
    unique = unique.tolist()
    config = TextConfig(threads=args.threads)
    model_dir = check_model(config)
    seconds = {"fp32": 0.0, "bf16": 0.0}
    vectors: dict[str, list[np.ndarray]] = {"fp32": [], "bf16": []}
    with torch_threads(args.threads):
        model = load_encoder(model_dir, config)
        auto, timings = encoding_precision(config, model_identity(model_dir), lambda: model)
        for block in np.array_split(np.arange(len(unique)), 8):
            part = [unique[i] for i in block]
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                vectors[precision].append(_encode_unique(model, part, config, progress=False,
                                                         precision=precision)[0])
                seconds[precision] += time.perf_counter() - start
    fp32, bf16 = (np.concatenate(vectors[p]) for p in ("fp32", "bf16"))
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    queries = min(1000, len(unique) - 1)
    near32, near16 = neighbours(fp32, queries, 10), neighbours(bf16, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(near32, near16)])
    record = {
        "texts": len(unique), "cosine_min": round(float(cosine.min()), 6),
        "cosine_p01": round(float(np.percentile(cosine, 1)), 6), "cosine_mean": round(float(cosine.mean()), 6),
        "max_abs_difference": round(float(np.abs(fp32 - bf16).max()), 5),
        "top1_agreement": round(float((near32[:, 0] == near16[:, 0]).mean()), 4),
        "top10_overlap": round(float(overlap), 4), "neighbour_queries": queries,
        "fp32_seconds": round(seconds["fp32"], 2), "bf16_seconds": round(seconds["bf16"], 2),
        "fp32_texts_per_second": round(len(unique) / seconds["fp32"], 1),
        "bf16_texts_per_second": round(len(unique) / seconds["bf16"], 1),
        "speedup": round(seconds["fp32"] / seconds["bf16"], 2),
        "auto_choice": auto, "auto_batch_ms": timings, "threads": args.threads, "note": args.note,
        "command": command(), "machine": machine(),
    }
    path = write_result("hierarchy_text_precision", args.dataset, record, COLUMNS)
    print(f"{args.dataset}: {len(unique)} texts; cosine min {record['cosine_min']} mean {record['cosine_mean']}; "
          f"top-1 agreement {record['top1_agreement']}, top-10 overlap {record['top10_overlap']}; "
          f"bf16 {record['speedup']}x ({auto} chosen) -> {path}")


if __name__ == "__main__":
    main()
