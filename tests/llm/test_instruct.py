"""DIFT instructions: sources and sizes, truncated sampling, no leakage, ablation switches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kgtok.artifacts import artifact_dir

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, run_embed
from kgtok.llm import InstructConfig, run_instruct
from kgtok.llm.instruct import NeighbourIndex


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=300, seed=5), root / "kg"))
    embed = run_embed(EmbedConfig(dim=16, max_steps=60, eval_every=30, batch_size=256, threads=1, top_k=8,
                                  export_splits=("valid", "test")), kg, root / "embed", progress=False,
                      log=lambda *_: None)
    codes = root / "codes"
    with artifact_dir(codes, stage="quantize", config={}) as writer:  # a stage-4 artifact made by hand
        (writer.path / "tokens.txt").write_text(
            "".join(f"{i}\t{n}\t<a_{i % 7}><b_{i}>\n" for i, n in enumerate(kg.entity_names)))
    return kg, embed, codes, root


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sources_sizes_and_truncated_sampling(inputs, tmp_path):
    kg, embed, codes, _ = inputs
    dest = run_instruct(InstructConfig(top_k=8), kg, embed, tmp_path / "i", codes=codes, log=lambda *_: None)
    train, valid, test = (read(dest / f"{n}.jsonl") for n in ("lm_train", "lm_valid", "test"))
    queries = 2 * len(kg.valid)
    assert len(valid) == queries - int(round(queries * 0.9))
    manifest = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert len(train) + manifest["lm_train_dropped"] + len(valid) == queries
    assert len(test) == 2 * len(kg.test) and {r["split"] for r in test} == {"test"}
    assert {r["split"] for r in train + valid} == {"valid"}  # DIFT: examples from validation queries
    assert not all(r["gold_in_candidates"] for r in valid)  # the share counts only lists that hold the gold
    for name, records in (("lm_train", train), ("lm_valid", valid)):  # how often rank 1 is the answer
        firsts = [r["candidates"][0] == r["gold"] for r in records if r["gold_in_candidates"]]
        assert manifest[f"{name}_gold_first"] == pytest.approx(np.mean(firsts)) and 0 < np.mean(firsts) < 1
    for record in train:
        assert record["confidence"] > 0.05 and record["gold_in_candidates"]
        assert record["answer"] in record["candidate_text"]
    for record in train + valid + test:
        k = len(record["candidates"])
        assert k == 8
        if record["stage1_rank"] > k:  # confidence = 1/rank; the gold is never added to the list
            assert record["confidence"] == pytest.approx(1 / record["stage1_rank"])
            assert not record["gold_in_candidates"] and record["gold"] not in record["candidates"]
        else:  # confidence = 100 p(gold) + 1/rank
            assert record["confidence"] >= 1 / record["stage1_rank"]
    # Ranks in the records are stage 1's filtered ranks.
    ranks = np.array([r["stage1_rank"] for r in test])
    stage1 = json.loads((embed / "metrics.json").read_text())["test"]["both"]["mrr"]
    assert np.mean(1 / ranks) == pytest.approx(stage1)


def test_prompt_contents_and_no_leakage(inputs, tmp_path):
    kg, embed, codes, _ = inputs
    dest = run_instruct(InstructConfig(top_k=8), kg, embed, tmp_path / "i", codes=codes, log=lambda *_: None)
    record = read(dest / "test.jsonl")[0]
    h, r, t = record["triple"]
    assert record["direction"] == "tail" and "tail entity unknown" in record["prompt"]
    assert "<a_" in record["prompt"] and kg.labels[record["known"]] in record["prompt"]
    held_out = {tuple(x) for x in np.concatenate([kg.valid.numpy(), kg.test.numpy()]).tolist()}
    index = NeighbourIndex(kg)
    train = {tuple(x) for x in kg.train.numpy().tolist()}
    for entity in range(0, kg.num_entities, 17):
        facts = index.for_query(entity, 0, True, None, 10)
        assert all(f in train for f in facts) and not any(f in held_out for f in facts)
        assert all(entity in (f[0], f[2]) for f in facts)
    # A training query never lists itself as a neighbour fact.
    h0, r0, t0 = (int(v) for v in kg.train[0])
    assert (h0, r0, t0) not in index.for_query(h0, r0, True, (h0, r0, t0), 1000)
    no_codes = run_instruct(InstructConfig(top_k=8, ids="none"), kg, embed, tmp_path / "n", log=lambda *_: None)
    assert all("<a_" not in r["prompt"] for r in read(no_codes / "test.jsonl"))
    codes_only = run_instruct(InstructConfig(top_k=8, use_names=False, use_descriptions=False,
                                             use_neighbours=False), kg, embed, tmp_path / "c", codes=codes,
                              log=lambda *_: None)
    first = read(codes_only / "test.jsonl")[0]
    assert kg.labels[first["gold"]] not in first["answer"] and first["answer"].startswith("<ent><a_")
    assert "Known facts" not in first["prompt"]
    with pytest.raises(ValueError, match="instruct needs --codes .*ids=none"):
        run_instruct(InstructConfig(), kg, embed, tmp_path / "x", log=lambda *_: None)


def test_neighbours_ranked_by_relation_cooccurrence(tmp_path):
    from conftest import write_lines

    directory = tmp_path / "kg"
    directory.mkdir()
    # Entity a: relations likes (x3 entities have likes+knows), hates (rare).
    write_lines(directory / "train.txt", [
        "a\tlikes\tb", "a\thates\tc", "a\tknows\td",
        "e\tlikes\tb", "e\tknows\tc", "f\tlikes\tc", "f\tknows\tb",
    ])
    write_lines(directory / "valid.txt", ["a\tlikes\td"])
    write_lines(directory / "test.txt", ["e\tlikes\td"])
    kg = load_kg(directory)
    index = NeighbourIndex(kg)
    a, likes = kg.entity_to_id["a"], kg.relation_to_id["likes"]
    facts = index.for_query(a, likes, True, None, 3)
    relations = [kg.relation_names[f[1]] for f in facts]
    # "likes" co-occurs with itself (3 entities) and "knows" (3), "hates" with it on 1 entity: last.
    assert relations[-1] == "hates" and set(relations[:2]) == {"likes", "knows"}


def test_a_self_loop_is_one_fact_not_two(tmp_path):
    """(a, r, a) is indexed once as a's head triple and once as its tail triple: it took two fact slots."""
    from conftest import write_lines

    directory = tmp_path / "kg"
    directory.mkdir()
    write_lines(directory / "train.txt", ["a\tr\ta", "a\ts\tb", "b\tr\tc"])
    write_lines(directory / "valid.txt", ["b\tr\ta"])
    write_lines(directory / "test.txt", ["c\tr\ta"])
    kg = load_kg(directory)
    a = kg.entity_to_id["a"]
    facts = NeighbourIndex(kg).for_query(a, kg.relation_to_id["r"], True, None, 10)
    r, s, b = kg.relation_to_id["r"], kg.relation_to_id["s"], kg.entity_to_id["b"]
    assert sorted(facts) == sorted([(a, r, a), (a, s, b)])


