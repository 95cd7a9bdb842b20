"""Stage 5c's scorer: the log-probability of every candidate answer, batch by batch, and resumable.

One forward pass per batch of queries scores every candidate: each query's
prompt and its k candidates run as one row under a block mask, and every
candidate's answer tokens (EOS included) get their log-probabilities
(:func:`score_batch`).  ``backend: vllm`` computes the same numbers with vLLM
(prompt log-probs, prefix caching; :class:`VLLMScorer`).  Everything after the
scores (picks, rankers, metrics) is shared.

A killed evaluation resumes: each finished query's row is appended at once to
``<dest>.work/predictions.partial.jsonl`` (:class:`PartialPredictions`), under
a key of everything the rows depend on (:func:`resume_key`).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.llm.config import EvaluateConfig
from kgtok.llm.decoding import generate_pick, trie_greedy
from kgtok.llm.prompts import encode_answers, fit_prompt, jsonl_line


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (asked once per class, not per batch)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def score_batch(model: Any, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int
                ) -> list[list[np.ndarray]]:
    """Per-token log-probs of every candidate answer after its prompt.

    One row per query: its prompt, then its k candidates one after another,
    in one forward pass under a block mask: a candidate's tokens see the
    prompt and their own earlier tokens, never another candidate, and take
    the positions that follow the prompt, so each scores as if alone after
    it (equal to scoring them one by one up to float rounding; tested).
    Copying the prompt's key/value cache to each candidate instead took the
    first run's evaluation 134 s, against 72 s (bench/llm_eval_speed.py).
    Logits are computed only from the first answer position on. Returns,
    per query, one array per candidate of length len(candidate).
    """
    import torch

    device = next(model.parameters()).device
    sequences, segments, positions, targets = [], [], [], []  # per row; targets: (row, predicting position, token)
    for row, (prompt, group) in enumerate(zip(prompts, candidates)):
        sequence, segment, position = list(prompt), [0] * len(prompt), list(range(len(prompt)))
        for j, answer in enumerate(group):  # a loop over one batch's candidates
            start = len(sequence)
            sequence += answer
            segment += [j + 1] * len(answer)
            position += range(len(prompt), len(prompt) + len(answer))
            before = [len(prompt) - 1, *range(start, start + len(answer) - 1)]  # the position predicting each token
            targets += [(row, b, t) for b, t in zip(before, answer)]
        sequences.append(sequence)
        segments.append(segment)
        positions.append(position)
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    segment_of = torch.full((len(sequences), width), -1, dtype=torch.long)  # -1: padding, 0: prompt, j: candidate j
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (sequence, segment, position) in enumerate(zip(sequences, segments, positions)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        segment_of[row, : len(sequence)] = torch.tensor(segment)
        position_ids[row, : len(sequence)] = torch.tensor(position)
    index = torch.arange(width)
    query, key = segment_of[:, :, None], segment_of[:, None, :]  # (rows, width, 1), (rows, 1, width)
    allowed = (index[None, :] <= index[:, None]) & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding sees itself (no empty softmax row)
    # Additive, in the model's dtype: eager attention adds the mask to the scores, so a boolean one masked
    # nothing there; under sdpa the first run's forward took 113 ms a batch against 129 (Intel Xeon, 2 threads).
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    rows, before, tokens = (torch.tensor(column) for column in zip(*targets))
    first = int(before.min())  # logits from the earliest answer position on
    kwargs = {}
    if _keeps_logits(type(model)):
        kwargs["logits_to_keep"] = torch.arange(first, width, device=device)
    else:
        first = 0
    out = model(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                position_ids=position_ids.to(device), use_cache=False, **kwargs)
    logits = out.logits[rows.to(device), (before - first).to(device)].float()  # (answer tokens, V)
    token_lp = (logits.gather(1, tokens[:, None].to(device)).squeeze(1) - torch.logsumexp(logits, 1)).cpu().numpy()
    result, offset = [], 0
    for group in candidates:
        scores = []
        for answer in group:
            scores.append(token_lp[offset : offset + len(answer)])
            offset += len(answer)
        result.append(scores)
    return result


class VLLMScorer:
    """``score_batch`` through vLLM: one request per (query, candidate), prompt log-probs of the answer.

    vLLM returns, for a request with ``prompt_logprobs=0``, one entry per
    prompt position (None for the first, else a dict token id -> Logprob that
    holds the token actually there); the answer's entries are read off the end.
    Prefix caching lets the k requests of a query share the prompt's work.
    """

    def __init__(self, model_dir: Path, precision: str) -> None:
        """``precision``: fp32, bf16 or fp16, as vLLM's ``dtype`` (its own ``auto`` would take fp16 for the fp32
        weights fine-tuning saves)."""
        try:
            import vllm
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("evaluate backend 'vllm' needs the vllm package (pip install vllm; a GPU machine)"
                               ) from e
        from kgtok.runtime import DTYPES

        dtype = str(DTYPES[precision]).removeprefix("torch.")  # float32, bfloat16, float16
        self.llm = vllm.LLM(model=str(model_dir), enable_prefix_caching=True, dtype=dtype)
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


@dataclass
class ScoredQuery:
    """One instruction record with its candidates scored."""

    record: dict[str, Any]
    prompt: list[int]  # prompt token ids (truncated as in training)
    answers: list[list[int]]  # token ids of each candidate answer, EOS last
    token_logprobs: list[np.ndarray]  # per candidate: (len(answer),) log-probs

    @property
    def totals(self) -> np.ndarray:
        """(k,) sequence log-likelihood of each candidate."""
        return np.array([lp.sum() for lp in self.token_logprobs])


def candidate_texts(record: dict[str, Any]) -> list[str]:
    """The answers scored per candidate: with class_prefix, class token then entity; else the entity."""
    return record.get("candidate_answers", record["candidate_text"])


def architecture(model: Any) -> dict[str, Any]:
    """What of a Hugging Face model's config sets its speed (the key of a precision measured once a machine)."""
    config = model.config.to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {key: config.get(key) for key in keys}


