"""Stage 5c: the fine-tuned LM picks and re-ranks each query's stage-1 candidates.

One forward pass per batch of queries scores every candidate: the prompt runs
once, its key/value cache is copied to each of the k candidates, and every
candidate's answer tokens (EOS included) get their log-probabilities.  From
those numbers come both outputs (METHOD.md stage 5):

- **constrained generation**: greedy decoding restricted by a prefix trie of
  the candidates' token sequences, so the answer is always a listed entity.
  Greedy trie decoding needs, at each step, the next-token log-probabilities
  of the prefixes still alive, which are exactly the per-token scores already
  computed; ``decode: generate`` runs Hugging Face ``generate`` with
  ``prefix_allowed_tokens_fn`` instead (slower; the tests check both agree).
  The pick gives the DIFT-rule rank (:func:`kgtok.metrics.dift_rank`).
- **full re-rank**: candidates ordered by their sequence log-likelihood
  (:func:`kgtok.metrics.rerank_rank`).

``backend: vllm`` computes the same per-token log-probabilities with vLLM
(prompt log-probs, prefix caching) when it is installed; everything after the
scores is shared.

ReaLM's ontology constraint (``class_constraint``): the class with the most
probability mass among the candidates (softmax of their sequence scores) is
the predicted class; a pick of another class is replaced by the best-scored
candidate of the predicted class.  Classes: a file of entity<TAB>class, else a
stage-3 artifact's level-1 clusters, else the synthetic KG's true types.

Artifact (``dest``): ``predictions.jsonl``, ``metrics.json`` (retriever, DIFT
rule, re-rank, class-constrained rule; both/head/tail; per relation; queries/s)
and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kgtok.artifacts import artifact_dir, hash_inputs, write_json_atomic
from kgtok.config import check_fields, config_to_dict, format_config, in_range
from kgtok.llm.finetune import encode_answer, encode_prompt, pad_left, read_jsonl, truncate_prompt
from kgtok.metrics import RankingEvaluator, dift_rank, rerank_rank


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Stage 5c: which queries, how candidates are scored and picked."""

    split: str = "test"  # instructions file to evaluate: test | lm_valid
    batch_size: int = 4  # queries per forward pass (x k candidate rows)
    decode: str = "trie"  # trie (from the candidate scores) | generate (HF generate + prefix trie)
    backend: str = "hf"  # hf (transformers, shared KV cache) | vllm (needs the vllm package and, in practice, a GPU)
    score: str = "sum"  # sequence score for re-ranking: sum of token log-probs | mean (length-normalised)
    max_prompt_tokens: int = 512  # longer prompts lose their beginning (as in training)
    class_constraint: bool = False  # ReaLM's ontology constraint (needs classes)
    # "fused" rankers: LM log-likelihood + w x log softmax of stage-1 scores; 0: off; None: w is the
    # FUSION_GRID value with the best fused re-rank MRR on lm_valid.jsonl (scored as well), else 1
    fusion_weight: float | None = None
    max_queries: int = 0  # evaluate only the first n queries (0 = all)
    threads: int = 0  # torch threads; 0 = torch's default

    def __post_init__(self) -> None:
        check_fields(self, [
            ("split", lambda v: v in ("test", "lm_valid"), "test or lm_valid"),
            ("batch_size", in_range(1), ">= 1"),
            ("decode", lambda v: v in ("trie", "generate"), "trie or generate"),
            ("backend", lambda v: v in ("hf", "vllm"), "hf or vllm"),
            ("decode", lambda v: not (v == "generate" and self.backend == "vllm"), "trie with backend vllm"),
            ("score", lambda v: v in ("sum", "mean"), "sum or mean"),
            ("max_prompt_tokens", in_range(16), ">= 16"),
            ("max_queries", in_range(0), ">= 0"),
            ("fusion_weight", lambda v: v is None or v >= 0, "null or >= 0"),
            ("threads", in_range(0), ">= 0"),
        ])


