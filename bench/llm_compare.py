"""Stage 5: retriever vs LM re-ranker with codes, with random IDs and without IDs, on one dataset and backbone.

    python bench/llm_compare.py --dataset synthetic [--backbone tiny] [--threads 2] [finetune.key=value ...]
    python bench/llm_compare.py --dataset umls --run-dir runs/umls   # stages 0-4 from a kgtok run directory
    kgtok data subset ../shared/datasets/wn18rr runs/bench/wn18rr-6k --entities 6000   # a WN18RR subset
    python bench/llm_compare.py --dataset wn18rr --data runs/bench/wn18rr-6k --run-dir runs/bench/run-wn18rr-6k \
        --tag subset6k

Stages 0-4 come from ``kgtok.pipeline.run`` (the synthetic KG by default, or
``--data``); then, for each variant, instructions, fine-tuning and
evaluation. Variants: ``codes`` (the run's codes, GS-Quant by default),
``random_ids``, ``no_codes``, ``codes_classes`` (ReaLM's class prefix),
``realm_codes`` (ReaLM's residual k-means codes, made here from the run's
stage-1 vectors with ``quantize.variant=realm``, as many levels and codes per
level as the run's codes, plus any ``realm.key=value``),
and any ``codes_<name>``: the run's codes with the overrides given as
``--variant codes_<name>:finetune.key=value`` (e.g. the switches of issue 15), or ``random_ids_<name>``:
random IDs with their own overrides (e.g. the random-ID control of a prompt-format switch).  Writes bench/results/llm_<dataset>[_<tag>].json
and .md: Hits@1 and MRR of the retriever, the DIFT rule and the full
re-rank; training tokens/s; evaluation queries/s; seconds per stage; then the
comparison table of :mod:`kgtok.llm.compare` (every ranker of every variant
against the retriever and against no_codes: paired difference, 95% bootstrap
CI, p-value), the fusion weight each variant chose on LM-valid, and the
differences with p < 0.05.  ``--reuse VARIANT=DIR`` takes a finished variant of an earlier run
(another ``--tag``) instead of training it again, when its configs and upstream artifacts are this run's:
e.g. the no-IDs and ReaLM rows added beside earlier codes and random-ID runs for one headline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from ablation import comparison_text  # noqa: E402

from kgtok.artifacts import hash_inputs, read_manifest  # noqa: E402
from kgtok.config import config_changes, load_config  # noqa: E402
from kgtok.llm.compare import (comparison_rows, difference_lines, evaluation_ranks, headline, paired_runs,  # noqa: E402
                               significant)
from kgtok.metrics import format_difference, paired_comparison  # noqa: E402
from kgtok.llm import InstructConfig, run_instruct  # noqa: E402
from kgtok.llm.evaluate import EvaluateConfig, run_evaluate  # noqa: E402
from kgtok.llm.finetune import FinetuneConfig, run_finetune  # noqa: E402
from kgtok.llm.layout import InstructArtifact  # noqa: E402
from kgtok.pipeline import RunConfig, run  # noqa: E402
from kgtok.quantize import QuantizeConfig, run_quantize  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def class_effect(evaluate_dir: Path) -> dict:
    """ReaLM's class constraint vs the same ranker without it, in the same run (pick, re-rank): paired
    difference, CI, p."""
    _, ranks = evaluation_ranks(evaluate_dir)
    return {key: paired_comparison(ranks[f"{key}_class"], ranks[key]) for key in ("dift", "rerank")}


IDS = {"codes": "codes", "random_ids": "random", "no_codes": "none", "codes_classes": "codes", "realm_codes": "codes"}


def variant_configs(job: dict) -> tuple[InstructConfig, FinetuneConfig, EvaluateConfig, Path | None]:
    """One variant's stage-5 configs and its codes (None without IDs), from the shared and its own overrides."""
    variant, run_dir, groups, mine, t = (job[k] for k in ("variant", "run_dir", "groups", "own", "threads"))
    ids = IDS.get(variant, "random" if variant.startswith("random_ids_") else "codes")
    prefix = ["class_prefix=true"] if variant == "codes_classes" else []
    instruct = load_config(InstructConfig, None, [f"ids={ids}", *prefix, *groups["instruct"],
                                                  *mine.get("instruct", [])])
    finetune = load_config(FinetuneConfig, None, [f"backbone={job['backbone']}", f"threads={t}",
                                                  *groups["finetune"], *mine.get("finetune", [])])
    evaluate = load_config(EvaluateConfig, None, [f"threads={t}", f"max_queries={job['max_queries']}",
                                                  *groups["evaluate"], *mine.get("evaluate", [])])
    codes = None if ids == "none" else run_dir / ("quantize-realm" if variant == "realm_codes" else "quantize")
    return instruct, finetune, evaluate, codes