def fp32_forward(forward: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    """``forward`` outside autocast, its first input in fp32: the output layer of a model run under autocast,
    so the logits (only the answer positions', ``logits_to_keep``) are not rounded to 8 bits of mantissa."""
    import functools

    import torch

    @functools.wraps(forward)
    def run(hidden: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            return forward(hidden.float(), *args, **kwargs)

    return run


class CandidateScorer:
    """The LM of stage 5c: a Hugging Face directory loaded with transformers (or vLLM), scoring answers."""

    def __init__(self, model_dir: Path, config: EvaluateConfig, progress: bool, saved: Path | None = None) -> None:
        """``saved``: where the precision chosen is kept, so that a resumed evaluation scores in the same."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.progress = config, progress
        self.budget_of: dict[str, str] = {}  # record id -> what the budget did to its prompt (fit, trimmed, over)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.vllm, self.model, self.precision, self.precision_ms = None, None, "fp32", {}
        if config.backend == "vllm":  # auto: bf16 on a GPU that has it, else fp32 (vLLM's CPU backend is not timed)
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            self.precision = config.precision if config.precision != "auto" else "bf16" if bf16 else "fp32"
            self.vllm = VLLMScorer(model_dir, self.precision)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            if torch.cuda.is_available():
                self.model.cuda()
            self.precision, self.precision_ms = self._set_precision(config.precision, saved)

    def _set_precision(self, setting: str, saved: Path | None) -> tuple[str, dict[str, float]]:
        """Resolve ``precision`` (:func:`kgtok.runtime.resolve_precision`, timed on a forward pass of this
        model) and run every forward pass of the model (scoring, generation, beams) under its autocast."""
        import torch

        from kgtok.runtime import DTYPES, measured_once, remembered_precision, resolve_precision, timed_precisions

        device = next(self.model.parameters()).device
        # rows as long as a prompt with its candidates typically is (bf16's gain grows with the matrices)
        ids = torch.randint(0, 100, (self.config.batch_size, 256), generator=torch.Generator().manual_seed(0))

        # scoring computes the logits of the answer positions only (score_batch): so does the timed pass
        kept = {"logits_to_keep": 1} if _keeps_logits(type(self.model)) else {}

        def forward() -> None:
            with torch.no_grad():
                self.model(input_ids=ids.to(device), use_cache=False, **kept)

        signature = {"pass": "scoring", **architecture(self.model), "batch": self.config.batch_size, "tokens": 256}

        def choose() -> tuple[str, dict[str, float]]:
            return resolve_precision(setting, device, lambda: measured_once(signature, lambda: timed_precisions(
                forward)), gpu_fallback="fp32")

        precision, timings = choose() if saved is None else remembered_precision(saved, choose)
        if precision != "fp32":  # weights stay fp32; matmuls and attention run in the lower precision
            dtype = DTYPES[precision]
            self.model.forward = torch.autocast(device.type, dtype=dtype)(self.model.forward)
            head = self.model.get_output_embeddings()
            if head is not None:  # logits in fp32: scores are differences of log-probs
                head.forward = fp32_forward(head.forward, device.type)
        return precision, timings

    def prompt_ids(self, record: dict[str, Any]) -> list[int]:
        """The record's prompt within ``max_prompt_tokens`` (:func:`fit_prompt`; noted in ``self.budget_of``)."""
        ids, budget = fit_prompt(self.tokenizer, record, self.config.max_prompt_tokens)
        if "id" in record:
            self.budget_of[record["id"]] = budget
        return ids

    def score(self, records: list[dict[str, Any]], desc: str,
              answers_of: Callable[[dict[str, Any]], list[str]] = candidate_texts) -> Iterator[ScoredQuery]:
        """Each record with its answers (default: its candidates) scored, ``batch_size`` records per pass."""
        import torch
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc=desc, unit="query", disable=not self.progress)
        with torch.no_grad():
            for begin in range(0, len(records), self.config.batch_size):
                batch = records[begin: begin + self.config.batch_size]
                prompts = [self.prompt_ids(r) for r in batch]
                texts = [answers_of(r) for r in batch]
                flat = iter(encode_answers(self.tokenizer, [t for group in texts for t in group]))
                answers = [[next(flat) for _ in group] for group in texts]
                scores = (self.vllm or score_batch)(self.model, prompts, answers, self.pad_id)
                yield from map(ScoredQuery, batch, prompts, answers, scores)
                bar.update(len(batch))
        bar.close()

    def class_scores(self, query: ScoredQuery) -> np.ndarray | None:
        """(k,) log-prob of each candidate's class token and what precedes it in its answer (class_prefix
        records; None otherwise): the LM's belief in that class before any entity token."""
        answers = query.record.get("candidate_answers")
        if answers is None or "candidate_classes" not in query.record:
            return None
        out = []
        for ids, logprobs, text in zip(query.answers, query.token_logprobs, answers):
            token = self.tokenizer.convert_tokens_to_ids(text.split(" ", 1)[0])
            if token not in ids:
                raise ValueError(f"{query.record['id']}: class token of {text!r} is not one token of the model")
            out.append(float(np.sum(logprobs[: ids.index(token) + 1])))
        return np.array(out)

    def pick(self, query: ScoredQuery) -> int:
        """Constrained generation (``decode``): trie decoding from the scores, or Hugging Face ``generate``."""
        if self.config.decode == "trie":
            return trie_greedy(query.answers, query.token_logprobs)
        return generate_pick(self.model, query.prompt, query.answers, self.pad_id, self.tokenizer.eos_token_id)


class PartialPredictions:
    """Rows of the queries already scored, in ``path`` (in the stage's work folder, whose record says whether
    they were made under the same config and inputs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = self._read()  # id -> row

    def _read(self) -> dict[str, dict[str, Any]]:
        """Rows of an interrupted evaluation (a torn last line is dropped)."""
        if not self.path.exists():
            return {}
        rows = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # killed while writing this line
            rows[row["id"]] = row
        return rows

    @contextmanager
    def appending(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        """Rewrite the file with the rows kept (a torn last line goes), then yield ``add(row)``: one line at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(map(jsonl_line, self.rows.values())), encoding="utf-8")
        with self.path.open("a", encoding="utf-8") as handle:

            def add(row: dict[str, Any]) -> None:
                self.rows[row["id"]] = row
                handle.write(jsonl_line(row))
                handle.flush()

            yield add
