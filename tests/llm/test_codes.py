"""Teaching the LM its codes (issue 15): names init, alignment tasks, the new rows' learning rate, the
code-token LM-valid loss and generative retrieval over every entity."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from kgtok.config import load_config
from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, run_embed
from kgtok.llm import InstructConfig, run_instruct
from kgtok.llm.backbone import TinyBackboneConfig, build_tiny
from kgtok.llm.decoding import PrefixTrie, filtered_position
from kgtok.llm.evaluate import EvaluateConfig, run_evaluate
from kgtok.llm.finetune import IGNORE_INDEX, FinetuneConfig, encode_example, load_backbone, run_finetune
from kgtok.llm.vocab import extend_vocabulary, token_entities
from kgtok.quantize import QuantizeConfig, run_quantize

quiet = lambda *_: None  # noqa: E731
TINY = TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)
INSTRUCT = InstructConfig(top_k=6, neighbours=2, description_words=8)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Synthetic KG (200 entities) -> stage 1 -> ReaLM codes -> instructions with codes."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("codes")
    kg_dir = write_synthetic(SyntheticConfig(num_entities=200, seed=3), root / "kg")
    kg = load_kg(kg_dir)
    embed = run_embed(EmbedConfig(dim=16, max_steps=40, eval_every=20, batch_size=256, threads=1, top_k=6,
                                  export_splits=("valid", "test")), kg, root / "embed", progress=False, log=quiet)
    codes = run_quantize(QuantizeConfig(variant="realm", levels=3, codebook_size=8), kg, root / "codes",
                         embeddings=embed, progress=False, log=quiet)
    instructions = run_instruct(INSTRUCT, kg, embed, root / "inst", codes=codes, log=quiet)
    backbone = build_tiny(["some text to learn merges from", *kg.labels], root / "tiny", TINY)
    return kg, kg_dir, embed, codes, instructions, backbone, root


# ----------------------------------------------------------------------------
# 1. embedding_init: names
# ----------------------------------------------------------------------------


def name_row(model, tokenizer, name):
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight.detach()[ids].mean(0)


def test_token_entities_groups_each_token_s_holders_once():
    groups = token_entities(["<a_0>", "<b_1>", "<b_2>", "<c_0>"], ["<a_0><b_1>", "<a_0><b_2><b_2>", "", "<a_0><x_9>"])
    assert [g.tolist() if g is not None else None for g in groups] == [[0, 1, 3], [0], [1], None]


def test_names_init_rows_are_the_mean_of_their_entities_names(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny(["red fox", "blue fox", "grey cat", "a fox and a cat"] * 10, tmp_path / "tiny", TINY)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    entities = [{"name": "red fox", "ids": "<a_0><b_1>"}, {"name": "blue fox", "ids": "<a_0><b_0>"},
                {"name": "grey cat", "ids": "<a_1><b_1>"}]
    names = {e["name"]: name_row(model, tokenizer, e["name"]) for e in entities}  # before any token is added
    old_mean = model.get_input_embeddings().weight.detach().mean(0)
    tokens = ["<ent>", "</ent>", "<a_0>", "<a_1>", "<b_0>", "<b_1>", "<b_2>"]
    ids = extend_vocabulary(model, tokenizer, tokens, init="names", entities=entities)
    rows = model.get_input_embeddings().weight.detach()
    want = {"<a_0>": (names["red fox"] + names["blue fox"]) / 2, "<a_1>": names["grey cat"],
            "<b_0>": names["blue fox"], "<b_1>": (names["red fox"] + names["grey cat"]) / 2}
    for token, row in want.items():
        torch.testing.assert_close(rows[ids[tokens.index(token)]], row)
    for token in ("<ent>", "<b_2>"):  # no entity holds them: the mean init
        assert (rows[ids[tokens.index(token)]] - old_mean).norm() < 0.1 * old_mean.norm() + 0.05
    with pytest.raises(ValueError, match="entities.jsonl"):
        extend_vocabulary(model, tokenizer, ["<c_0>"], init="names")


def test_names_init_through_stage_5_uses_the_random_tuples_groups(stages, tmp_path):
    """finetune reads entities.jsonl: with ids=random a token's row averages the entities whose *random*
    tuple holds it, not those of the codes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    random_dir = run_instruct(dataclasses.replace(INSTRUCT, ids="random"), kg, embed, tmp_path / "inst",
                              codes=codes, log=quiet)
    entities = read(random_dir / "entities.jsonl")
    assert [e["name"] for e in entities] == kg.labels
    code_entities = read(instructions / "entities.jsonl")
    assert [e["ids"] for e in entities] != [e["ids"] for e in code_entities]
    record = read(random_dir / "test.jsonl")[0]
    assert record["answer"] == entities[record["gold"]]["answer"]  # the rows are the prompts' texts
    tokenizer, model = AutoTokenizer.from_pretrained(backbone), AutoModelForCausalLM.from_pretrained(backbone)
    names = torch.stack([name_row(model, tokenizer, name) for name in kg.labels])  # (N, H)
    config = FinetuneConfig(backbone=str(backbone), embedding_init="names", threads=1)
    model, tokenizer, new_ids, _ = load_backbone(config, [], tmp_path, codes, entities)
    rows = model.get_input_embeddings().weight.detach()
    for token in ("<a_0>", "<b_3>"):
        holders = [i for i, e in enumerate(entities) if token in re.findall(r"<[^<>]+>", e["ids"])]
        assert holders
        torch.testing.assert_close(rows[tokenizer.convert_tokens_to_ids(token)], names[holders].mean(0))
    # Through run_finetune (it finds entities.jsonl itself); instructions without it are refused with a hint.
    short = FinetuneConfig(backbone=str(backbone), embedding_init="names", max_steps=1, batch_size=4, threads=1)
    run_finetune(short, random_dir, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    (tmp_path / "bare").mkdir()
    none_dir = run_instruct(dataclasses.replace(INSTRUCT, ids="none"), kg, embed, tmp_path / "bare" / "i", log=quiet)
    assert not (none_dir / "entities.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="entities.jsonl not found"):
        run_finetune(short, none_dir, tmp_path / "ft2", codes=codes, progress=False, log=quiet)


# ----------------------------------------------------------------------------
# 2. Alignment tasks
# ----------------------------------------------------------------------------


def test_alignment_records_counts_formats_and_reproducibility(stages, tmp_path):
    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    plain = read(instructions / "lm_train.jsonl")
    config = dataclasses.replace(INSTRUCT, align_tasks=("codes_to_name", "name_to_codes"), align_ratio=0.5)
    dest = run_instruct(config, kg, embed, tmp_path / "a", codes=codes, log=quiet)
    train = read(dest / "lm_train.jsonl")
    aligned = [r for r in train if "align_task" in r]
    tasks = [r for r in train if "align_task" not in r]
    # The task examples are today's, in another order; per task round(0.5 x their count) alignment records.
    assert sorted(r["id"] for r in tasks) == sorted(r["id"] for r in plain)
    for task in config.align_tasks:
        mine = [r for r in aligned if r["align_task"] == task]
        assert len(mine) == min(round(0.5 * len(plain)), kg.num_entities)
        assert len({r["entity"] for r in mine}) == len(mine)  # each entity at most once per task
    counts = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert counts["lm_train_alignment"] == len(aligned) and counts["lm_train"] == len(train)
    assert counts["lm_train_from_train_queries"] == json.loads((instructions / "manifest.json").read_text())[
        "metrics"]["lm_train_from_train_queries"]
    assert read(dest / "lm_valid.jsonl") == read(instructions / "lm_valid.jsonl")  # LM-valid untouched
    entities = read(dest / "entities.jsonl")
    for r in aligned:
        ids = f"<ent>{entities[r['entity']]['ids']}</ent>"
        name = kg.labels[r["entity"]]
        if r["align_task"] == "codes_to_name":
            assert r["prompt"] == f"What entity has the codes {ids}?" and r["answer"] == name
        else:
            assert r["prompt"].startswith(f"What are the codes of {name}?") and r["answer"] == ids
            if kg.descriptions[r["entity"]]:
                assert f"\nAbout {name}: " in r["prompt"]
    # Scored as every answer: the loss falls on the answer's tokens (EOS last) only.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    record = next(r for r in aligned if r["align_task"] == "codes_to_name")
    example = encode_example(tokenizer, record, 256)
    answer = tokenizer(" " + record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in example["labels"] if t != IGNORE_INDEX] == answer
    # The same config gives the same file; a capped ratio gives every entity once.
    again = run_instruct(config, kg, embed, tmp_path / "b", codes=codes, log=quiet)
    assert (again / "lm_train.jsonl").read_bytes() == (dest / "lm_train.jsonl").read_bytes()
    capped = run_instruct(dataclasses.replace(config, align_tasks=("codes_to_name",), align_ratio=100.0), kg, embed,
                          tmp_path / "c", codes=codes, log=quiet)
    assert sorted(r["entity"] for r in read(capped / "lm_train.jsonl") if "align_task" in r) == list(
        range(kg.num_entities))


def test_ids_first_writes_every_entity_codes_then_name(stages, tmp_path):
    """``ids_first``: answers, listed candidates, the known entity, facts and the entity file all read
    "<codes> name", so an answer starts with its codes; the same records otherwise."""
    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    dest = run_instruct(dataclasses.replace(INSTRUCT, ids_first=True), kg, embed, tmp_path / "f", codes=codes,
                        log=quiet)
    entities = read(dest / "entities.jsonl")
    swapped = {f"{e['name']} <ent>{e['ids']}</ent>": f"<ent>{e['ids']}</ent> {e['name']}" for e in entities}
    assert all(e["answer"] == f"<ent>{e['ids']}</ent> {e['name']}" for e in entities)
    for split in ("lm_train.jsonl", "test.jsonl"):
        before, after = read(instructions / split), read(dest / split)
        assert [r["id"] for r in before] == [r["id"] for r in after]
        for old, new in zip(before, after):
            assert new["answer"] == swapped[old["answer"]] and new["answer"].startswith("<ent>")
            assert new.get("candidate_text") == (None if "candidate_text" not in old else
                                                 [swapped[c] for c in old["candidate_text"]])
            prompt = old["prompt"]
            for name_first, codes_first in swapped.items():  # each ids string is one entity's
                prompt = prompt.replace(name_first, codes_first)
            assert new["prompt"] == prompt != old["prompt"]
    with pytest.raises(ValueError, match="false with ids=none"):
        InstructConfig(ids="none", ids_first=True)


def test_alignment_is_refused_without_ids_and_unknown_tasks():
    with pytest.raises(ValueError, match="empty with ids=none"):
        InstructConfig(ids="none", align_tasks=("codes_to_name",))
    with pytest.raises(ValueError, match="distinct names among codes_to_name, name_to_codes"):
        InstructConfig(align_tasks=("names_to_codes",))
    with pytest.raises(ValueError, match="align_ratio"):
        InstructConfig(align_tasks=("codes_to_name",), align_ratio=-1.0)
    config = load_config(InstructConfig, overrides=["align_tasks=[codes_to_name,name_to_codes]", "align_ratio=0.25"])
    assert config.align_tasks == ("codes_to_name", "name_to_codes") and config.align_ratio == 0.25
    assert InstructConfig().align_tasks == ()  # off by default


# ----------------------------------------------------------------------------
# 3. The new rows' learning rate; the code tokens' LM-valid loss
# ----------------------------------------------------------------------------


def trained_rows(stages, tmp_path, name, **changes):
    """(new rows before, after; an MLP weight before, after; old rows before, after) of one training step."""
    from transformers import AutoModelForCausalLM

    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    config = FinetuneConfig(backbone=str(backbone), max_steps=1, batch_size=4, threads=1, warmup_ratio=0.0,
                            learning_rate=1e-2, **changes)
    model, tokenizer, new_ids, _ = load_backbone(config, [], tmp_path / f"{name}-init", codes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dest = run_finetune(config, instructions, tmp_path / name, codes=codes, progress=False, log=quiet)
    after = AutoModelForCausalLM.from_pretrained(dest / "model").state_dict()
    embedding, mlp = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
    old = [i for i in range(len(tokenizer)) if i not in set(new_ids)]
    return (before[embedding][new_ids], after[embedding][new_ids], before[mlp], after[mlp],
            before[embedding][old], after[embedding][old], dest)


def test_new_token_lr_multiplier_full_training(stages, tmp_path):
    new0, new0_after, mlp, mlp_after, old, old_after, _ = trained_rows(stages, tmp_path, "m0",
                                                                       new_token_lr_multiplier=0.0)
    torch.testing.assert_close(new0_after, new0, rtol=0, atol=0)  # frozen
    assert not torch.allclose(mlp_after, mlp) and not torch.allclose(old_after, old)  # the rest trained
    moved = {}
    for m in (1.0, 10.0):
        new, new_after, *_ = trained_rows(stages, tmp_path, f"m{m}", new_token_lr_multiplier=m)
        moved[m] = float((new_after - new).norm())
    assert moved[10.0] > 3 * moved[1.0] > 0


def test_new_token_lr_multiplier_lora(stages, tmp_path):
    new, new_after, mlp, mlp_after, old, old_after, dest = trained_rows(
        stages, tmp_path, "lora0", adapter="lora", r=4, lora_alpha=8, new_token_lr_multiplier=0.0)
    torch.testing.assert_close(new_after, new)
    torch.testing.assert_close(old_after, old)
    lora = trained_rows(stages, tmp_path, "lora1", adapter="lora", r=4, lora_alpha=8)
    big = trained_rows(stages, tmp_path, "lora10", adapter="lora", r=4, lora_alpha=8, new_token_lr_multiplier=10.0)
    assert float((big[1] - big[0]).norm()) > 3 * float((lora[1] - lora[0]).norm()) > 0


def test_code_token_loss_on_lm_valid(stages, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kgtok.llm.finetune import AnswerLoss, PaddingCollator

    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    config = FinetuneConfig(backbone=str(backbone), max_steps=2, batch_size=4, threads=1)
    dest = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    metrics = json.loads((dest / "metrics.json").read_text())
    history = [h["eval_code_token_loss"] for h in metrics["history"] if "eval_code_token_loss" in h]
    assert history and metrics["valid_code_token_loss"] == history[-1] > 0
    levels_seen = metrics["valid_code_token_loss_by_level"]
    assert all(v > 0 for v in levels_seen)
    # By hand: the cross-entropy of the answers' code tokens alone (not names, boundary tokens or EOS), in all
    # and per level (the token's namespace: a, b, ...).
    tokenizer = AutoTokenizer.from_pretrained(dest / "model")
    model = AutoModelForCausalLM.from_pretrained(dest / "model").eval()
    code = {i: t.strip("<>").split("_")[0] for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<[a-z]+_\d+>", t)}
    names = sorted(set(code.values()), key=lambda n: (len(n), n))
    assert len(levels_seen) == len(names)
    code_ids = list(code)
    records = read(instructions / "lm_valid.jsonl")[:3]
    examples = [encode_example(tokenizer, r, config.max_length) for r in records]
    loss = AnswerLoss(code_ids, [names.index(code[i]) for i in code_ids])
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    labels = batch.pop("labels")
    totals, counts = np.zeros(len(names)), np.zeros(len(names))
    with torch.no_grad():
        loss(model(**batch), labels)
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            for position in torch.nonzero(torch.isin(target, torch.tensor(code_ids))).flatten().tolist():
                level = names.index(code[int(target[position])])
                totals[level] += float(torch.nn.functional.cross_entropy(logits[position], target[position]))
                counts[level] += 1
    assert loss.counts.sum() == counts.sum() == sum(r["answer"].count("<") - 2 for r in records)  # not <ent>, </ent>
    assert loss.counts.tolist() == counts.tolist() and (counts > 0).all()
    assert loss.totals.sum() / loss.counts.sum() == pytest.approx(totals.sum() / counts.sum(), rel=1e-4)
    assert loss.totals / loss.counts == pytest.approx(totals / counts, rel=1e-4)


# ----------------------------------------------------------------------------
# 4. Generative retrieval over every entity
# ----------------------------------------------------------------------------


def test_prefix_trie_and_filtered_position():
    sequences = [[5, 6, 9], [5, 7, 9], [8, 9], [5, 6, 10, 9]]
    trie = PrefixTrie(sequences)
    expected = {(): [5, 8], (5,): [6, 7], (8,): [9], (5, 6): [9, 10], (5, 7): [9], (5, 6, 10): [9]}
    assert trie.children == expected  # complete sequences continue nowhere
    assert trie.width == 4 and trie.lookup([5, 6, 10, 9]) == 3 and trie.lookup([5, 6]) == -1
    assert PrefixTrie([]).children == {} and PrefixTrie([]).width == 0
    assert filtered_position([4, 7, 2, 9], gold=2, known={7}) == 2.0  # 7 is another true answer: filtered
    assert filtered_position([4, 7, 2, 9], gold=2, known=set()) == 3.0
    assert filtered_position([4, 7], gold=2, known=set()) == float("inf")


def test_generative_ranker_searches_every_entity(stages, tmp_path, monkeypatch):
    """With as many beams as entities the beam is exhaustive: it returns every entity once, in the order of
    their full sequence scores, so a gold outside the stage-1 list is found; its rank is filtered."""
    from kgtok.llm.prompts import encode_answer
    from kgtok.llm.scoring import CandidateScorer

    kg, kg_dir, embed, codes, instructions, backbone, root = stages
    config = FinetuneConfig(backbone=str(backbone), max_steps=4, batch_size=4, threads=1)
    model_dir = run_finetune(config, instructions, tmp_path / "ft", codes=codes, progress=False, log=quiet)
    records = read(instructions / "test.jsonl")
    outside = [r for r in records if not r["gold_in_candidates"]][:2]
    inside = [r for r in records if r["gold_in_candidates"]][:1]
    assert outside, "the tiny KG should have test queries whose gold stage 1 did not list"
    chosen = tmp_path / "inst"  # the instructions with only these queries as test
    chosen.mkdir()
    for path in instructions.iterdir():
        (chosen / path.name).write_bytes(path.read_bytes())
    (chosen / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in outside + inside))
    beams = kg.num_entities
    ev_config = EvaluateConfig(generative_beams=beams, fusion_weight=1.0, threads=1)
    with monkeypatch.context() as patch, pytest.raises(ValueError, match="needs --data"):  # before any scoring
        patch.setattr("kgtok.llm.scoring.CandidateScorer", lambda *a, **k: pytest.fail("scored before the check"))
        run_evaluate(dataclasses.replace(ev_config, fusion_weight=None), model_dir, chosen, tmp_path / "nodata",
                     progress=False, log=quiet)
    dest = run_evaluate(ev_config, model_dir, chosen, tmp_path / "ev", data=kg_dir, progress=False, log=quiet)
    predictions = read(dest / "predictions.jsonl")
    metrics = json.loads((dest / "metrics.json").read_text())
    scorer = CandidateScorer(model_dir / "model", ev_config, progress=False)
    entities = read(chosen / "entities.jsonl")
    answers = [encode_answer(scorer.tokenizer, e["answer"]) for e in entities]
    relation = {name: i for i, name in enumerate(kg.relation_names)}
    ranks = []
    for p, r in zip(predictions, outside + inside):
        assert sorted(p["generative"]) == list(range(kg.num_entities))  # every entity, each once: valid tuples
        from kgtok.llm.scoring import score_batch

        with torch.no_grad():
            scores = [float(lp.sum()) for lp in score_batch(scorer.model, [scorer.prompt_ids(r)], [answers],
                                                            scorer.pad_id)[0]]
        in_beam_order = np.array([scores[e] for e in p["generative"]])
        assert np.all(np.diff(in_beam_order) <= 1e-3)  # best first, as the full scores order them
        rid = relation[r["triple"][1]]
        known = set((kg.filter_index.true_tails(r["known"], rid) if r["direction"] == "tail"
                     else kg.filter_index.true_heads(rid, r["known"])).tolist()) - {r["gold"]}
        position = p["generative"].index(r["gold"])
        want = 1 + sum(e not in known for e in p["generative"][:position])
        assert p["generative_rank"] == want
        ranks.append(want)
    assert metrics["generative_mrr"] == pytest.approx(np.mean(1 / np.array(ranks)))
    # The queries ran as one left-padded batch (prompts of unequal lengths): one by one gives the same lists.
    from kgtok.llm.decoding import PrefixTrie, beam_entities

    prompts = [scorer.prompt_ids(r) for r in outside + inside]
    assert len({len(x) for x in prompts}) > 1 and ev_config.batch_size >= len(prompts)
    trie = PrefixTrie(answers)
    alone = [beam_entities(scorer.model, [x], trie, 5, scorer.pad_id, scorer.tokenizer.eos_token_id)[0]
             for x in prompts]
    assert beam_entities(scorer.model, prompts, trie, 5, scorer.pad_id, scorer.tokenizer.eos_token_id) == alone
    assert metrics["generative"]["both"]["hits_at_10"] == pytest.approx(np.mean(np.array(ranks) <= 10))
    assert {"generative_hits_at_1", "generative_hits_at_3", "generative_hits_at_10"} <= set(metrics)
    # A small beam returns at most that many valid entities; a gold outside it has reciprocal rank 0.
    small = run_evaluate(dataclasses.replace(ev_config, generative_beams=2), model_dir, chosen, tmp_path / "ev2",
                         data=kg_dir, progress=False, log=quiet)
    for p in read(small / "predictions.jsonl"):
        assert 1 <= len(p["generative"]) <= 2 and all(0 <= e < kg.num_entities for e in p["generative"])
        assert (p["generative_rank"] is None) == (p["gold"] not in p["generative"])
    # Off by default; refused with vllm; instructions without ids have no entity file.
    assert EvaluateConfig().generative_beams == 0
    with pytest.raises(ValueError, match="0 with backend vllm"):
        EvaluateConfig(generative_beams=4, backend="vllm")