def run_variant(job: dict) -> dict[str, float]:
    """One variant's instructions, fine-tuning and evaluation (each stage resumes); seconds per stage.
    Module-level: ``--jobs`` runs it in other processes."""
    warnings.simplefilter("ignore")
    variant, out = job["variant"], job["out"]
    instruct, finetune, evaluate, codes = variant_configs(job)
    timings = {}
    begin = time.perf_counter()
    run_instruct(instruct, job["kg_dir"], job["run_dir"] / "embed", out / "instruct", codes=codes,
                 classes=job["classes"] if instruct.class_prefix else None, log=lambda *_: None)
    timings["instruct"] = time.perf_counter() - begin
    begin = time.perf_counter()
    run_finetune(finetune, out / "instruct", out / "finetune", codes=codes, progress=False,
                 log=lambda line: print(f"{variant}: {line}", flush=True))
    timings["finetune"] = time.perf_counter() - begin
    begin = time.perf_counter()
    run_evaluate(evaluate, out / "finetune", out / "instruct", out / "evaluate", data=job["kg_dir"], progress=False,
                 log=lambda line: print(f"{variant}: {line}", flush=True))  # the KG: the generative ranker's filter
    timings["evaluate"] = time.perf_counter() - begin
    return timings


def reused_variant(job: dict, folder: Path) -> dict[str, float]:
    """A finished variant folder of an earlier run (another ``--tag``), taken as it is when it is the run this
    command would make: the same stage-5 configs (machine fields aside) on the same stage-1 and stage-4
    artifacts; seconds per stage from its manifests."""
    configs = variant_configs(job)
    where = f"--reuse {job['variant']}={folder}"
    manifests = {}
    for stage, config in zip(("instruct", "finetune", "evaluate"), configs[:3]):
        manifest = read_manifest(folder / stage)
        if manifest is None:  # written last: a stage killed half-way has none
            raise SystemExit(f"{where}: no finished {stage} in {folder / stage}")
        changed = sorted(sum(config_changes(manifest["config"], config), []))  # machine fields aside
        if changed:
            raise SystemExit(f"{where}: its {stage} config differs from this run's in {', '.join(changed)}")
        manifests[stage] = manifest
    upstream = hash_inputs({"embeddings": job["run_dir"] / "embed",
                            **({"codes": configs[3]} if configs[3] is not None else {})})
    made_on = {k: manifests["instruct"]["inputs"].get(k) for k in upstream}
    if made_on != upstream:
        raise SystemExit(f"{where}: made from other stage-1 or stage-4 artifacts than {job['run_dir']}'s")
    return {stage: manifest.get("timings", {}).get("total", 0.0) for stage, manifest in manifests.items()}


def run_headline(runs: dict[str, Path]) -> dict | None:
    """Issue 15's headline of the variants by their names (``no_codes``, ``random_ids``, ``realm_codes``, the
    GS-Quant runs ``codes`` and ``codes_<name>``, each ``codes_<name>`` with its ``random_ids_<name>`` twin as its
    control when there is one); None when a run lacks LM-valid metrics or no GS-Quant run is there."""
    gsquant = [v for v in runs if v == "codes" or (v.startswith("codes_") and v != "codes_classes")]
    if not gsquant or not all("valid_rankers" in json.loads((Path(p) / "metrics.json").read_text()).get("fusion", {})
                              for p in runs.values()):
        return None
    twins = {v: "random_ids_" + v.removeprefix("codes_") for v in gsquant if v != "codes"}
    return headline(runs, gsquant, no_ids="no_codes" if "no_codes" in runs else None,
                    random_ids="random_ids" if "random_ids" in runs else None,
                    realm="realm_codes" if "realm_codes" in runs else None,
                    controls={v: twin for v, twin in twins.items() if twin in runs})