def test_training_queries_are_sampled_and_shuffled(tmp_path):
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=200, seed=2), tmp_path / "kg"))
    embed = run_embed(EmbedConfig(dim=16, max_steps=40, eval_every=20, batch_size=256, threads=1, top_k=6),
                      kg, tmp_path / "embed", progress=False, log=lambda *_: None)
    base = dict(top_k=6, ids="none", train_from_train_queries=True, train_queries=50)
    ordered = run_instruct(InstructConfig(**base, shuffle_train_query_candidates=False), kg, embed,
                           tmp_path / "o", log=lambda *_: None)
    shuffled = run_instruct(InstructConfig(**base), kg, embed, tmp_path / "s", log=lambda *_: None)
    from_train = {name: [r for r in read(d / "lm_train.jsonl") if r["split"] == "train"]
                  for name, d in (("ordered", ordered), ("shuffled", shuffled))}
    assert 0 < len(from_train["ordered"]) <= 50 and len(from_train["ordered"]) == len(from_train["shuffled"])
    ranked = np.load(embed / "candidates" / "train.npz")
    # Same queries, same candidate sets; stage-1 order kept in one, permuted in the other.
    permuted = 0
    for a, b in zip(sorted(from_train["ordered"], key=lambda r: r["id"]),
                    sorted(from_train["shuffled"], key=lambda r: r["id"])):
        assert a["id"] == b["id"] and sorted(a["candidates"]) == sorted(b["candidates"])
        row = int(a["id"].split("-")[1]) + (0 if a["direction"] == "tail" else len(ranked["triples"]) // 2)
        assert a["candidates"] == ranked["candidates"][row].tolist()
        # Stage-1 scores travel with their candidates through the shuffle.
        assert dict(zip(b["candidates"], b["candidate_scores"])) == pytest.approx(
            dict(zip(a["candidates"], ranked["candidate_scores"][row].tolist())), abs=1e-4)
        permuted += a["candidates"] != b["candidates"]
        assert b["prompt"].endswith("; ".join(b["candidate_text"]) + ".")
    assert permuted > 0.8 * len(from_train["ordered"])
    # A training query's own triple is never among its facts (it would state the answer).
    from kgtok.llm.prompts import triple_text

    config = InstructConfig(**base)
    with_facts = 0
    for record in from_train["shuffled"]:
        h, r, t = record["triple"]
        own = triple_text(kg, (kg.entity_to_id[h], kg.relation_to_id[r], kg.entity_to_id[t]), None, config)
        assert own not in record["prompt_parts"]["facts"]
        with_facts += bool(record["prompt_parts"]["facts"])
    assert with_facts > 0.8 * len(from_train["shuffled"])


def test_training_queries_in_realm_query_form(inputs, tmp_path):
    kg, embed, codes, _ = inputs  # stage 1 exported no train candidates: the query form needs none
    config = InstructConfig(top_k=8, train_from_train_queries=True, train_query_format="query")
    dest = run_instruct(config, kg, embed, tmp_path / "q", codes=codes, log=lambda *_: None)
    plain = run_instruct(InstructConfig(top_k=8), kg, embed, tmp_path / "p", codes=codes, log=lambda *_: None)
    lm_train = read(dest / "lm_train.jsonl")
    from_train = [r for r in lm_train if r["split"] == "train"]
    # Every training triple in both directions, on top of the DIFT records (which are unchanged).
    assert len(from_train) == 2 * len(kg.train)
    assert sorted(r["id"] for r in lm_train if r["split"] != "train") == sorted(
        r["id"] for r in read(plain / "lm_train.jsonl"))
    assert json.loads((dest / "manifest.json").read_text())["metrics"]["lm_train_from_train_queries"] == len(from_train)
    assert lm_train[: len(from_train)] != from_train  # shuffled with the DIFT records
    tokens = {i: line.split("\t")[2] for i, line in enumerate((codes / "tokens.txt").read_text().splitlines())}
    train = kg.train.numpy()
    name_to_row = {}
    for i, (h, r, t) in enumerate(train):
        name_to_row.setdefault((kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]), i)
    for record in from_train[:50]:
        h, r, t = train[name_to_row[tuple(record["triple"])]]
        gold = t if record["direction"] == "tail" else h
        known = h if record["direction"] == "tail" else t
        assert record["gold"] == gold and record["known"] == known
        assert record["answer"] == f"{kg.labels[gold]} <ent>{tokens[gold]}</ent>"
        # The query line and the question, nothing else: no list, no description, no neighbours.
        lines = record["prompt"].split("\n")
        assert len(lines) == 2 and f"{kg.labels[known]} <ent>{tokens[known]}</ent>" in lines[0]
        assert lines[1] == ("What is the tail entity?" if record["direction"] == "tail" else "What is the head entity?")
        assert "candidates" not in record["prompt"]
    limited = run_instruct(InstructConfig(top_k=8, train_from_train_queries=True, train_query_format="query",
                                          train_queries=40), kg, embed, tmp_path / "l", codes=codes,
                           log=lambda *_: None)
    assert sum(r["split"] == "train" for r in read(limited / "lm_train.jsonl")) == 40
    with pytest.raises(ValueError, match="dift or query"):
        InstructConfig(train_query_format="short")