class PrefixTrie:
    """Token sequences of the candidates; ``allowed(prefix)`` lists the tokens that may follow."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.children: dict[tuple[int, ...], set[int]] = {}
        self.index: dict[tuple[int, ...], int] = {}
        for i, seq in enumerate(sequences):
            for j in range(len(seq)):
                self.children.setdefault(tuple(seq[:j]), set()).add(seq[j])
            self.index.setdefault(tuple(seq), i)  # identical sequences resolve to the first listed

    def allowed(self, prefix: list[int]) -> list[int]:
        return sorted(self.children.get(tuple(prefix), ()))

    def lookup(self, sequence: list[int]) -> int:
        """Candidate index of a complete sequence; -1 if it is not one."""
        return self.index.get(tuple(sequence), -1)


def trie_greedy(sequences: list[list[int]], token_logprobs: list[np.ndarray]) -> int:
    """The candidate that greedy decoding restricted to ``sequences`` produces.

    At step j every alive candidate shares the chosen prefix, so its token-j
    log-prob is the model's score of that next token; the best token wins and
    the candidates that continue with it stay alive.
    """
    alive = list(range(len(sequences)))
    step = 0
    while len(alive) > 1:
        going = [i for i in alive if step < len(sequences[i])]
        if not going:  # identical sequences: the first listed (best stage-1 rank)
            break
        best = max(going, key=lambda i: token_logprobs[i][step])
        alive = [i for i in going if sequences[i][step] == sequences[best][step]]
        step += 1
    return alive[0]


def score_batch(model: Any, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int
                ) -> list[list[np.ndarray]]:
    """Per-token log-probs of every candidate answer after its prompt.

    Prompts are left-padded and run once; the cache rows are repeated for the
    candidates, which are right-padded.  Returns, per query, one array per
    candidate of length len(candidate).
    """
    import torch

    device = next(model.parameters()).device
    batch = len(prompts)
    ids, mask = pad_left(prompts, pad_id)  # (batch, width)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (batch, V)
    counts = [len(c) for c in candidates]
    owner = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts)).to(device)  # (rows,)
    flat = [seq for group in candidates for seq in group]
    length = max(len(s) for s in flat)
    cand = torch.full((len(flat), length), pad_id, dtype=torch.long)
    cand_mask = torch.zeros((len(flat), length), dtype=torch.long)
    for i, seq in enumerate(flat):
        cand[i, :len(seq)] = torch.tensor(seq)
        cand_mask[i, :len(seq)] = 1
    cand, cand_mask = cand.to(device), cand_mask.to(device)
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    cand_positions = mask.sum(1)[owner].unsqueeze(1) + torch.arange(length, device=device)  # (rows, length)
    out = model(input_ids=cand, attention_mask=torch.cat([mask[owner], cand_mask], 1), position_ids=cand_positions,
                past_key_values=cache, use_cache=False)
    logits = out.logits[:, :-1].float()  # (rows, length-1, V): predicts tokens 1..length-1
    rest = logits.gather(2, cand[:, 1:, None]).squeeze(2) - torch.logsumexp(logits, dim=-1)
    token_lp = torch.cat([first[owner].gather(1, cand[:, :1]), rest], 1) * cand_mask  # (rows, length)
    token_lp = token_lp.cpu().numpy()
    result, row = [], 0
    for group in candidates:
        result.append([token_lp[row + j, :len(seq)] for j, seq in enumerate(group)])
        row += len(group)
    return result


class VLLMScorer:
    """``score_batch`` through vLLM: one request per (query, candidate), prompt log-probs of the answer.

    vLLM returns, for a request with ``prompt_logprobs=0``, one entry per
    prompt position (None for the first, else a dict token id -> Logprob that
    holds the token actually there); the answer's entries are read off the end.
    Prefix caching lets the k requests of a query share the prompt's work.
    """

    def __init__(self, model_dir: Path) -> None:
        try:
            import vllm
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("evaluate backend 'vllm' needs the vllm package (pip install vllm; a GPU machine)"
                               ) from e
        self.llm = vllm.LLM(model=str(model_dir), enable_prefix_caching=True)
        self.params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)

    def __call__(self, model: Any, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int
                 ) -> list[list[np.ndarray]]:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(prompt) + list(answer))
                    for prompt, group in zip(prompts, candidates) for answer in group]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        result, row = [], 0
        for prompt, group in zip(prompts, candidates):
            scores = []
            for answer in group:
                entries = outputs[row].prompt_logprobs[len(prompt):]
                scores.append(np.array([entries[j][token].logprob for j, token in enumerate(answer)]))
                row += 1
            result.append(scores)
        return result


def generate_pick(model: Any, prompt: list[int], sequences: list[list[int]], pad_id: int, eos_id: int) -> int:
    """Hugging Face greedy ``generate`` constrained by the candidates' prefix trie."""
    import torch

    trie = PrefixTrie(sequences)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    start = len(prompt)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max(len(s) for s in sequences), pad_token_id=pad_id,
                         eos_token_id=eos_id,
                         prefix_allowed_tokens_fn=lambda _, tokens: trie.allowed(tokens[start:].tolist()))
    found = trie.lookup(out[0, start:].tolist())
    return found if found >= 0 else 0


