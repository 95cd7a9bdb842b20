"""Stage 5a: DIFT-format instructions with entity codes, built from stage-1 candidates.

Where the examples come from (DIFT, METHOD.md stage 5): the stage-1 model's
top-k lists for the *validation* queries, both directions, shuffled and split
90% / 10% *by triple* into LM-train / LM-valid (a triple's two queries on one
side; LM-valid's lists are those under the standard filter, as test's:
:func:`held_out_records`); LM-train keeps a record only when its confidence 100·p(gold) + 1/rank
(rank <= k; else 1/rank) exceeds 0.05, which drops every record whose gold is
outside the list.  The test queries are the LM's test set.  (On training
queries the stage-1 model has seen the answer, so its lists would teach the
LM to copy rank 1; they are an opt-in source.)
Where the gold stands in LM-train's lists (``list_order``): in stage 1's order
(DIFT), or ``calibrated``, moved to a place drawn from stage 1's validation
ranks under the standard filter, so that LM-train puts it first as often as
test's lists do (:func:`calibrated`).
Training queries come in one of two forms (``train_query_format``): the full
DIFT prompt with the list in random order, or ReaLM's form, the query line
alone ("(known entity <codes>, relation, ?)" -> the answer).  The second needs
no stage-1 list and is ~10x shorter, so a small LM trained from scratch sees
every training triple in the time the first gives it a few thousand: it learns
which entities a relation leads to, which is what scoring a list needs.

Rules kept here: neighbour triples come from the training graph only, and
never the query triple itself; the gold is never added to a list that lacks
it; names are not unique, so each candidate carries its entity id and the
answer is resolved through the list, never by name.

Alignment (``align_tasks``, LC-Rec's way of teaching an LLM its item IDs):
records that translate an entity's ids to its name (``codes_to_name``) or its
name and description to its ids (``name_to_codes``), ``align_ratio`` per
LM-train example and task, each entity at most once per task, mixed into
LM-train (``"align_task"`` says which; no candidates, so 5c never sees them).

Output (``dest``): ``lm_train.jsonl``, ``lm_valid.jsonl``, ``test.jsonl``,
with ids ``entities.jsonl`` (per entity: ``entity`` index, raw ``id``,
``name``, ``ids`` tokens, ``answer`` text; the finetune stage's ``names``
init and the evaluate stage's generative ranker read it) and
``manifest.json``.  One record per line::

    {"id": "valid-17-tail", "split": "valid", "direction": "tail",
     "triple": ["h raw id", "relation", "t raw id"], "known": 12, "gold": 345,
     "candidates": [345, 9, ...], "candidate_scores": [7.1, 6.4, ...] (stage 1's), "candidate_text": ["dog <ent><a_1><b_7></ent>", ...],
     "gold_in_candidates": true, "stage1_rank": 1.0, "confidence": 98.3,
     "prompt": "...", "answer": "dog <ent><a_1><b_7></ent>"}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kgtok.artifacts import check_id_order
from kgtok.data.graph import KnowledgeGraph
from kgtok.embed.layout import EmbedArtifact
from kgtok.embed.ranking import RankedQueries
from kgtok.llm.classes import class_token, load_classes
from kgtok.llm.classify import classification_records
from kgtok.llm.config import InstructConfig  # here too: kgtok.llm.instruct.InstructConfig is public
from kgtok.llm.layout import InstructArtifact
from kgtok.llm.neighbours import NeighbourIndex
from kgtok.llm.prompts import (
    compose_prompt,
    cut_words,
    dift_prompt_parts,
    entity_text,
    query_lines,
    write_jsonl,
)
from kgtok.llm.vocab import ENTITY_BEGIN, ENTITY_END
from kgtok.quantize.layout import QuantizeArtifact
from kgtok.stage import Context, Input, Stage, run_stage


def sampled_rows(rng: np.random.Generator, total: int, limit: int) -> np.ndarray | None:
    """Sorted ``limit`` of ``total`` query rows drawn without replacement; None (all rows) when no limit bites."""
    return np.sort(rng.choice(total, limit, replace=False)) if 0 < limit < total else None


def query_records(kg: KnowledgeGraph, rows: np.ndarray | None, tokens: list[str] | None, config: InstructConfig
                  ) -> list[dict[str, Any]]:
    """ReaLM's short form for training queries ``rows`` (None: all; indices into train triples, both directions:
    i < n is the tail query of triple i, else the head query of triple i - n): query line, question, answer."""
    train = kg.train.numpy()
    n = len(train)
    records = []
    for i in (range(2 * n) if rows is None else rows.tolist()):  # building text: one pass per query
        h, r, t = (int(v) for v in train[i % n])
        direction = int(i >= n)
        known, gold = (h, t) if direction == 0 else (t, h)
        query, question = query_lines(kg.relation_names[r], direction, entity_text(kg, known, tokens, config),
                                      config.template)
        records.append({
            "id": f"train-{i % n}-{'tail' if direction == 0 else 'head'}", "split": "train",
            "direction": "tail" if direction == 0 else "head",
            "triple": [kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]],
            "known": known, "gold": gold,
            **prompt_fields({"head": [query], "about": "", "description": "", "facts_about": "", "facts": [],
                             "tail": [question] if question else []}),
            "answer": entity_text(kg, gold, tokens, config),
        })
    return records


def prompt_fields(parts: dict[str, Any]) -> dict[str, Any]:
    """A record's ``prompt`` (whole) and ``prompt_parts`` (what the token budget may trim: facts, description)."""
    return {"prompt": compose_prompt(parts), "prompt_parts": parts}