def test_compact_template_keeps_the_triple_and_list_and_drops_difts_sentences(inputs, tmp_path):
    kg, embed, codes, _ = inputs
    base = dict(top_k=8, train_from_train_queries=True, train_query_format="query", train_queries=40)
    dift = run_instruct(InstructConfig(**base), kg, embed, tmp_path / "d", codes=codes, log=lambda *_: None)
    compact = run_instruct(InstructConfig(**base, template="compact"), kg, embed, tmp_path / "c", codes=codes,
                           log=lambda *_: None)
    for name in ("lm_train", "lm_valid", "test"):
        long, short = read(dift / f"{name}.jsonl"), read(compact / f"{name}.jsonl")
        assert [r["id"] for r in long] == [r["id"] for r in short]  # the same queries, lists and answers
        for a, b in zip(long, short):
            assert (a["answer"], a.get("candidates"), a["prompt_parts"]["facts"]) == (
                b["answer"], b.get("candidates"), b["prompt_parts"]["facts"])
            side = a["direction"]
            triple = a["prompt_parts"]["head"][0].removeprefix(f"Here is a triple with the {side} entity unknown: ")
            assert b["prompt_parts"]["head"] == [triple.removesuffix(".")]  # "(?, relation, known)" alone
            assert ("(?, " in triple) == (side == "head") and "entity" not in b["prompt"]
            if a["split"] == "train":  # the query form: the triple is the whole prompt
                assert b["prompt"] == b["prompt_parts"]["head"][0] and len(b["prompt"]) < len(a["prompt"]) - 50
            else:  # DIFT: description and facts as before; the list after "Candidates:" as after DIFT's question
                assert b["prompt_parts"]["tail"] == ["Candidates: " + a["prompt_parts"]["tail"][0].split(": ", 1)[1]]
                assert b["prompt"].split("\n")[1:-1] == a["prompt"].split("\n")[1:-1]
    with pytest.raises(ValueError, match="dift or compact"):
        InstructConfig(template="short")