def load_classes(source: str | Path | np.ndarray | None, entity_names: list[str]) -> np.ndarray | None:
    """(N,) class id per entity from an array, a file of entity<TAB>class, or a stage-3 artifact."""
    if source is None or isinstance(source, np.ndarray):
        return source
    path = Path(source)
    if path.is_dir():
        from kgtok.hierarchy.stage import load_hierarchy

        hierarchy = load_hierarchy(path)
        return np.asarray(hierarchy["paths"])[:, 0]
    index = {name: i for i, name in enumerate(entity_names)}
    classes = np.full(len(entity_names), -1, dtype=np.int64)
    names: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected entity<TAB>class, got {len(fields)} field(s)")
        if fields[0] not in index:
            raise ValueError(f"{path}:{number}: unknown entity {fields[0]!r}")
        classes[index[fields[0]]] = names.setdefault(fields[1], len(names))
    return classes


def constrain_to_class(pick: int, scores: np.ndarray, candidate_classes: np.ndarray) -> int:
    """ReaLM: keep the pick if its class has the most candidate probability mass, else the best of that class."""
    known = candidate_classes >= 0
    if not known.any():
        return pick
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    labels, inverse = np.unique(candidate_classes[known], return_inverse=True)
    predicted = labels[np.argmax(np.bincount(inverse, weights=probs[known]))]
    if candidate_classes[pick] == predicted:
        return pick
    members = np.flatnonzero(candidate_classes == predicted)
    return int(members[np.argmax(scores[members])])


FUSION_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)  # 64: stage-1 order, LM breaks near-ties


def log_prior(candidate_scores: list[float] | np.ndarray) -> np.ndarray:
    """Log softmax of stage-1 scores over the listed candidates: the retriever's own belief."""
    prior = np.asarray(candidate_scores, dtype=np.float64)
    prior = prior - prior.max()
    return prior - np.log(np.exp(prior).sum())


def gold_position(record: dict[str, Any]) -> int:
    """0-based index of the gold entity among the record's candidates; -1 when it is not listed."""
    return record["candidates"].index(record["gold"]) if record["gold"] in record["candidates"] else -1


def choose_fusion_weight(lm_totals: list[np.ndarray], priors: list[np.ndarray], gold_index: np.ndarray,
                         stage1_ranks: np.ndarray, grid: tuple[float, ...] = FUSION_GRID) -> dict[str, Any]:
    """The grid weight whose fused re-rank MRR is highest on held-out queries (ties: the smaller weight).

    The LM and the retriever err on different queries; how much to trust each
    depends on the backbone and the data, so the weight is learnt on LM-valid
    rather than fixed (choosing it on test would report an optimistic number).
    """
    curve = {}
    for w in grid:
        fused = np.array([t + w * p for t, p in zip(lm_totals, priors)])
        curve[w] = float(np.mean(1.0 / rerank_rank(fused, gold_index, stage1_ranks)))
    best = max(grid, key=lambda w: (curve[w], -w))
    return {"weight": best, "valid_mrr": round(curve[best], 4), "valid_queries": len(lm_totals),
            "curve": {str(w): round(v, 4) for w, v in curve.items()}}