def add_class_prefix(records: list[dict[str, Any]], classes: np.ndarray) -> None:
    """ReaLM's class prediction: each answer (and candidate answer) starts with its entity's class token."""
    for record in records:
        record["gold_class"] = int(classes[record["gold"]])
        record["answer"] = f"{class_token(record['gold_class'])} {record['answer']}"
        if "candidates" in record:
            record["candidate_classes"] = [int(classes[c]) for c in record["candidates"]]
            record["candidate_answers"] = [f"{class_token(k)} {text}" for k, text in
                                           zip(record["candidate_classes"], record["candidate_text"])]


def load_tokens(quantize_artifact: str | Path | None, kg: KnowledgeGraph) -> list[str] | None:
    """Token strings per entity from a stage-4 artifact's tokens.txt (checked against the KG's order)."""
    if quantize_artifact is None:
        return None
    path = QuantizeArtifact(quantize_artifact).tokens
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    if [r[1] for r in rows] != kg.entity_names:
        raise ValueError(f"{path}: entity order differs from the KG's; was it made from another dataset?")
    return [r[2] for r in rows]


def random_ids(tokens: list[str], rng: np.random.Generator, rounds: int = 10_000) -> list[str]:
    """A random unique code per entity, of the codes' shape and vocabulary (the ``ids: random`` baseline).

    Each level's tokens are permuted across the entities independently (among the codes of one length), so
    every level keeps its tokens and their counts while an entity's tuple carries nothing of its own codes or
    of its neighbours'.  Entities left sharing a tuple (all but one of each group) then draw new tokens, level
    by level, from that level's tokens as the other entities hold them (so counts barely move); after half
    of ``rounds`` rounds, uniformly from the level's vocabulary, which finds the last free tuples of a nearly
    full code space.  A code space smaller than the entities is refused, and so is one where ``rounds`` rounds
    leave some entity without a free tuple.
    """
    split = [re.findall(r"<[^<>]+>", t) for t in tokens]
    lengths = np.array([len(s) for s in split])
    drawn: list[str] = [""] * len(tokens)
    for length in np.unique(lengths):
        members = np.flatnonzero(lengths == length)
        table = np.array([split[i] for i in members], dtype=object).reshape(len(members), int(length))
        vocab, columns = zip(*(np.unique(table[:, level].astype(str), return_inverse=True)
                               for level in range(length))) if length else ((), ())
        codes = np.stack([rng.permutation(c) for c in columns], axis=1) if length else np.zeros((len(members), 0), int)
        space = math.prod(len(v) for v in vocab)
        if space < len(members):
            raise ValueError(f"ids=random: {len(members)} entities with {length}-token codes, but only {space} "
                             "different tuples of those tokens exist (too few code combinations)")
        for round_ in range(rounds + 1):
            _, first = np.unique(codes, axis=0, return_index=True)
            clash = np.ones(len(members), dtype=bool)
            clash[first] = False
            if not clash.any():
                break
            if round_ == rounds:
                raise ValueError(f"ids=random: {int(clash.sum())} codes still shared after {rounds} rounds")
            n = int(clash.sum())
            if round_ < rounds // 2:  # the tokens as held: counts kept in expectation
                codes[clash] = codes[rng.integers(0, len(members), size=(n, int(length))), np.arange(length)]
            else:
                codes[clash] = np.stack([rng.integers(0, len(v), n) for v in vocab], axis=1)
        for row, i in enumerate(members):
            drawn[i] = "".join(vocab[level][codes[row, level]] for level in range(length))
    return drawn


