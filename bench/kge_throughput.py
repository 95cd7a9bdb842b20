"""Stage 1 speed: training triples/s and filtered-evaluation queries/s, kgtok vs PyKEEN.

    python bench/kge_throughput.py [--dataset fb15k237] [--steps 10] [--eval-triples 2000] [--threads 2]

Same model, dims, negatives, batch and loss for both tools (self-adversarial
negative sampling, 256 uniform negatives per positive, batch 1000, dim 200,
Adam), measured in one process one after the other. PyKEEN is optional: it is
installed only for this benchmark (`pip install pykeen` next to torch 2.13);
without it only kgtok is measured. kgtok's default 1-vs-all ComplEx step and
its evaluation of the whole test split are measured as well.
Writes bench/results/kge_throughput.json (and .md), keyed by dataset.
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
from kgtok.embed import EmbedConfig, rank_triples  # noqa: E402
from kgtok.embed.train import build, training_step  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MODELS = ("rotate", "transe", "distmult", "complex")


def kgtok_training(kg, config: EmbedConfig, steps: int) -> float:
    config = config.resolved_for(kg)  # the N3 weight train_model would use
    model, optimizer = build(config, kg)
    generator = torch.Generator().manual_seed(0)
    batches = [kg.train[torch.randint(len(kg.train), (config.batch_size,), generator=generator)] for _ in range(steps + 2)]
    for step in range(2):  # warm-up
        training_step(model, optimizer, batches[step], config, step)
    start = time.perf_counter()
    for step in range(2, steps + 2):
        training_step(model, optimizer, batches[step], config, step)
    return steps * config.batch_size / (time.perf_counter() - start)


def kgtok_evaluation(kg, config: EmbedConfig, triples: torch.Tensor) -> float:
    model, _ = build(config, kg)
    rank_triples(model, triples[:64], kg.filter_index, reciprocal=config.resolved_reciprocal,
                 num_base_relations=kg.num_relations)  # warm-up
    start = time.perf_counter()
    rank_triples(model, triples, kg.filter_index, reciprocal=config.resolved_reciprocal,
                 num_base_relations=kg.num_relations, batch_size=config.eval_batch_size)
    return 2 * len(triples) / (time.perf_counter() - start)


def pykeen_measure(kg, name: str, dim: int, negatives: int, batch: int, steps: int, triples: torch.Tensor
                   ) -> tuple[float, float]:
    import pykeen.models
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.losses import NSSALoss
    from pykeen.training import SLCWATrainingLoop
    from pykeen.triples import CoreTriplesFactory

    classes = {"rotate": pykeen.models.RotatE, "transe": pykeen.models.TransE,
               "distmult": pykeen.models.DistMult, "complex": pykeen.models.ComplEx}
    kwargs = {"scoring_fct_norm": 1} if name == "transe" else {}

    def factory(mapped: torch.Tensor) -> CoreTriplesFactory:
        return CoreTriplesFactory(mapped_triples=mapped, num_entities=kg.num_entities,
                                  num_relations=kg.num_relations)

    generator = torch.Generator().manual_seed(0)
    full = factory(kg.train)
    model = classes[name](triples_factory=full, embedding_dim=dim, loss=NSSALoss(margin=9.0, adversarial_temperature=1.0),
                          random_seed=0, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(n_batches: int) -> float:
        subset = factory(kg.train[torch.randint(len(kg.train), (n_batches * batch,), generator=generator)])
        loop = SLCWATrainingLoop(model=model, triples_factory=subset, optimizer=optimizer,
                                 negative_sampler="basic", negative_sampler_kwargs={"num_negs_per_pos": negatives})
        start = time.perf_counter()
        loop.train(triples_factory=subset, num_epochs=1, batch_size=batch, use_tqdm=False)
        return time.perf_counter() - start

    train(2)  # warm-up
    train_rate = steps * batch / train(steps)
    evaluator = RankBasedEvaluator(filtered=True)
    start = time.perf_counter()
    evaluator.evaluate(model, mapped_triples=triples, additional_filter_triples=[kg.train, kg.valid, kg.test],
                       batch_size=512, use_tqdm=False)
    eval_rate = 2 * len(triples) / (time.perf_counter() - start)
    return train_rate, eval_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fb15k237")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-triples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--no-pykeen", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    kg = load_kg(DATA / args.dataset)
    try:
        if args.no_pykeen:
            raise ImportError
        import pykeen

        pykeen_version = pykeen.get_version()
    except ImportError:
        pykeen_version = None
    eval_triples = kg.test[: args.eval_triples]
    record: dict = {"command": command(), "machine": machine(), "pykeen": pykeen_version,
                    "settings": {"dim": args.dim, "negatives": args.negatives, "batch": args.batch,
                                 "steps": args.steps, "eval_triples": len(eval_triples), "threads": args.threads}}
    for name in MODELS:
        config = EmbedConfig(model=name, dim=args.dim, loss="nssa", reciprocal=False, num_negatives=args.negatives,
                             batch_size=args.batch, optimizer="adam", lr=1e-3, regularizer_weight=0.0,
                             subsampling=False, threads=args.threads)
        row = {"train_triples_per_second": kgtok_training(kg, config, args.steps),
               "eval_queries_per_second": kgtok_evaluation(kg, config, eval_triples)}
        if pykeen_version:
            train_rate, eval_rate = pykeen_measure(kg, name, args.dim, args.negatives, args.batch, args.steps,
                                                   eval_triples)
            row |= {"pykeen_train_triples_per_second": train_rate, "pykeen_eval_queries_per_second": eval_rate,
                    "train_ratio": row["train_triples_per_second"] / train_rate,
                    "eval_ratio": row["eval_queries_per_second"] / eval_rate}
        record[name] = row
        print(name, {k: round(v, 1) for k, v in row.items()}, flush=True)
    default = EmbedConfig(threads=args.threads)  # kgtok's default: ComplEx-N3, 1-vs-all, reciprocal
    record["complex_1vsall_default"] = {
        "train_triples_per_second": kgtok_training(kg, default, args.steps),
        "eval_queries_per_second": kgtok_evaluation(kg, default, kg.test),
    }
    record["complex_1vsall_default"]["full_test_eval_seconds"] = (
        2 * len(kg.test) / record["complex_1vsall_default"]["eval_queries_per_second"])
    print("complex 1vsall default", record["complex_1vsall_default"], flush=True)
    flat = {f"{m}_{k}": v for m in (*MODELS, "complex_1vsall_default") for k, v in record[m].items()}
    write_result("kge_throughput", args.dataset, record | flat,
                 [c for c in flat if c.endswith(("per_second", "ratio"))])


if __name__ == "__main__":
    main()