def test_random_ids_have_the_codes_shape_and_tokens_but_not_their_content(inputs, tmp_path):
    import re
    from collections import Counter

    from kgtok.llm.instruct import load_tokens

    kg, embed, codes, _ = inputs
    dest = run_instruct(InstructConfig(top_k=8, ids="random"), kg, embed, tmp_path / "r", codes=codes,
                        log=lambda *_: None)
    real = load_tokens(codes, kg)
    shown = {}
    for record in read(dest / "test.jsonl") + read(dest / "lm_valid.jsonl"):
        for entity, text in zip(record["candidates"], record["candidate_text"]):
            shown[entity] = re.search(r"<ent>(.*)</ent>", text).group(1)
    assert len(set(shown.values())) == len(shown)  # unique per entity
    levels = lambda t: re.findall(r"<[^<>]+>", t)  # noqa: E731
    assert all(len(levels(shown[e])) == len(levels(real[e])) for e in shown)
    assert sum(shown[e] != real[e] for e in shown) > 0.9 * len(shown)
    from kgtok.llm.instruct import random_ids

    drawn = random_ids(real, np.random.default_rng(0))
    for level in range(len(levels(real[0]))):  # every level keeps its tokens and their counts
        assert Counter(levels(t)[level] for t in drawn) == Counter(levels(t)[level] for t in real)
    assert len(set(drawn)) == len(drawn)
    with pytest.raises(ValueError, match="ids=random: 2 entities .* only 1 different tuples"):
        random_ids(["<a_1><b_1>", "<a_1><b_1>"], np.random.default_rng(0))


def test_random_ids_fill_a_nearly_full_code_space():
    """200 entities in 16 x 16 tuples with skewed levels: the swap-only version gave up after 100,000 swaps."""
    import re

    from kgtok.llm.instruct import random_ids

    rng = np.random.default_rng(1)
    pairs = rng.permutation(256)[:200]  # unique real codes, as the quantizer's distinct assignment leaves them
    real = [f"<a_{p // 16}><b_{p % 16}>" for p in sorted(pairs, key=lambda p: (p % 7, p))]
    drawn = random_ids(real, np.random.default_rng(0))
    assert len(set(drawn)) == 200
    levels = lambda t: re.findall(r"<[^<>]+>", t)  # noqa: E731
    for level in (0, 1):
        assert {levels(t)[level] for t in drawn} <= {levels(t)[level] for t in real}
    assert sum(d == r for d, r in zip(drawn, real)) < 20  # not the real codes back


def test_prompt_budget_keeps_query_question_and_every_candidate(inputs, tmp_path):
    """ReaLM-style 32-level codes and long descriptions at 512 tokens: trimming takes facts, then description."""
    import re

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from kgtok.llm.backbone import TinyBackboneConfig, build_tiny
    from kgtok.llm.prompts import fit_prompt
    from kgtok.llm.vocab import BOUNDARY_TOKENS

    kg, embed, _, _ = inputs
    rng = np.random.default_rng(0)
    codes = tmp_path / "codes32"
    with artifact_dir(codes, stage="quantize", config={}) as writer:
        (writer.path / "tokens.txt").write_text("".join(
            f"{i}\t{n}\t{''.join(f'<l{j}_{v}>' for j, v in enumerate(rng.integers(0, 64, 32)))}\n"
            for i, n in enumerate(kg.entity_names)))
    dest = run_instruct(InstructConfig(top_k=8, neighbours=10, description_words=200), kg, embed, tmp_path / "i",
                        codes=codes, log=lambda *_: None)
    records = read(dest / "test.jsonl")[:40]
    path = build_tiny([r["prompt"] for r in records], tmp_path / "tiny",
                      TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64))
    tokenizer = AutoTokenizer.from_pretrained(path)
    code_tokens = sorted({t for line in (codes / "tokens.txt").read_text().splitlines()
                          for t in re.findall(r"<[^<>]+>", line.split("\t")[2])})
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in [*BOUNDARY_TOKENS, *code_tokens]])
    squash = lambda text: re.sub(r"\s+", "", text)  # noqa: E731 (decoding spaces added tokens apart)
    outcomes = []
    for record in records:
        ids, outcome = fit_prompt(tokenizer, record, 512)
        outcomes.append(outcome)
        text = squash(tokenizer.decode(ids))
        query, *_, question = record["prompt"].split("\n")
        assert squash(query) in text and squash(question) in text  # the query line, the question with its list
        assert all(squash(c) in text for c in record["candidate_text"])
        assert len(ids) <= 512 or outcome == "over"
    assert outcomes.count("trimmed") > len(records) // 2  # the setting is over budget for most prompts
    # Facts go before the description: a trimmed prompt keeps description words only when every fact fits.
    record = next(r for r, o in zip(records, outcomes) if o == "trimmed")
    ids, _ = fit_prompt(tokenizer, record, 512)
    text = tokenizer.decode(ids)
    if "Known facts" in text:
        assert squash(record["prompt_parts"]["description"]) in squash(text)
    # a budget smaller than the query and the list: kept whole, reported as over
    ids, outcome = fit_prompt(tokenizer, records[0], 64)
    assert outcome == "over" and all(squash(c) in squash(tokenizer.decode(ids)) for c in records[0]["candidate_text"])