def entity_rows(kg: KnowledgeGraph, tokens: list[str], config: InstructConfig) -> list[dict[str, Any]]:
    """``entities.jsonl``: per entity its index, raw id, name, id tokens and its answer text (as prompts show it)."""
    return [{"entity": i, "id": kg.entity_names[i], "name": kg.labels[i], "ids": tokens[i],
             "answer": entity_text(kg, i, tokens, config)} for i in range(kg.num_entities)]


def alignment_records(kg: KnowledgeGraph, tokens: list[str], config: InstructConfig, examples: int,
                      rng: np.random.Generator) -> list[dict[str, Any]]:
    """LC-Rec's alignment tasks: per task in ``align_tasks``, round(align_ratio x ``examples``) entities (each
    at most once, all of them at most) drawn from ``rng``, in entity order.

    ``codes_to_name``: "What entity has the codes <ent>..</ent>?" -> its name; ``name_to_codes``: "What are
    the codes of NAME?" (and its description, cut as the prompts' are) -> ``<ent>..</ent>``.  Prompt and
    answer are split as every record's, so the loss falls on the answer alone.
    """
    records = []
    for task in config.align_tasks:
        count = min(int(round(config.align_ratio * examples)), kg.num_entities)
        for entity in np.sort(rng.choice(kg.num_entities, count, replace=False)).tolist():
            name, ids = kg.labels[entity], f"{ENTITY_BEGIN}{tokens[entity]}{ENTITY_END}"
            if task == "codes_to_name":
                parts = {"head": [f"What entity has the codes {ids}?"], "about": "", "description": "",
                         "facts_about": "", "facts": [], "tail": []}
                answer = name
            else:
                has_description = config.use_descriptions and bool(kg.descriptions[entity])
                parts = {"head": [f"What are the codes of {name}?"], "about": f"About {name}: ",
                         "description": (cut_words(kg.descriptions[entity], config.description_words)
                                         if has_description else ""),
                         "facts_about": "", "facts": [], "tail": []}
                answer = ids
            records.append({"id": f"align-{task}-{entity}", "split": "align", "align_task": task,
                            "entity": entity, **prompt_fields(parts), "answer": answer})
    return records


def query_id(split: str, row: int, triples: int, direction: int) -> str:
    """A query record's id from its row in stage 1's ranked queries (``triples`` per direction): ``valid-17-tail``."""
    return f"{split}-{row % triples}-{'tail' if direction == 0 else 'head'}"


def standard_valid_ranked(kg: KnowledgeGraph, embeddings: EmbedArtifact, top_k: int,
                          log: Callable[[str], None]) -> RankedQueries | None:
    """Stage 1's validation lists under the standard filter (``valid_eval``), as test's are.

    A stage-1 artifact from before those lists were written: its model ranks the validation queries here
    (seconds); with no model either (candidates imported alone): None, with a warning.
    """
    path = embeddings.candidates("valid_eval")
    if path.exists():
        return RankedQueries.load(path)
    if embeddings.model.exists():
        return standard_valid_lists(kg, embeddings, top_k)
    log(f"instruct: warning: neither {path} nor a model in {embeddings.path}: LM-valid keeps the training "
        "lists, where a test answer ranked above the gold counts as an error")
    return None