def gsquant_vs_realm(runs: dict[str, Path]) -> dict:
    """GS-Quant vs ReaLM codes, reported either way: ``{"gsquant_vs_realm": ...}`` when both runs are there."""
    if "codes" not in runs or "realm_codes" not in runs:
        return {}
    return {"gsquant_vs_realm": paired_runs(runs["codes"], runs["realm_codes"],
                                            ("dift", "rerank", "fused_pick", "fused_rerank"))}


def result_text(rows: list[dict], fusion: dict, record: dict) -> str:
    """The markdown after the metric table (``fusion``: per variant, in table order): the comparisons, GS-Quant
    minus ReaLM and the class constraint's effect where the record has them."""
    text = comparison_text(rows, fusion, record)
    if "gsquant_vs_realm" in record:
        text += ("\nGS-Quant codes minus ReaLM codes (same test queries):\n"
                 + difference_lines(record["gsquant_vs_realm"]))
    for v in fusion:
        if f"{v}_class_accuracy" in record:
            effect = record[f"{v}_class_constraint_vs_without"]
            text += f"\n{v}: class accuracy {record[f'{v}_class_accuracy']:.3f} (LM's predicted class = gold's)\n"
            for key, name in (("dift", "LM pick"), ("rerank", "LM re-rank")):
                text += (f"- {name} with the class constraint minus without: Hits@1 "
                         f"{format_difference(effect[key]['hits_at_1'])}, MRR {format_difference(effect[key]['mrr'])}\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="synthetic, or a folder name under ../shared/datasets")
    parser.add_argument("--data", default=None, help="KG directory (default: by --dataset)")
    parser.add_argument("--run-dir", default=None, help="run directory for stages 0-4 (default runs/bench/run-<dataset>)")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="codes,random_ids,no_codes",
                        help="of codes, random_ids, no_codes, codes_classes (ReaLM's class prefix; needs --classes), "
                             "realm_codes, codes_<name>, random_ids_<name>")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:GROUP.KEY=VALUE",
                        help="an override of one variant only (instruct., finetune., evaluate.), e.g. "
                             "codes_names:finetune.embedding_init=names; repeat for more")
    parser.add_argument("--classes", default=None,
                        help="entity<TAB>class file for codes_classes, or 'types': the synthetic KG's level-0 types")
    parser.add_argument("--max-queries", type=int, default=0, help="evaluate only the first n test queries")
    parser.add_argument("--tag", default="")
    parser.add_argument("--upstream-only", action="store_true",
                        help="stop after stages 0-4 (and ReaLM's codes): e.g. on the CPU before a GPU run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants at once, each in its own process with --threads threads (e.g. on a GPU)")
    parser.add_argument("--skip-upstream", action="store_true",
                        help="use the run folder's stage-1 and stage-4 artifacts as they are, without checking "
                             "stages 0-4 (a run carried to a machine without the sentence encoder)")
    parser.add_argument("--reuse", action="append", default=[], metavar="VARIANT=DIR",
                        help="take a finished variant folder of an earlier run (e.g. another --tag) instead of "
                             "training it again; refused unless its configs and upstream artifacts are this run's")
    parser.add_argument("--note", default="", help="recorded with the result (e.g. whether the machine was shared)")
    parser.add_argument("overrides", nargs="*", help="run.*, instruct.*, finetune.*, evaluate.*, realm.* = value")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    groups: dict[str, list[str]] = {"run": [], "instruct": [], "finetune": [], "evaluate": [], "realm": []}
    for item in args.overrides:
        group, _, rest = item.partition(".")
        if group not in groups:
            raise SystemExit(f"override {item!r}: expected run./instruct./finetune./evaluate./realm. prefix")
        groups[group].append(rest)
    own: dict[str, dict[str, list[str]]] = {}  # variant -> group -> its own overrides
    for item in args.variant:
        name, _, rest = item.partition(":")
        group, _, value = rest.partition(".")
        if group not in ("instruct", "finetune", "evaluate") or not value:
            raise SystemExit(f"--variant {item!r}: expected NAME:instruct./finetune./evaluate.KEY=VALUE")
        own.setdefault(name, {}).setdefault(group, []).append(value)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in IDS and not v.startswith(("codes_", "random_ids_"))] + \
        [v for v in own if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: of {', '.join(IDS)}, codes_<name> or "
                         "random_ids_<name> in --variants")
    data = None if args.dataset == "synthetic" and args.data is None else str(args.data or DATA / args.dataset)
    run_dir = Path(args.run_dir or f"runs/bench/run-{args.dataset}")
    t = args.threads
    run_config = load_config(RunConfig, None, [f"out={run_dir}", f"embed.threads={t}", f"text.threads={t}",
                                               f"hierarchy.threads={t}", f"quantize.threads={t}", "progress=false",
                                               *([f"data={data}"] if data else []), *groups["run"]])
    start = time.perf_counter()
    if not args.skip_upstream:
        run(run_config, until="quantize", log=lambda *_: None)  # stage 5 runs below, once per variant
    elif not (run_dir / "quantize" / "manifest.json").exists() or not (data or args.dataset == "synthetic"):
        raise SystemExit(f"--skip-upstream: no stage-4 artifact in {run_dir / 'quantize'}, or no --data")
    upstream_seconds = time.perf_counter() - start
    # The KG given, else the one stage 0 read (synthetic): a run folder carried to another machine keeps working.
    kg_dir = data or json.loads((run_dir / "data" / "manifest.json").read_text())["metrics"]["kg_dir"]
    record: dict = {"backbone": args.backbone, "data": kg_dir, "upstream_seconds": round(upstream_seconds, 1)}
    classes = None
    if args.classes == "types":  # the generator's true types (level 0) as the classes
        from kgtok.data import load_kg

        kg = load_kg(kg_dir)
        classes = run_dir / "classes_types.tsv"
        classes.write_text("".join(f"{name}\t{kg.entity_types[i, 0]}\n" for i, name in enumerate(kg.entity_names)))
    elif args.classes:
        classes = Path(args.classes)
    reused = {}
    for item in args.reuse:
        name, _, folder = item.partition("=")
        if name not in variants or not folder:
            raise SystemExit(f"--reuse {item!r}: expected VARIANT=DIR with VARIANT in --variants")
        reused[name] = Path(folder)

    def variant_dir(variant: str) -> Path:  # one folder per variant under the run, e.g. llm-tiny-t-codes
        return reused.get(variant) or \
            run_dir / f"llm-{args.backbone.replace('/', '_')}{args.tag and '-' + args.tag}-{variant}"

    if "realm_codes" in variants:  # ReaLM's codes of the same stage-1 vectors
        # At the run's code shape unless realm.* says otherwise: ReaLM's own 32 levels would put ~700 code tokens
        # in a 20-candidate prompt (over max_length), and the rows would differ in length, not only in content.
        shape = json.loads((run_dir / "quantize" / "manifest.json").read_text())["metrics"]
        realm = load_config(QuantizeConfig, None, ["variant=realm", f"threads={t}", f"levels={shape['levels']}",
                                                   f"codebook_size={shape['codebook_size']}", *groups["realm"]])
        run_quantize(realm, kg_dir, run_dir / "quantize-realm", embeddings=run_dir / "embed", progress=False,
                     log=lambda *_: None)
    if args.upstream_only:
        print(f"stages 0-4 done in {run_dir} ({upstream_seconds:.0f} s)")
        return
    if "codes_classes" in variants and classes is None:
        raise SystemExit("variant codes_classes needs --classes")
    jobs = [{"variant": v, "out": variant_dir(v), "run_dir": run_dir, "kg_dir": kg_dir, "classes": classes,
             "backbone": args.backbone, "threads": t, "max_queries": args.max_queries, "groups": groups,
             "own": own.get(v, {})} for v in variants]
    timed = {job["variant"]: reused_variant(job, job["out"]) for job in jobs if job["variant"] in reused}
    jobs = [job for job in jobs if job["variant"] not in reused]
    if args.jobs > 1:  # variants at once, each in its own process (e.g. several small LMs on one GPU)
        if args.backbone == "smollm2-135m":
            from kgtok.llm.backbone import convert_smollm2

            convert_smollm2()  # once, before the processes that read it
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            timed.update(zip([job["variant"] for job in jobs], pool.map(run_variant, jobs)))
    else:
        timed.update({job["variant"]: run_variant(job) for job in jobs})
    for variant in variants:
        out, mine, timings = variant_dir(variant), own.get(variant, {}), timed[variant]
        metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
        trained = json.loads((out / "finetune" / "metrics.json").read_text())
        if "retriever_mrr" not in record:
            record.update(retriever_mrr=metrics["retriever_mrr"], retriever_hits_at_1=metrics["retriever_hits_at_1"],
                          gold_in_candidates=metrics["gold_in_candidates"], queries=metrics["queries"],
                          # all the graph's test queries: "queries" is all of them unless --max-queries cut it
                          test_queries=sum(1 for _ in InstructArtifact(out / "instruct").split("test").open()))
        record.update({
            f"{variant}_dift_mrr": metrics["dift_mrr"], f"{variant}_dift_hits_at_1": metrics["dift_hits_at_1"],
            f"{variant}_rerank_mrr": metrics["rerank_mrr"], f"{variant}_rerank_hits_at_1": metrics["rerank_hits_at_1"],
            **{f"{variant}_{ranker}_{m}": metrics[f"{ranker}_{m}"] for ranker in ("fused_pick", "fused_rerank")
               for m in ("mrr", "hits_at_1") if f"{ranker}_{m}" in metrics},
            **{f"{variant}_generative_{m}": metrics[f"generative_{m}"]  # evaluate.generative_beams > 0
               for m in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10") if f"generative_{m}" in metrics},
            f"{variant}_fusion_weight": metrics.get("fusion_weight"),
            f"{variant}_fusion": {k: metrics.get("fusion", {}).get(k) for k in ("weight", "position", "chosen_on",
                                                                                 "grid")},
            f"{variant}_prompts_trimmed": metrics.get("prompts_trimmed"),
            **({f"{variant}_class_accuracy": metrics["class_accuracy"],
                f"{variant}_dift_class_hits_at_1": metrics["dift_class_hits_at_1"],
                f"{variant}_class_constraint_vs_without": class_effect(out / "evaluate")} if "class_accuracy" in metrics
               else {}),
            f"{variant}_train_tokens_per_second": trained["train_tokens_per_second"],
            f"{variant}_queries_per_second": metrics["queries_per_second"],
            f"{variant}_lm_train_examples": trained["train_examples"], f"{variant}_steps": trained["steps"],
            f"{variant}_valid_loss": trained["valid_loss"],
            f"{variant}_valid_code_token_loss": trained.get("valid_code_token_loss"),
            f"{variant}_valid_code_token_loss_by_level": trained.get("valid_code_token_loss_by_level"),
            # Issue 15 item 3: has the code tokens' LM-valid loss (in all, per level) stopped falling?
            f"{variant}_valid_curve": [
                {k: v for k, v in h.items() if k in ("step", "epoch", "eval_loss")
                 or k.startswith("eval_code_token_loss")}
                for h in trained.get("history", []) if "eval_loss" in h],
            f"{variant}_overrides": mine,
            **({f"{variant}_reused_from": str(out)} if variant in reused else {}),
            f"{variant}_seconds": {k: round(v, 1) for k, v in timings.items()},
        })
        print(f"{variant}: DIFT Hits@1 {metrics['dift_hits_at_1']:.3f}, re-rank Hits@1 "
              f"{metrics['rerank_hits_at_1']:.3f}, fused re-rank {metrics.get('fused_rerank_hits_at_1', float('nan')):.3f}"
              f" (w {metrics.get('fusion_weight')}; retriever {metrics['retriever_hits_at_1']:.3f})", flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    runs = {v: variant_dir(v) / "evaluate" for v in variants}
    rows = comparison_rows(runs, "no_codes" if "no_codes" in runs else None,
                           random_ids="random_ids" if "random_ids" in runs else None)
    record.update(comparisons=rows, significant=significant(rows), note=args.note)
    found = run_headline(runs)
    if found is not None:
        record["headline"] = found
    record.update(gsquant_vs_realm(runs))
    record.update(command=command(), machine=machine(), threads=t)
    columns = ["backbone", "retriever_hits_at_1", *[f"{v}_{m}" for v in variants
                                                    for m in ("dift_hits_at_1", "rerank_hits_at_1",
                                                              "fused_rerank_hits_at_1")],
               "retriever_mrr", *[f"{v}_rerank_mrr" for v in variants], "seconds"]
    name = f"llm_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    path = write_result(name, args.dataset, record, columns)
    text = result_text(rows, {v: record[f"{v}_fusion"] for v in variants}, record)
    with path.with_suffix(".md").open("a") as handle:
        handle.write(text)
    print(text)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