def test_lm_train_and_lm_valid_split_by_triple(inputs, tmp_path):
    """A validation triple's head and tail queries land on the same side of the LM-train / LM-valid split."""
    from kgtok.llm.instruct import split_examples, triple_key

    kg, embed, codes, _ = inputs
    config = InstructConfig(top_k=8, confidence_threshold=0.0, lm_valid_fraction=0.3)
    dest = run_instruct(config, kg, embed, tmp_path / "i", codes=codes, log=lambda *_: None)
    def triple_of(record):  # written out here: the test must not lean on the key it checks
        return record["id"].removesuffix("-tail").removesuffix("-head")

    assert triple_key({"id": "valid-17-tail"}) == triple_key({"id": "valid-17-head"}) == "valid-17"
    valid_keys = {triple_of(r) for r in read(dest / "lm_valid.jsonl")}
    train_keys = {triple_of(r) for r in read(dest / "lm_train.jsonl")}
    assert valid_keys and train_keys and not valid_keys & train_keys
    records = [{"id": f"valid-{i}-{side}", "confidence": 1.0, "gold_in_candidates": True}
               for side in ("tail", "head") for i in range(100)]
    train, valid, dropped = split_examples(records, config)
    assert len(valid) == 60 and len(train) == 140 and dropped == 0  # 30 of 100 triples, both queries each
    assert not {triple_of(r) for r in train} & {triple_of(r) for r in valid}


class Preferring:
    """A stand-in KGE model: every query scores the entities by ``preference`` ((num_entities,) scores)."""

    def __init__(self, preference):
        import torch

        self.preference, self.num_entities, self.entity = preference, len(preference), torch.zeros(1)

    def eval(self):
        return self

    def score_all_tails(self, h, r):
        return self.preference.expand(len(h), -1).clone()

    def score_all_heads(self, r, t):
        return self.preference.expand(len(t), -1).clone()


def test_training_lists_are_filtered_with_train_and_valid_only():
    """LM-train's lists (stage 1's valid and train exports) keep test answers as negatives; test lists filter all."""
    import torch

    from kgtok.data.graph import KnowledgeGraph
    from kgtok.embed.ranking import rank_splits

    kg = KnowledgeGraph.from_arrays(entity_names=[f"e{i}" for i in range(6)], relation_names=["r"],
                                    train=np.array([[0, 0, 1]]), valid=np.array([[0, 0, 2]]),
                                    test=np.array([[0, 0, 3]]))
    preference = torch.tensor([0.0, 5.0, 3.0, 9.0, 1.0, 0.5])  # entity 3 (a test answer) scores best

    ranked, metrics = rank_splits(Preferring(preference), kg, reciprocal=False, batch_size=8, top_k=3,
                                  export_splits=("train", "valid", "test"))
    assert ranked["valid"].candidates[0].tolist() == [3, 2, 4]  # tail query (0, r, ?) of the valid triple
    assert ranked["train"].candidates[0].tolist() == [3, 1, 4]  # gold 1 kept; 2 (valid) filtered
    assert ranked["test"].candidates[0].tolist() == [3, 4, 5]  # test: train, valid and test answers filtered
    assert metrics["valid"]["tail"]["mrr"] == 1.0  # the valid metric stays the standard filtered one
    # LM-valid's lists (valid_eval): filtered as test's, so the test answer 3 is gone and the gold 2 ranks first.
    assert ranked["valid_eval"].candidates[0].tolist() == [2, 4, 5] and ranked["valid_eval"].rank[0] == 1.0
    assert ranked["valid"].rank[0] == 2.0
    # another test answer (5) of the test query is filtered from its list too, not only the query's own gold
    kg = KnowledgeGraph.from_arrays(entity_names=[f"e{i}" for i in range(6)], relation_names=["r"],
                                    train=np.array([[0, 0, 1]]), valid=np.array([[0, 0, 2]]),
                                    test=np.array([[0, 0, 3], [0, 0, 5]]))
    ranked, _ = rank_splits(Preferring(preference), kg, reciprocal=False, batch_size=8, top_k=3,
                            export_splits=("test",))
    assert ranked["test"].candidates[0].tolist() == [3, 4, 0] and "test_eval" not in ranked