def held_out_records(kg: KnowledgeGraph, standard: RankedQueries, lm_valid: list[dict[str, Any]],
                     tokens: list[str] | None, neighbours: NeighbourIndex,
                     config: InstructConfig) -> list[dict[str, Any]]:
    """LM-valid's queries rebuilt from ``standard`` (:func:`standard_valid_ranked`), as test's are.

    LM-train's lists hide no test answer (an honest training set), so a test answer ranked above the gold
    counts as an error there; LM-valid, on which the fusion weight and a benchmark's rankers are chosen, must
    be measured as test is.
    """
    n = len(standard.triples) // 2
    row_of = {query_id("valid", i, n, d): i for i, d in enumerate(standard.direction.tolist())}
    rows = np.array([row_of[r["id"]] for r in lm_valid], dtype=np.int64)
    return records_for_split(kg, standard, "valid", tokens, neighbours, config, rows=rows)


def gold_positions(ranks: np.ndarray, k: int) -> np.ndarray:
    """(k,) how often the gold stands at each place of a k-list (0 = first), among ranks within the list."""
    places = np.ceil(ranks[ranks <= k]).astype(np.int64) - 1
    counts = np.bincount(places, minlength=k)[:k].astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(k, 1.0 / k)


Reorder = Callable[[int, list[int]], np.ndarray]  # (gold, candidates in stage 1's order) -> the order to list them


def shuffled(rng: np.random.Generator) -> Reorder:
    """Candidates in random order: the list's order says nothing (training queries, whose gold stage 1 knows)."""
    return lambda gold, candidates: rng.permutation(len(candidates))


def calibrated(rng: np.random.Generator, positions: np.ndarray) -> Reorder:
    """The gold moved to a place drawn from ``positions``, the others in stage 1's order: training lists then
    put the gold first as often as test lists do (:func:`gold_first_share` says why that matters)."""
    def order(gold: int, candidates: list[int]) -> np.ndarray:
        k = len(candidates)
        if gold not in candidates:
            return np.arange(k)
        at = candidates.index(gold)
        place = int(rng.choice(k, p=positions[:k] / positions[:k].sum()))
        rest = [j for j in range(k) if j != at]
        return np.array(rest[:place] + [at] + rest[place:])
    return order


def standard_valid_lists(kg: KnowledgeGraph, embeddings: EmbedArtifact, top_k: int) -> RankedQueries:
    """The validation queries ranked by the artifact's model under the standard filter, as stage 1 now
    exports them (``valid_eval``)."""
    from kgtok.embed.ranking import rank_triples
    from kgtok.embed.train import load_model

    model, saved = load_model(embeddings.path)
    return rank_triples(model, kg.triples["valid"], kg.filter_index, reciprocal=saved["reciprocal"],
                        num_base_relations=saved["num_base_relations"], top_k=top_k)


