"""Stage 5c: the fine-tuned LM picks and re-ranks each query's stage-1 candidates.

The recipe, one module each:

1. score every candidate answer of every query (:mod:`kgtok.llm.scoring`:
   one forward pass per batch with a shared prompt cache, or vLLM; a killed
   run resumes from the queries already scored);
2. store per query what the LM chose: the constrained-generation pick
   (:mod:`kgtok.llm.decoding`), the sequence scores, the fused scores with the
   stage-1 prior, the class-constrained pick (:func:`kgtok.llm.rankers.prediction_row`);
3. rank the gold with every registered ranker and compute the metrics
   (:mod:`kgtok.llm.rankers`), then write the artifact.

The fusion weight (``fusion_weight: null``) is chosen first, on LM-valid,
and kept in ``<dest>.work/fusion.json`` so a resumed run does not score
LM-valid again.  ReaLM's class constraint: instructions written with
``class_prefix`` make the LM generate the target's class token before the
entity; the predicted class is the candidates' class whose token the LM finds
likeliest, and a pick outside it is replaced by the best candidate of that
class (``class_pick``; ``class_accuracy`` in the metrics).  Without class
prefixes, ``class_constraint`` takes the class with the most candidate mass
instead (classes from a file of entity<TAB>class or a stage-3 artifact).  Triple-classification
instructions are answered by comparing " true" with " false".

Generative retrieval (``generative_beams`` > 0): the LM also writes each
query's answer by beam search under a prefix trie of every entity's answer
(the instructions' ``entities.jsonl``: ids codes or random), not only the
listed candidates; the gold's filtered position in the beam (other true
answers of train ∪ valid ∪ test removed, from the KG: ``--data``) is the
``generative`` ranker's rank, none there an infinite one (reciprocal rank 0).

Artifact (``dest``): ``predictions.jsonl``, ``metrics.json`` (every ranker:
both/head/tail and per relation; queries/s; the fusion weight) and
``manifest.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kgtok.artifacts import warn_if_made_from_another, write_json_atomic
from kgtok.llm.classes import load_classes  # here too: kgtok.llm.evaluate.load_classes is public
from kgtok.llm.config import EvaluateConfig  # here too: kgtok.llm.evaluate.EvaluateConfig is public
from kgtok.llm.layout import EvaluateArtifact, FinetuneArtifact, InstructArtifact
from kgtok.llm.prompts import read_jsonl, write_jsonl
from kgtok.llm.rankers import summary_keys
from kgtok.stage import Context, Input, Stage, run_stage


FEW_VALID_QUERIES = 50  # below this many LM-valid queries a chosen fusion weight is said to be unreliable


def run(config: EvaluateConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Stage 5c into ``dest``; scored queries (and the chosen fusion weight) kept in ``ctx.work``."""
    from kgtok.llm.console import quiet_libraries
    from kgtok.llm.scoring import CandidateScorer
    from kgtok.runtime import precision_line

    hf_dir = model_folder(inputs["model"])
    warn_if_made_from_another(inputs["model"], "instructions", inputs["instructions"])
    path = InstructArtifact(inputs["instructions"]).split(config.split)
    records = read_jsonl(path)[: config.max_queries or None]
    if not records:
        raise ValueError(f"{path}: no records")
    if config.generative_beams:  # checked before any scoring (LM-valid's fusion weight comes first)
        check_generative_inputs(InstructArtifact(inputs["instructions"]), records, ctx)
    entity_classes = None
    if config.class_constraint:
        if "classes" not in inputs:
            raise ValueError("class_constraint needs --classes (a file of entity<TAB>class or a stage-3 artifact)")
        names = ctx.kg.entity_names if ctx.has_kg else []  # a stage-3 folder's order is checked
        entity_classes = np.asarray(load_classes(inputs["classes"], names))
    with quiet_libraries():
        scorer = CandidateScorer(hf_dir, config, ctx.progress, saved=ctx.work / "precision.json")
        if scorer.precision_ms:
            ctx.log(precision_line("evaluate", scorer.precision, scorer.precision_ms, "a scoring pass"))
        if records[0].get("task") == "classification":
            return _evaluate_classification(config, scorer, records, InstructArtifact(inputs["instructions"]),
                                            dest, ctx)
        return _evaluate_ranking(config, scorer, records, InstructArtifact(inputs["instructions"]), dest,
                                 entity_classes, ctx)


def model_folder(model: Path) -> Path:
    """The Hugging Face folder of ``--model``: a stage-5b artifact's ``model/``, or ``model`` itself.

    Anything else is refused here in one line; transformers' own message
    would name neither the flag nor what it expects.
    """
    for folder in (FinetuneArtifact(model).model, model):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"--model {model}: neither a stage-5b (finetune) artifact (no model/config.json) nor a "
                     "Hugging Face model folder (no config.json); give the --out folder of kgtok finetune, or a "
                     "folder written by save_pretrained")