def test_a_list_holds_no_filtered_entity_where_the_filter_leaves_fewer_than_k():
    """Stage 1's top-k of a query with fewer than k unfiltered entities ends in filtered ones (other true
    answers, scored -inf): the record lists only the unfiltered, and every ranker ranks the short list."""
    import torch

    from kgtok.data.graph import KnowledgeGraph
    from kgtok.embed.ranking import rank_splits
    from kgtok.llm.instruct import records_for_split
    from kgtok.llm.rankers import choose_fusion_weight, log_prior, prediction_row, rank_all

    kg = KnowledgeGraph.from_arrays(entity_names=[f"e{i}" for i in range(5)], relation_names=["r"],
                                    train=np.array([[1, 0, 0], [2, 0, 0], [4, 0, 0]]), valid=np.array([[4, 0, 1]]),
                                    test=np.array([[3, 0, 0]]))
    preference = torch.tensor([0.0, 5.0, 3.0, 1.0, 2.0])  # the known heads 1, 2, 4 of (?, r, e0) score best

    ranked, _ = rank_splits(Preferring(preference), kg, reciprocal=False, batch_size=8, top_k=3,
                            export_splits=("test",))
    head = int(np.flatnonzero(ranked["test"].direction == 1)[0])  # (?, r, e0): heads 1, 2, 4 are filtered
    assert ranked["test"].candidates[head].tolist()[:2] == [3, 0]
    assert np.isneginf(ranked["test"].candidate_scores[head, 2])  # a filtered head fills the third place
    records = records_for_split(kg, ranked["test"], "test", None, NeighbourIndex(kg), InstructConfig(top_k=3))
    short = next(r for r in records if r["direction"] == "head")
    assert short["candidates"] == [3, 0] and len(short["candidate_text"]) == 2
    assert all(np.isfinite(short["candidate_scores"]))
    full = next(r for r in records if r["direction"] == "tail")
    assert full["candidates"] == [1, 2, 4] and full["stage1_rank"] == 5.0  # (e3, r, ?): nothing filtered, gold last
    rows = [prediction_row(r, [[j] for j in range(len(r["candidates"]))],
                           [np.array([-1.0 - j]) for j in range(len(r["candidates"]))], 0, score="sum",
                           fusion_weight=1.0, classes=None) for r in (short, full)]
    ranks = rank_all(rows)
    assert ranks["rerank"].tolist() == [1.0, 5.0] and ranks["fused_rerank"].tolist() == [1.0, 5.0]
    chosen = choose_fusion_weight([np.array(row["scores"]) for row in rows],
                                  [log_prior(r["candidate_scores"]) for r in (short, full)],
                                  np.array([row["gold_index"] for row in rows]), np.array([1.0, 5.0]))
    assert chosen["curve"]["0.0"] == 0.6  # (1 + 1/5) / 2
    import warnings

    with warnings.catch_warnings():  # lists of older artifacts still hold -inf: w = 0 must not make 0 x -inf
        warnings.simplefilter("error")
        older = choose_fusion_weight([np.array([0.0, -1.0, -2.0])], [log_prior([1.0, 0.0, -np.inf])],
                                     np.array([0]), np.array([1.0]))
    assert older["curve"]["0.0"] == 1.0


def test_lm_valid_is_measured_as_test_is(inputs, tmp_path):
    """LM-valid records come from stage 1's lists under the standard filter (valid_eval), LM-train's from the
    training lists (train ∪ valid): on the synthetic KG some LM-valid gold ranks higher once test answers are
    filtered, and every LM-valid stage-1 rank is the standard filtered one."""
    from kgtok.embed.layout import EmbedArtifact
    from kgtok.embed.ranking import RankedQueries
    from kgtok.llm.instruct import query_id

    kg, embed, codes, _ = inputs
    config = InstructConfig(top_k=8, confidence_threshold=0.0, lm_valid_fraction=0.5)
    dest = run_instruct(config, kg, embed, tmp_path / "i", codes=codes, log=lambda *_: None)

    def ranks(split):
        ranked = RankedQueries.load(EmbedArtifact(embed).candidates(split))
        n = len(ranked.triples) // 2
        return {query_id("valid", i, n, d): (ranked.rank[i], ranked.candidates[i, :8].tolist())
                for i, d in enumerate(ranked.direction.tolist())}

    standard, training = ranks("valid_eval"), ranks("valid")
    valid = read(dest / "lm_valid.jsonl")
    assert all((r["stage1_rank"], r["candidates"]) == standard[r["id"]] for r in valid)
    assert any(standard[r["id"]][0] < training[r["id"]][0] for r in valid)  # a test answer was above the gold
    from_valid = [r for r in read(dest / "lm_train.jsonl") if r["split"] == "valid"]
    assert from_valid and all(r["stage1_rank"] == training[r["id"]][0] for r in from_valid)
    # Instructions written before (no mark among the manifest's inputs) are not reused: they are written again.
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["inputs"]["lm_valid_lists"] == "standard filter"
    del manifest["inputs"]["lm_valid_lists"]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    run_instruct(config, kg, embed, dest, codes=codes, log=lines.append)
    assert json.loads((dest / "manifest.json").read_text())["inputs"]["lm_valid_lists"] == "standard filter"