def records_for_split(kg: KnowledgeGraph, ranked: RankedQueries, split: str, tokens: list[str] | None,
                      neighbours: NeighbourIndex, config: InstructConfig, rows: np.ndarray | None = None,
                      reorder: Reorder | None = None) -> list[dict[str, Any]]:
    """One instruction record per ranked query (both directions), or per query in ``rows``.

    ``reorder``: list each query's candidates in the order it gives (:func:`shuffled`, :func:`calibrated`;
    LM-train only), else in stage 1's.
    """
    k = min(config.top_k, ranked.candidates.shape[1])
    n = len(ranked.triples) // 2
    # Stage 1 fills a top-k with fewer than k unfiltered entities (a UMLS head query may have 2) with the
    # filtered ones, scored -inf: other true answers, which the filtered protocol never lists.
    listed = (np.isfinite(ranked.candidate_scores[:, :k]).sum(1) if ranked.candidate_scores is not None
              else np.full(len(ranked.triples), k))
    records = []
    for i in (range(len(ranked.triples)) if rows is None else rows):  # building text: one pass per query
        h, r, t = (int(v) for v in ranked.triples[i])
        direction = int(ranked.direction[i])
        known = h if direction == 0 else t
        gold = int(ranked.gold[i])
        candidates = [int(c) for c in ranked.candidates[i, :listed[i]]]
        scores = ([round(float(v), 5) for v in ranked.candidate_scores[i, :listed[i]]]
                  if ranked.candidate_scores is not None else None)
        if reorder is not None:
            order = reorder(gold, candidates)
            candidates = [candidates[j] for j in order]
            scores = [scores[j] for j in order] if scores is not None else None
        rank = float(ranked.rank[i])
        in_list = gold in candidates
        confidence = 100.0 * float(ranked.gold_probability[i]) + 1.0 / rank if rank <= k else 1.0 / rank
        exclude = (h, r, t) if split == "train" else None
        context = neighbours.for_query(known, r, direction == 0, exclude, config.neighbours)
        records.append({
            "id": query_id(split, i, n, direction),
            "split": split, "direction": "tail" if direction == 0 else "head",
            "triple": [kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]],
            "known": known, "gold": gold, "candidates": candidates, "candidate_scores": scores,
            "candidate_text": [entity_text(kg, c, tokens, config) for c in candidates],
            "gold_in_candidates": in_list, "stage1_rank": rank, "confidence": confidence,
            **prompt_fields(dift_prompt_parts(kg, (h, r, t), direction, candidates, context, tokens, config)),
            "answer": entity_text(kg, gold, tokens, config),
        })
    return records


def triple_key(record: dict[str, Any]) -> str:
    """The triple a query record comes from (its head and tail queries share it): ``valid-17``."""
    return record["id"].rsplit("-", 1)[0]


def split_examples(records: list[dict[str, Any]], config: InstructConfig) -> tuple[list, list, int]:
    """Shuffle, split into LM-train / LM-valid *by triple*, filter LM-train by confidence (truncated sampling).

    The head and the tail query of a triple go to the same side: split by query, about 90% of the LM-valid
    queries had their twin (the same triple, the other side) in LM-train, an optimistic LM-valid that biased
    what is chosen on it.  Returns (LM-train, LM-valid, number of LM-train records dropped by the filter).
    """
    rng = np.random.default_rng(config.seed)
    keys = list(dict.fromkeys(triple_key(r) for r in records))
    cut = int(round(len(keys) * (1.0 - config.lm_valid_fraction)))
    to_train = set(np.asarray(keys, dtype=object)[rng.permutation(len(keys))[:cut]].tolist())
    order = rng.permutation(len(records))
    candidates = [records[i] for i in order if triple_key(records[i]) in to_train]
    # With k = 20 the threshold alone drops every gold outside the list (1/21 < 0.05);
    # with a shorter list it would not, so that condition is stated explicitly.
    train = confident(candidates, config)
    valid = [records[i] for i in order if triple_key(records[i]) not in to_train]
    return train, valid, len(candidates) - len(train)


def confident(records: list[dict[str, Any]], config: InstructConfig) -> list[dict[str, Any]]:
    """The records LM-train keeps: confidence above the threshold and the gold in the list."""
    return [r for r in records if r["confidence"] > config.confidence_threshold and r["gold_in_candidates"]]


def gold_first_share(records: list[dict[str, Any]]) -> float | None:
    """Among records whose list holds the gold, the share where it is first: how far the LM learns to trust rank 1.

    LM-train's lists are filtered with train and valid only, so a validation query's answers held out in test
    still stand in its list, often above the gold; test's lists (and LM-valid's) are filtered with every split.
    On a dense graph the two shares part widely (UMLS: 0.49 against 0.95), and an LM trained on the first
    learns to leave rank 1 where the second says it should keep it.  A training query's list has the gold
    first mostly (stage 1 has seen it; FB15k-237 3k: 0.81) or, shuffled, anywhere.
    """
    firsts = [r["candidates"][0] == r["gold"] for r in records if r.get("candidates") and r["gold_in_candidates"]]
    return float(np.mean(firsts)) if firsts else None