STAGE = Stage(
    name="evaluate", title="stage 5c: evaluation", config=EvaluateConfig, run=run, uses_kg=False,
    reads_kg=lambda config: config.class_constraint or config.generative_beams > 0,
    inputs=(Input("model", "finetune", None, "a stage-5b artifact or a Hugging Face model directory"),
            Input("instructions", "instruct", InstructArtifact, "a stage-5a directory"),
            Input("classes", "hierarchy", None, "a file of entity<TAB>class or a stage-3 artifact "
                  "(for class_constraint=true)")),
    needs=lambda config: ("model", "instructions"),
    summary=(*summary_keys(("hits_at_1", "mrr")), "queries_per_second"),  # every registered ranker
)


def run_evaluate(
    config: EvaluateConfig,
    model_dir: str | Path,
    instructions: str | Path,
    dest: str | Path,
    *,
    classes: str | Path | None = None,
    data: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Stage 5c into ``dest`` (reused when current, unless ``force``).  ``model_dir``: a stage-5b artifact or any HF
    directory; ``data``: the KG, to read a ``classes`` file's entity names."""
    return run_stage(STAGE, config, dest, data=data, progress=progress, log=log,
                     inputs={"model": model_dir, "instructions": instructions, "classes": classes},
                     reuse=not force).path


def _evaluate_ranking(config: EvaluateConfig, scorer: Any, records: list[dict[str, Any]],
                      instructions: InstructArtifact, dest: Path, classes: np.ndarray | None,
                      ctx: Context) -> dict[str, Any]:
    """Link prediction: score (resumably), store the LM's choices, rank with every ranker, write."""
    from kgtok.llm.rankers import MEASURES, prediction_row, rank_all, ranking_metrics
    from kgtok.llm.scoring import PartialPredictions
    from kgtok.runtime import Heartbeat

    fusable = all(r.get("candidate_scores") is not None for r in records)
    fusion = _fusion_weight(config, scorer, fusable, instructions.split("lm_valid"), ctx.work / "fusion.json",
                            ctx.log)
    weight = fusion["weight"]
    partial = PartialPredictions(ctx.work / "predictions.partial.jsonl")
    todo = [r for r in records if r["id"] not in partial.rows]
    if len(todo) < len(records):  # rows of queries this run does not have (another max_queries) do not count
        ctx.log(f"evaluate: {len(records) - len(todo)} of {len(records)} queries already scored in {partial.path}; "
                "resuming")
    generative = _generative_retriever(config, scorer, records, instructions, ctx) if config.generative_beams \
        else None
    start = time.perf_counter()
    beat = Heartbeat(None if ctx.progress else ctx.log)
    with partial.appending() as add:
        scored = scorer.score(todo, "evaluate")
        while batch := list(itertools.islice(scored, config.batch_size)):  # the generative ranker runs by batch
            rows = [prediction_row(query.record, query.answers, query.token_logprobs, scorer.pick(query),
                                   score=config.score, fusion_weight=weight if fusable else 0.0, classes=classes,
                                   class_scores=scorer.class_scores(query)) for query in batch]
            for row, found in zip(rows, generative(batch) if generative is not None else [{}] * len(rows)):
                add({**row, **found, "prompt_budget": scorer.budget_of.get(row["id"])})
            beat(lambda: f"evaluate: {len(partial.rows)} of {len(records)} queries scored "
                         f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    ctx.timings["evaluate"] = seconds
    predictions = [partial.rows[r["id"]] for r in records]
    # Counted over every query, those a killed run scored too (rows written before this key: not counted).
    budget = {key: sum(p.get("prompt_budget") == key for p in predictions) for key in ("trimmed", "over")}
    ranks = rank_all(predictions)
    metrics, per_relation = ranking_metrics(predictions, ranks)
    for p, d, r in zip(predictions, ranks["dift"], ranks["rerank"]):
        p["dift_rank"], p["rerank_rank"] = float(d), float(r)
    summary = {
        "queries": len(predictions), "seconds": seconds,
        "queries_per_second": len(todo) / max(seconds, 1e-9) if todo else math.nan,  # nan: all scored before
        "resumed_queries": len(records) - len(todo), "precision": scorer.precision,
        **({"precision_forward_ms": scorer.precision_ms} if scorer.precision_ms else {}),
        "gold_in_candidates": float(np.mean([p["gold_index"] >= 0 for p in predictions])), "fusion_weight": weight,
        **({"class_accuracy": float(np.mean([p["predicted_class"] == p["gold_class"] for p in predictions]))}
           if all("predicted_class" in p for p in predictions) else {}),
        "fusion_position": fusion.get("position", "configured"), "fusion_chosen_on": fusion.get(
            "chosen_on", "configured"),
        "prompts_trimmed": budget["trimmed"], "prompts_over": budget["over"],
        **{f"{key}_{measure}": metrics[key]["both"][measure] for key in ranks for measure in MEASURES},
    }
    _write_evaluation(dest, predictions, {**summary, **metrics, "per_relation": per_relation, "fusion": fusion})
    if budget["trimmed"] or budget["over"]:
        ctx.log(f"evaluate: {budget['trimmed']} of {len(predictions)} prompts trimmed to max_prompt_tokens="
                f"{config.max_prompt_tokens} (facts, then description); {budget['over']} over it with "
                "query and list alone")
    ctx.log(f"evaluate: {len(predictions)} queries, {summary['queries_per_second']:.1f} queries/s; Hits@1 "
            f"retriever {summary['retriever_hits_at_1']:.3f}, DIFT rule {summary['dift_hits_at_1']:.3f}, "
            f"re-rank {summary['rerank_hits_at_1']:.3f}"
            + (f", generative {summary['generative_hits_at_1']:.3f}" if "generative" in ranks else ""))
    return summary


def _generative_retriever(config: EvaluateConfig, scorer: Any, records: list[dict[str, Any]],
                          instructions: InstructArtifact, ctx: Context) -> Callable[[list[Any]], list[dict[str, Any]]]:
    """``queries -> [{"generative": entities, "generative_rank": filtered position or None}]`` per query
    (``generative_beams``; one batched beam search per call).

    The trie holds every entity's answer as the prompts write it (``entities.jsonl``), tokenised as the
    candidates are; the filter is the KG's train ∪ valid ∪ test answers of the query, the gold excepted.
    """
    from kgtok.llm.decoding import PrefixTrie, beam_entities, filtered_position
    from kgtok.llm.prompts import encode_answers

    kg = ctx.kg
    relation = kg.relation_to_id
    entities = read_jsonl(instructions.entities)
    trie = PrefixTrie(encode_answers(scorer.tokenizer, [e["answer"] for e in entities]))
    length_penalty = 1.0 if config.score == "mean" else 0.0  # beam scores are sums: constrained as sum
    eos = scorer.tokenizer.eos_token_id

    def ranked(record: dict[str, Any], found: list[int]) -> dict[str, Any]:
        r = relation[record["triple"][1]]
        known = (kg.filter_index.true_tails(record["known"], r) if record["direction"] == "tail"
                 else kg.filter_index.true_heads(r, record["known"]))
        rank = filtered_position(found, record["gold"], set(np.asarray(known).tolist()) - {record["gold"]})
        return {"generative": found, "generative_rank": None if np.isinf(rank) else rank}

    def generate(queries: list[Any]) -> list[dict[str, Any]]:  # generate() runs without gradients itself
        found = beam_entities(scorer.model, [q.prompt for q in queries], trie, config.generative_beams,
                              scorer.pad_id, eos, length_penalty)
        return [ranked(q.record, entities) for q, entities in zip(queries, found)]

    return generate


def _fusion_weight(config: EvaluateConfig, scorer: Any, fusable: bool, valid_path: Path, saved_path: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """``{"weight": w, ...}``: the configured weight, or the one chosen on LM-valid (1 when that cannot be done).

    A chosen weight is kept in the work folder (``saved_path``): a resumed evaluation does not score LM-valid
    again.
    """
    from kgtok.llm.rankers import (choose_fusion_weight, gold_position, log_prior, prediction_row, rank_all,
                                   sequence_scores)

    if config.fusion_weight is not None:
        return {"weight": config.fusion_weight, "position": "configured", "chosen_on": "configured"}
    if saved_path.exists():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        log(f"evaluate: fusion weight {saved['weight']} (chosen on LM-valid before the interruption)")
        return saved
    # LM-valid evaluated itself cannot choose its weight without choosing on the queries it reports
    position = "default (LM-valid is the evaluated split)" if config.split == "lm_valid" else \
        "default (no LM-valid lists)"
    fusion: dict[str, Any] = {"weight": 1.0, "position": position, "chosen_on": "none"}
    valid = ([r for r in read_jsonl(valid_path) if r.get("candidate_scores") is not None]
             if fusable and config.split != "lm_valid" and valid_path.exists() else [])
    if valid:
        scored = list(scorer.score(valid, "fusion weight"))
        fusion = choose_fusion_weight([sequence_scores(q.token_logprobs, q.answers, config.score) for q in scored],
                                      [log_prior(r["candidate_scores"]) for r in valid],
                                      np.array([gold_position(r) for r in valid]),
                                      np.array([r["stage1_rank"] for r in valid]))
        fusion["chosen_on"] = f"LM-valid ({len(valid)} queries)"
        if len(valid) < FEW_VALID_QUERIES:
            log(f"evaluate: warning: the fusion weight was chosen on {len(valid)} LM-valid queries only; it may not "
                "transfer to test (raise instruct.lm_valid_fraction, or set fusion_weight)")
        # Every ranker on the same LM-valid queries: a benchmark that reports "the best ranker" chooses it here,
        # never on test (bench/llm_summary.py).
        rows = [prediction_row(q.record, q.answers, q.token_logprobs, scorer.pick(q), score=config.score,
                               fusion_weight=fusion["weight"], classes=None, class_scores=scorer.class_scores(q))
                for q in scored]
        # unrounded: a best ranker is chosen from these (valid_choice), and rounding could make ties
        fusion["valid_rankers"] = {key: {"hits_at_1": float(np.mean(r <= 1)), "mrr": float(np.mean(1.0 / r))}
                                   for key, r in rank_all(rows).items()}
        log(f"evaluate: fusion weight {fusion['weight']} ({fusion['position']}; fused re-rank MRR on {len(valid)} "
            f"LM-valid queries: {fusion['valid_mrr']})")
    write_json_atomic(saved_path, fusion)
    return fusion


def check_generative_inputs(instructions: InstructArtifact, records: list[dict[str, Any]], ctx: Context) -> None:
    """What the generative ranker reads besides the scored records: every entity's answer and the KG."""
    if not instructions.entities.exists():
        raise ValueError(f"generative_beams needs every entity's ids: {instructions.entities} not found (instruct "
                         "writes it with ids=codes or random; run instruct again)")
    if any("gold_class" in r for r in records):
        raise ValueError("generative_beams: instructions with class_prefix are not supported (answers start with "
                         "a class token the entity trie does not hold)")
    if not ctx.has_kg:
        raise ValueError("generative_beams needs --data (the KG): the filtered rank removes the query's other "
                         "known answers")


def _margins(scorer: Any, records: list[dict[str, Any]], desc: str) -> list[float]:
    """log p(" true") - log p(" false") per record."""
    return [float(query.totals[0] - query.totals[1])
            for query in scorer.score(records, desc, answers_of=lambda _: ["true", "false"])]


def _evaluate_classification(config: EvaluateConfig, scorer: Any, records: list[dict[str, Any]],
                             instructions: InstructArtifact, dest: Path, ctx: Context) -> dict[str, Any]:
    """Triple classification: "true" when log p(" true") - log p(" false") exceeds the threshold, which is
    configured or chosen on LM-valid (kept in the work folder, never chosen on the evaluated triples)."""
    from kgtok.llm.classify import best_threshold, classification_metrics

    threshold = {"threshold": config.threshold, "chosen_on": "configured"} if config.threshold is not None \
        else None
    saved = ctx.work / "threshold.json"
    if threshold is None and saved.exists():
        threshold = json.loads(saved.read_text(encoding="utf-8"))
    valid_path = instructions.split("lm_valid")
    if threshold is None:
        threshold = {"threshold": 0.0, "chosen_on": "none (no LM-valid records)"}
        valid = read_jsonl(valid_path) if config.split != "lm_valid" and valid_path.exists() else []
        if valid:
            margins = _margins(scorer, valid, "threshold")
            threshold = {"threshold": best_threshold(np.array(margins), np.array([r["label"] for r in valid])),
                         "chosen_on": f"LM-valid ({len(valid)} triples)"}
            ctx.log(f"evaluate: threshold {threshold['threshold']:.4f} (best accuracy on {len(valid)} LM-valid "
                    "triples)")
        write_json_atomic(saved, threshold)
    start = time.perf_counter()
    margins = _margins(scorer, records, "evaluate")
    seconds = time.perf_counter() - start
    ctx.timings["evaluate"] = seconds
    labels = np.array([r["label"] for r in records])
    predicted = np.array(margins) > threshold["threshold"]
    metrics = {**classification_metrics(labels, predicted), "queries": len(records), "seconds": seconds,
               "queries_per_second": len(records) / seconds, "threshold": threshold["threshold"],
               "threshold_chosen_on": threshold["chosen_on"],
               "accuracy_at_zero": float(np.mean((np.array(margins) > 0) == labels)), "precision": scorer.precision}
    predictions = [{"id": record["id"], "triple": record["triple"], "label": record["label"],
                    "predicted": bool(guess), "margin": round(margin, 4)}
                   for record, margin, guess in zip(records, margins, predicted)]
    _write_evaluation(dest, predictions, metrics)
    ctx.log(f"evaluate (classification): accuracy {metrics['accuracy']:.3f}, F1 {metrics['f1']:.3f} "
            f"on {len(records)} triples")
    return metrics


def _write_evaluation(dest: Path, predictions: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """predictions.jsonl and metrics.json (the manifest gets the stage's summary)."""
    out = EvaluateArtifact(dest)
    write_jsonl(out.predictions, predictions)
    write_json_atomic(out.metrics_path, metrics)