def test_an_older_stage1_artifact_gets_lm_valid_from_its_model(inputs, tmp_path):
    """Without valid_eval.npz (written before it existed) the artifact's model ranks LM-valid's queries: the
    same records as with the file; with no model either, the training lists and a warning."""
    import shutil

    kg, embed, codes, _ = inputs
    config = InstructConfig(top_k=8, lm_valid_fraction=0.5)
    expected = read(run_instruct(config, kg, embed, tmp_path / "new", codes=codes, log=lambda *_: None)
                    / "lm_valid.jsonl")
    older = tmp_path / "embed"
    shutil.copytree(embed, older)
    (older / "candidates" / "valid_eval.npz").unlink()
    lines = []
    got = read(run_instruct(config, kg, older, tmp_path / "old", codes=codes, log=lines.append) / "lm_valid.jsonl")
    assert [(r["id"], r["stage1_rank"], r["candidates"]) for r in got] == \
        [(r["id"], r["stage1_rank"], r["candidates"]) for r in expected]
    assert np.allclose([r["candidate_scores"] for r in got], [r["candidate_scores"] for r in expected], atol=1e-4)
    assert not any("LM-valid keeps the training lists" in line for line in lines)
    (older / "model.pt").unlink()
    got = read(run_instruct(config, kg, older, tmp_path / "none", codes=codes, log=lines.append)
               / "lm_valid.jsonl")
    assert any("LM-valid keeps the training lists" in line for line in lines)
    assert [r["id"] for r in got] == [r["id"] for r in expected]


def test_gold_positions_and_calibrated_order():
    from kgtok.llm.instruct import calibrated, gold_positions

    # ranks within a 4-list (a realistic rank 2.5 stands at the third place); 9 lies outside and is not counted
    assert gold_positions(np.array([1.0, 1.0, 2.0, 2.5, 9.0]), 4).tolist() == [0.5, 0.25, 0.25, 0.0]
    assert gold_positions(np.array([9.0]), 4).tolist() == [0.25] * 4  # no gold listed: every place alike
    order = calibrated(np.random.default_rng(0), np.array([0.0, 0.0, 1.0, 0.0]))
    candidates = [7, 8, 9, 5]  # the gold 5 last; it must move to the third place, the others keep their order
    assert [candidates[j] for j in order(5, candidates)] == [7, 8, 5, 9]
    assert order(6, candidates).tolist() == [0, 1, 2, 3]  # the gold outside the list: stage 1's order
    draws = calibrated(np.random.default_rng(1), np.array([0.7, 0.2, 0.1, 0.0]))
    places = [draws(9, candidates).tolist().index(2) for _ in range(4000)]
    assert np.bincount(places, minlength=4) / 4000 == pytest.approx([0.7, 0.2, 0.1, 0.0], abs=0.03)


@pytest.fixture(scope="module")
def embed_all(inputs):
    """Stage 1 of the fixture's KG with every split's lists exported (training queries' too)."""
    kg, _, _, root = inputs
    return run_embed(EmbedConfig(dim=16, max_steps=60, eval_every=30, batch_size=256, threads=1, top_k=8),
                     kg, root / "embed-all", progress=False, log=lambda *_: None)


def test_calibrated_lists_put_the_gold_first_as_test_lists_do(inputs, embed_all, tmp_path):
    """list_order=calibrated: every LM-train list (validation and training queries) lists the others in stage
    1's order with the gold at a drawn place, and puts it first about as often as the standard-filter lists do;
    LM-valid and test are untouched."""
    from kgtok.embed.layout import EmbedArtifact
    from kgtok.embed.ranking import RankedQueries
    from kgtok.llm.instruct import gold_positions

    kg, _, codes, _ = inputs
    base = dict(top_k=8, confidence_threshold=0.0, train_from_train_queries=True, train_queries=200)
    plain = run_instruct(InstructConfig(**base), kg, embed_all, tmp_path / "p", codes=codes, log=lambda *_: None)
    dest = run_instruct(InstructConfig(**base, list_order="calibrated"), kg, embed_all, tmp_path / "c",
                        codes=codes, log=lambda *_: None)
    for name in ("lm_valid", "test"):
        assert (dest / f"{name}.jsonl").read_text() == (plain / f"{name}.jsonl").read_text()
    stage1 = {split: RankedQueries.load(EmbedArtifact(embed_all).candidates(split)) for split in ("valid", "train")}
    lists = {}
    for split, ranked in stage1.items():
        n = len(ranked.triples) // 2
        for i, d in enumerate(ranked.direction.tolist()):
            lists[f"{split}-{i % n}-{'tail' if d == 0 else 'head'}"] = ranked.candidates[i, :8].tolist()
    train = read(dest / "lm_train.jsonl")
    assert {r["split"] for r in train} == {"valid", "train"}
    moved = {"valid": 0, "train": 0}
    for record in train:
        listed = lists[record["id"]]
        assert sorted(record["candidates"]) == sorted(listed)
        assert [c for c in record["candidates"] if c != record["gold"]] == [c for c in listed if c != record["gold"]]
        moved[record["split"]] += record["candidates"].index(record["gold"]) != listed.index(record["gold"])
    assert moved["valid"] > 0 and moved["train"] > 0 and sum(moved.values()) > len(train) // 4
    standard = RankedQueries.load(EmbedArtifact(embed_all).candidates("valid_eval"))
    expected = gold_positions(standard.rank, 8)[0]
    first = np.mean([r["candidates"][0] == r["gold"] for r in train])
    assert abs(first - expected) < 4 * np.sqrt(expected * (1 - expected) / len(train)) + 1e-9
    manifest = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert manifest["lm_train_gold_first"] == pytest.approx(first)