def run(config: InstructConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Stage 5a: write LM-train, LM-valid and test instructions into ``dest`` (see the module docstring)."""
    kg = ctx.kg
    tokens = load_tokens(inputs["codes"], kg) if config.use_codes else None
    if config.ids == "random":
        tokens = random_ids(tokens, np.random.default_rng(config.seed + 2))
    if tokens is not None:
        write_jsonl(InstructArtifact(dest).entities, entity_rows(kg, tokens, config))
    if config.task == "classification":
        return _classification_instruct(config, kg, tokens, dest, ctx.log, inputs.get("negatives"))
    embeddings = EmbedArtifact(inputs["embeddings"])
    check_id_order(embeddings.entities, kg.entity_names)  # its candidate lists hold its own ids
    check_id_order(embeddings.relations, kg.relation_names, "relation")
    dift_train_queries = config.train_from_train_queries and config.train_query_format == "dift"
    ranked = {split: _ranked_queries(embeddings, split)
              for split in ["valid", "test"] + (["train"] if dift_train_queries else [])}
    neighbours = NeighbourIndex(kg)
    k = min(config.top_k, ranked["valid"].candidates.shape[1])
    standard = standard_valid_ranked(kg, embeddings, k, ctx.log)
    reorder = None
    if config.list_order == "calibrated":
        if standard is None:
            raise ValueError("instruct.list_order=calibrated needs stage 1's validation lists under the standard "
                             f"filter ({embeddings.candidates('valid_eval')}) or its model; use list_order=stage1")
        reorder = calibrated(np.random.default_rng(config.seed + 4), gold_positions(standard.rank, k))
    # LM-valid's records are rebuilt from the standard lists below: only LM-train's keep this order.
    valid_records = records_for_split(kg, ranked["valid"], "valid", tokens, neighbours, config, reorder=reorder)
    lm_train, lm_valid, dropped = split_examples(valid_records, config)
    if standard is not None:
        lm_valid = held_out_records(kg, standard, lm_valid, tokens, neighbours, config)
    from_validation = len(lm_train)
    rng = np.random.default_rng(config.seed + 1)
    if dift_train_queries:
        rows = sampled_rows(rng, len(ranked["train"].triples), config.train_queries)
        order = reorder or (shuffled(rng) if config.shuffle_train_query_candidates else None)
        extra = records_for_split(kg, ranked["train"], "train", tokens, neighbours, config, rows=rows, reorder=order)
        lm_train += confident(extra, config)
    elif config.train_from_train_queries:  # ReaLM's short form, straight from the training graph
        lm_train += query_records(kg, sampled_rows(rng, 2 * len(kg.train), config.train_queries), tokens, config)
    if config.train_from_train_queries:
        lm_train = [lm_train[i] for i in rng.permutation(len(lm_train))]
    test = records_for_split(kg, ranked["test"], "test", tokens, neighbours, config)
    if config.class_prefix:
        if inputs.get("classes") is None:
            raise ValueError("class_prefix needs --classes (a file of entity<TAB>class or a stage-3 artifact)")
        classes = load_classes(inputs["classes"], kg.entity_names)
        for records in (lm_train, lm_valid, test):
            add_class_prefix(records, classes)
    alignment = []
    if config.align_tasks:  # after the class prefix: alignment answers name an entity, not a query's target
        align_rng = np.random.default_rng(config.seed + 3)
        alignment = alignment_records(kg, tokens, config, len(lm_train), align_rng)
        lm_train = lm_train + alignment
        lm_train = [lm_train[i] for i in align_rng.permutation(len(lm_train))]
    out = InstructArtifact(dest)
    for name, records in (("lm_train", lm_train), ("lm_valid", lm_valid), ("test", test)):
        write_jsonl(out.split(name), records)
    aligned = f" ({len(alignment)} alignment)" if config.align_tasks else ""
    ctx.log(f"instruct: {len(lm_train)} LM-train{aligned}, {len(lm_valid)} LM-valid, {len(test)} test records")
    first_share = {"lm_train_gold_first": gold_first_share(lm_train), "lm_valid_gold_first": gold_first_share(lm_valid)}
    shares = [v for v in first_share.values() if v is not None]
    if len(shares) == 2 and abs(shares[0] - shares[1]) > 0.2:
        ctx.log(f"instruct: warning: the gold is stage 1's first candidate in {first_share['lm_train_gold_first']:.0%} "
                f"of LM-train's lists but {first_share['lm_valid_gold_first']:.0%} of LM-valid's (filtered as test's "
                "are): the LM learns that trust in rank 1; instruct.list_order=calibrated places LM-train's gold as "
                "in test's lists (docs/stage5-llm.md)")
    return {
        **({"lm_train_alignment": len(alignment)} if config.align_tasks else {}),
        "lm_train": len(lm_train), "lm_valid": len(lm_valid), "test": len(test),
        "validation_queries": len(valid_records),
        "lm_train_dropped": dropped,
        "lm_train_from_train_queries": len(lm_train) - len(alignment) - from_validation,
        "test_gold_in_candidates": float(np.mean([r["gold_in_candidates"] for r in test])) if test else 0.0,
        **first_share,
    }


def _needs(config: InstructConfig) -> tuple[str, ...]:
    return ((("embeddings",) if config.task == "completion" else ()) + (("codes",) if config.use_codes else ())
            + (("classes",) if config.class_prefix else ()))


STAGE = Stage(
    name="instruct", title="stage 5a: instructions", config=InstructConfig, run=run,
    inputs=(Input("embeddings", "embed", EmbedArtifact, "a stage-1 artifact (candidates)"),
            Input("codes", "quantize", QuantizeArtifact,
                  "a stage-4 artifact (entity codes); ids=none writes DIFT without codes"),
            Input("classes", "hierarchy", None, "class_prefix: a file of entity<TAB>class or a stage-3 artifact "
                  "(level-1 clusters)"),
            Input("negatives", None, None, "task=classification: a file of head<TAB>relation<TAB>tail test "
                  "negatives (else corrupted test triples)")),
    needs=_needs, summary=("lm_train", "lm_valid", "test"),
    # What the records mean, beyond config and inputs: instructions written before LM-valid took the standard
    # filter lack this mark, so they are written again rather than reused.
    fingerprint=lambda config: {"lm_valid_lists": "standard filter"},
)


def run_instruct(
    config: InstructConfig,
    data: str | Path | KnowledgeGraph,
    embeddings: str | Path | None,
    dest: str | Path,
    *,
    codes: str | Path | None = None,
    negatives: str | Path | None = None,
    classes: str | Path | None = None,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Stage 5a into ``dest`` (reused when current, unless ``force``); ``negatives``: a file of test negatives
    (classification); ``classes``: entity<TAB>class file or stage-3 artifact (class_prefix)."""
    return run_stage(STAGE, config, dest, data=data, log=log,
                     inputs={"embeddings": embeddings, "codes": codes, "negatives": negatives, "classes": classes},
                     reuse=not force).path


def _ranked_queries(embeddings: EmbedArtifact, split: str) -> RankedQueries:
    """Stage 1's candidate lists for ``split`` (both directions)."""
    path = embeddings.candidates(split)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: export {split} candidates in stage 1 (export_splits)")
    return RankedQueries.load(path)


def _classification_instruct(config: InstructConfig, kg: KnowledgeGraph, tokens: list[str] | None, dest: Path,
                             log: Callable[[str], None], negatives: Path | None = None) -> dict[str, Any]:
    """True/false instructions (:mod:`kgtok.llm.classify`): a training-triple sample, valid, test (its
    negatives from the ``negatives`` file when given)."""
    from kgtok.llm.classify import read_negatives

    rng = np.random.default_rng(config.seed)
    neighbours = NeighbourIndex(kg)
    train = kg.train.numpy()
    if config.classification_train_triples and len(train) > config.classification_train_triples:
        train = train[np.sort(rng.choice(len(train), config.classification_train_triples, replace=False))]
    splits = {"lm_train": train, "lm_valid": kg.valid.numpy(), "test": kg.test.numpy()}
    counts = {}
    for name, triples in splits.items():
        given = read_negatives(negatives, kg) if negatives is not None and name == "test" else None
        records = classification_records(kg, triples, name, tokens, neighbours, config, rng, given)
        write_jsonl(InstructArtifact(dest).split(name), records)
        counts[name] = len(records)
    log(f"instruct (classification): {counts} records")
    return counts