def run_evaluate(
    config: EvaluateConfig,
    model_dir: str | Path,
    instructions: str | Path,
    dest: str | Path,
    *,
    classes: str | Path | np.ndarray | None = None,
    entity_names: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Stage 5c (see the module docstring).  ``model_dir``: a stage-5b artifact or any HF directory."""
    from kgtok.runtime import torch_threads_if_set

    with torch_threads_if_set(config.threads):
        return _evaluate(config, Path(model_dir), Path(instructions), Path(dest), classes, entity_names, progress,
                         log)


def _evaluate(config: EvaluateConfig, model_dir: Path, instructions: Path, dest: Path,
              classes: str | Path | np.ndarray | None, entity_names: list[str] | None, progress: bool,
              log: Callable[[str], None]) -> Path:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(format_config(config))
    hf_dir = model_dir / "model" if (model_dir / "model" / "config.json").exists() else model_dir
    records = read_jsonl(instructions / f"{config.split}.jsonl")
    if config.max_queries:
        records = records[: config.max_queries]
    if not records:
        raise ValueError(f"{instructions / (config.split + '.jsonl')}: no records")
    if config.class_constraint:
        if classes is None:
            raise ValueError("class_constraint needs classes (a file of entity<TAB>class or a hierarchy artifact)")
        classes = load_classes(classes, entity_names or [])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.backend == "vllm":
        model, scorer = None, VLLMScorer(hf_dir)
    else:
        model, scorer = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), score_batch
        model.eval()
        if torch.cuda.is_available():
            model.cuda()

    def prompt_ids(record: dict[str, Any]) -> list[int]:
        return truncate_prompt(tokenizer, encode_prompt(tokenizer, record["prompt"]), config.max_prompt_tokens)

    if records[0].get("task") == "classification":
        return _evaluate_classification(config, model, scorer, tokenizer, pad_id, records, prompt_ids, model_dir,
                                        instructions, Path(dest), progress, log)

    def scored(batch_records: list[dict[str, Any]], desc: str) -> Iterator[tuple[dict, list[int], list, list]]:
        """(record, prompt ids, candidate token sequences, per-token log-probs) per query."""
        bar = tqdm(total=len(batch_records), desc=desc, unit="query", disable=not progress)
        with torch.no_grad():
            for begin in range(0, len(batch_records), config.batch_size):
                batch = batch_records[begin: begin + config.batch_size]
                prompts = [prompt_ids(r) for r in batch]
                answers = [[encode_answer(tokenizer, text) for text in r["candidate_text"]] for r in batch]
                yield from zip(batch, prompts, answers, scorer(model, prompts, answers, pad_id))
                bar.update(len(batch))
        bar.close()

    inputs = _inputs(config, model_dir, instructions)
    work = Path(f"{dest}.work")
    fusion: dict[str, Any] = {"weight": config.fusion_weight}
    fusable = all(r.get("candidate_scores") is not None for r in records)
    valid_path = instructions / "lm_valid.jsonl"
    # The weight chosen on LM-valid is kept in the work dir, so a resumed evaluation does not score LM-valid again.
    chosen_path, chosen_key = work / "fusion.json", _resume_key(config, inputs, None)
    chosen = (json.loads(chosen_path.read_text(encoding="utf-8"))
              if config.fusion_weight is None and chosen_path.exists() else {})
    if config.fusion_weight is None and chosen.get("resume_key") == chosen_key:
        fusion = chosen["fusion"]
        log(f"evaluate: fusion weight {fusion['weight']} (chosen on LM-valid before the interruption)")
    elif config.fusion_weight is None:
        fusion["weight"] = 1.0
        if fusable and config.split != "lm_valid" and valid_path.exists():
            valid = [r for r in read_jsonl(valid_path) if r.get("candidate_scores") is not None]
            if valid:
                totals = [np.array([lp.sum() for lp in lps]) for _, _, _, lps in scored(valid, "fusion weight")]
                fusion = choose_fusion_weight(totals, [log_prior(r["candidate_scores"]) for r in valid],
                                              np.array([gold_position(r) for r in valid]),
                                              np.array([r["stage1_rank"] for r in valid]))
                log(f"evaluate: fusion weight {fusion['weight']} (fused re-rank MRR on {len(valid)} LM-valid "
                    f"queries: {fusion['valid_mrr']})")
        write_json_atomic(chosen_path, {"resume_key": chosen_key, "fusion": fusion})  # creates the work dir
    weight = fusion["weight"]

    partial = work / "predictions.partial.jsonl"
    resume_key = _resume_key(config, inputs, weight)
    done = _read_partial(partial, resume_key)
    if done:
        log(f"evaluate: {len(done)} of {len(records)} queries already scored in {partial}; resuming")
    todo = [r for r in records if r["id"] not in done]
    work.mkdir(parents=True, exist_ok=True)
    partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n"  # drops a torn last line
                               for line in [{"resume_key": resume_key}, *done.values()]), encoding="utf-8")
    start = time.perf_counter()
    with partial.open("a", encoding="utf-8") as handle:
        for record, prompt, sequences, lps in scored(todo, "evaluate"):
            total = np.array([lp.sum() for lp in lps])
            scores = total if config.score == "sum" else total / np.array([len(s) for s in sequences])
            if config.decode == "trie":
                pick = trie_greedy(sequences, lps)
            else:
                pick = generate_pick(model, prompt, sequences, pad_id, tokenizer.eos_token_id)
            row = {"id": record["id"], "direction": record["direction"], "relation": record["triple"][1],
                   "gold": record["gold"], "stage1_rank": record["stage1_rank"],
                   "pick": record["candidates"][pick], "pick_position": pick + 1,
                   "pick_text": record["candidate_text"][pick], "gold_index": gold_position(record),
                   "scores": [round(float(s), 4) for s in scores]}
            if weight > 0 and fusable:
                fused = total + weight * log_prior(record["candidate_scores"])
                best = int(np.argmax(fused))
                row.update(fused_scores=[round(float(s), 4) for s in fused],
                           fused_pick=record["candidates"][best], fused_pick_position=best + 1)
            if config.class_constraint:
                cls = np.asarray(classes)[np.asarray(record["candidates"])]
                picked = constrain_to_class(pick, scores, cls)
                row.update(class_pick=record["candidates"][picked], class_pick_position=picked + 1)
            done[record["id"]] = row
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
    seconds = time.perf_counter() - start
    predictions = [done[r["id"]] for r in records]

    stage1 = np.array([p["stage1_rank"] for p in predictions])
    gold_index = np.array([p["gold_index"] for p in predictions])
    ranks = {
        "retriever": stage1,
        "dift": dift_rank(stage1, np.array([p["pick_position"] for p in predictions]),
                          np.array([p["pick"] == p["gold"] for p in predictions])),
        "rerank": rerank_rank(np.array([p["scores"] for p in predictions]), gold_index, stage1),
    }
    if all("fused_pick" in p for p in predictions):
        ranks["fused_pick"] = dift_rank(stage1, np.array([p["fused_pick_position"] for p in predictions]),
                                        np.array([p["fused_pick"] == p["gold"] for p in predictions]))
        ranks["fused_rerank"] = rerank_rank(np.array([p["fused_scores"] for p in predictions]), gold_index, stage1)
    if config.class_constraint:
        ranks["dift_class"] = dift_rank(stage1, np.array([p["class_pick_position"] for p in predictions]),
                                        np.array([p["class_pick"] == p["gold"] for p in predictions]))
    relation_names = sorted({p["relation"] for p in predictions})
    relation_ids = np.array([relation_names.index(p["relation"]) for p in predictions])
    head = np.array([p["direction"] == "head" for p in predictions])
    metrics: dict[str, Any] = {}
    per_relation: dict[str, Any] = {}
    for name, values in ranks.items():
        evaluator = RankingEvaluator()
        evaluator.process("head", values[head], relation_ids[head])
        evaluator.process("tail", values[~head], relation_ids[~head])
        metrics[name] = evaluator.compute()
        per_relation[name] = evaluator.per_relation(relation_names)
    for p, d, r in zip(predictions, ranks["dift"], ranks["rerank"]):
        p["dift_rank"], p["rerank_rank"] = float(d), float(r)
    summary = {
        "queries": len(predictions), "seconds": seconds, "queries_per_second": len(todo) / max(seconds, 1e-9),
        "resumed_queries": len(records) - len(todo),
        "gold_in_candidates": float(np.mean(gold_index >= 0)), "fusion_weight": weight,
        **{f"{name}_{key}": metrics[name]["both"][key] for name in ranks
           for key in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")},
    }
    _write_evaluation(config, inputs, dest, predictions,
                      {**summary, **metrics, "per_relation": per_relation, "fusion": fusion}, summary, seconds)
    shutil.rmtree(work, ignore_errors=True)
    log(f"evaluate: {len(predictions)} queries, {summary['queries_per_second']:.1f} queries/s; Hits@1 "
        f"retriever {summary['retriever_hits_at_1']:.3f}, DIFT rule {summary['dift_hits_at_1']:.3f}, "
        f"re-rank {summary['rerank_hits_at_1']:.3f} -> {dest}")
    return Path(dest)


def _inputs(config: EvaluateConfig, model_dir: Path, instructions: Path) -> dict[str, str]:
    """Hashes of the model and the evaluated queries (a plain HF directory is hashed file by file: once)."""
    return hash_inputs({"model": model_dir, "instructions": instructions / f"{config.split}.jsonl"})


def _resume_key(config: EvaluateConfig, inputs: dict[str, str], weight: float | None) -> str:
    """What finished predictions depend on: the scoring settings, the model, the queries, the fusion weight."""
    settings = {k: v for k, v in config_to_dict(config).items() if k not in ("threads", "batch_size", "max_queries")}
    text = json.dumps({"settings": settings, "inputs": inputs, "weight": weight}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_partial(path: Path, resume_key: str) -> dict[str, dict[str, Any]]:
    """Rows of an interrupted evaluation with the same key (a torn last line is dropped)."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]).get("resume_key") != resume_key:
            return {}
    except json.JSONDecodeError:
        return {}
    rows = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # killed while writing this line
        rows[row["id"]] = row
    return rows


def _write_evaluation(config: EvaluateConfig, inputs: dict[str, str], dest: Path,
                      predictions: list[dict[str, Any]], metrics: dict[str, Any], summary: dict[str, Any],
                      seconds: float) -> None:
    """The artifact: predictions.jsonl, metrics.json (``metrics``), manifest (``summary`` as its metrics)."""
    with artifact_dir(dest, stage="evaluate", config=config, inputs=inputs) as writer:
        with (writer.path / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for p in predictions:
                handle.write(json.dumps(p, ensure_ascii=False) + "\n")
        write_json_atomic(writer.path / "metrics.json", metrics)
        writer.metrics.update(summary)
        writer.timings["evaluate"] = seconds


def _evaluate_classification(config: EvaluateConfig, model: Any, scorer: Callable[..., Any], tokenizer: Any,
                             pad_id: int,
                             records: list[dict[str, Any]], prompt_ids: Callable[[dict[str, Any]], list[int]],
                             model_dir: Path, instructions: Path, dest: Path, progress: bool,
                             log: Callable[[str], None]) -> Path:
    """Triple classification: the answer " true" or " false", whichever the LM finds likelier."""
    import torch
    from tqdm.auto import tqdm

    from kgtok.llm.classify import classification_metrics

    answers = [encode_answer(tokenizer, "true"), encode_answer(tokenizer, "false")]
    margins = []
    start = time.perf_counter()
    with torch.no_grad():
        for begin in tqdm(range(0, len(records), config.batch_size), desc="evaluate", disable=not progress):
            batch = records[begin: begin + config.batch_size]
            scored = scorer(model, [prompt_ids(r) for r in batch], [answers] * len(batch), pad_id)
            margins += [float(lps[0].sum() - lps[1].sum()) for lps in scored]
    seconds = time.perf_counter() - start
    labels = np.array([r["label"] for r in records])
    predicted = np.array(margins) > 0
    metrics = {**classification_metrics(labels, predicted), "queries": len(records), "seconds": seconds,
               "queries_per_second": len(records) / seconds}
    predictions = [{"id": record["id"], "triple": record["triple"], "label": record["label"],
                    "predicted": bool(guess), "margin": round(margin, 4)}
                   for record, margin, guess in zip(records, margins, predicted)]
    _write_evaluation(config, _inputs(config, model_dir, instructions), dest, predictions, metrics, metrics,
                      seconds)
    log(f"evaluate (classification): accuracy {metrics['accuracy']:.3f}, F1 {metrics['f1']:.3f} "
        f"on {len(records)} triples -> {dest}")
    return dest