def test_calibrated_lists_need_the_standard_filter_lists(inputs, tmp_path):
    import shutil

    kg, embed, codes, _ = inputs
    older = tmp_path / "embed"
    shutil.copytree(embed, older)
    (older / "candidates" / "valid_eval.npz").unlink()
    (older / "model.pt").unlink()
    with pytest.raises(ValueError, match="list_order=calibrated needs"):
        run_instruct(InstructConfig(top_k=8, list_order="calibrated"), kg, older, tmp_path / "i", codes=codes,
                     log=lambda *_: None)
    assert not (tmp_path / "i").exists()


def test_a_warning_when_lm_train_trusts_rank_1_unlike_lm_valid(inputs, embed_all, tmp_path):
    """Training queries' lists in stage 1's order put the gold first almost always (stage 1 has seen it), far more
    often than LM-valid's: 5a says so; with no LM-valid list it has nothing to compare and stays quiet."""
    kg, _, codes, _ = inputs
    lines = []
    config = InstructConfig(top_k=8, train_from_train_queries=True, train_queries=400,
                            shuffle_train_query_candidates=False)
    dest = run_instruct(config, kg, embed_all, tmp_path / "i", codes=codes, log=lines.append)
    shares = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert shares["lm_train_gold_first"] - shares["lm_valid_gold_first"] > 0.2
    assert any("warning: the gold is stage 1's first candidate" in line for line in lines)
    lines.clear()
    dest = run_instruct(InstructConfig(top_k=8, lm_valid_fraction=0.0), kg, embed_all, tmp_path / "n", codes=codes,
                        log=lines.append)
    assert json.loads((dest / "manifest.json").read_text())["metrics"]["lm_valid_gold_first"] is None
    assert not any("warning" in line for line in lines)


def test_negatives_end_where_a_side_has_no_free_corruption(tmp_path):
    """A query whose every other answer is known (Nations, UMLS have such) looped for ever on its drawn side:
    it now takes a free corruption from the other side; a triple with none on either side is named."""
    from conftest import write_lines

    from kgtok.llm.classify import corrupt

    directory = tmp_path / "kg"
    directory.mkdir()
    # (x, r, ?) has every entity but x as a known tail: its tail side has no free corruption
    write_lines(directory / "train.txt", ["x\tr\ta", "x\tr\tb", "x\tr\tc", "a\ts\tb"])
    write_lines(directory / "valid.txt", ["b\ts\tc"])
    write_lines(directory / "test.txt", ["x\tr\ty", "y\ts\ta"])
    kg = load_kg(directory)
    x, r, y = kg.entity_to_id["x"], kg.relation_to_id["r"], kg.entity_to_id["y"]
    known = {tuple(t) for t in kg.all_triples.tolist()}
    for seed in range(6):  # either side may be drawn first
        (negative,), made = corrupt(kg, np.array([[x, r, y]]), np.random.default_rng(seed))
        assert tuple(negative.tolist()) not in known and negative[0] != negative[2] and negative[1] == r
        assert made.tolist() == [0]
    # no free corruption on either side: (x, r, ?) and (?, r, a) are all known
    write_lines(directory / "train.txt", ["x\tr\ta", "x\tr\tb", "x\tr\tc", "a\ts\tb", "b\tr\ta", "c\tr\ta",
                                          "y\tr\ta"])
    write_lines(directory / "test.txt", ["x\tr\ty", "y\ts\ta", "a\tr\ta"])
    kg = load_kg(directory)
    x, r, a, y = kg.entity_to_id["x"], kg.relation_to_id["r"], kg.entity_to_id["a"], kg.entity_to_id["y"]
    with pytest.warns(UserWarning, match="1 of 2 triples have no negative"):
        negatives, made = corrupt(kg, np.array([[x, r, y], [x, r, a]]), np.random.default_rng(0))
    assert made.tolist() == [0] and len(negatives) == 1
