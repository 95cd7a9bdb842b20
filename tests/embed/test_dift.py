"""DIFT's candidate files: kgtok's candidates written in DIFT's layout read back the same; DIFT's own files
(hand-written here in the layout of its data_construct.py) become a stage-1 artifact that `instruct` takes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, RankedQueries, run_embed
from kgtok.embed.dift import dift_records, import_dift, ranked_from_dift, write_dift


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("dift")
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=200, seed=2), root / "kg"))
    embed = run_embed(EmbedConfig(dim=8, max_steps=20, eval_every=10, batch_size=256, threads=1, top_k=6,
                                  export_splits=("valid", "test")), kg, root / "embed", progress=False, log=quiet)
    return kg, embed, root


def test_round_trip_gives_the_same_candidates(stage1, tmp_path):
    kg, embed, _ = stage1
    write_dift(embed, kg, tmp_path / "dift")
    records = json.loads((tmp_path / "dift" / "test.json").read_text())
    first, second = records[0], records[1]  # one triple: its tail query, then its head query
    assert first["inverse"] is False and second["inverse"] is True
    assert second["triplet"] == first["triplet"][::-1] and (first["query_id"], second["query_id"]) == (1, 0)
    assert len(first["topk_ents"]) == len(first["topk_names"]) == len(first["topk_scores"]) == 6
    import_dift(kg, tmp_path / "dift", tmp_path / "back", config=_test_files_only(), log=quiet)
    original = RankedQueries.load(embed / "candidates" / "test.npz")
    back = RankedQueries.load(tmp_path / "back" / "candidates" / "test.npz")
    for field in ("triples", "direction", "gold", "candidates"):
        np.testing.assert_array_equal(getattr(back, field), getattr(original, field))
    np.testing.assert_array_equal(back.candidate_scores, original.candidate_scores)
    np.testing.assert_array_equal(back.rank, np.round(original.rank))  # DIFT's ranks are integers


def test_short_lists_never_list_filtered_answers(stage1, tmp_path):
    """Stage 1 pads a list the filter left short with other true answers scored -inf; DIFT's file must not
    list them (nor hold -Infinity, which is not JSON), and reading it back pads the list again."""
    kg, embed, _ = stage1
    ranked = RankedQueries.load(embed / "candidates" / "test.npz")
    ranked.candidate_scores[0, 4:] = -np.inf  # as if the filter had left 4 entities
    records = dift_records(ranked, kg)
    json.dumps(records, allow_nan=False)
    assert records[0]["entity_ids"] == ranked.candidates[0, :4].tolist() and len(records[0]["topk_scores"]) == 4
    assert len(records[2]["entity_ids"]) == 6  # the next triple's tail query is whole
    back = ranked_from_dift(records, kg, tmp_path / "test.json")
    np.testing.assert_array_equal(back.candidates[0, :4], ranked.candidates[0, :4])
    assert np.isneginf(back.candidate_scores[0, 4:]).all() and np.isfinite(back.candidate_scores[1:]).all()


def _test_files_only():
    from kgtok.embed.dift import DiftImportConfig

    return DiftImportConfig(valid_files=("valid.json",), test_files=("test.json",))


def test_dift_files_feed_the_instructions(stage1, tmp_path):
    """Hand-written files in DIFT's layout (raw ids, head query as [t, r, h]); a triple whose head query
    DIFT's threshold dropped is left out, as kgtok pairs the two queries of a triple."""
    from kgtok.llm import InstructConfig, run_instruct

    kg, _, _ = stage1
    (h, r, t), (h2, r2, t2) = kg.test[:2].tolist()
    e, rel = kg.entity_names, kg.relation_names
    others = [x for x in e if x not in (e[h], e[t], e[h2], e[t2])][:2]

    def query(triple, inverse, answer, query_id):
        listed = [answer, *others]
        return {"triplet": triple, "inverse": inverse, "rank": 1, "topk_ents": listed,
                "topk_names": listed, "topk_scores": [0.9, 0.05, 0.01], "query_id": query_id,
                "entity_ids": [0, 1, 2], "input": "(DIFT's prompt)", "output": "(name)"}

    dift = tmp_path / "released"
    dift.mkdir()
    test = [query([e[h], rel[r], e[t]], False, e[t], 1), query([e[t], rel[r], e[h]], True, e[h], 0),
            query([e[h2], rel[r2], e[t2]], False, e[t2], 3)]  # its head query is missing
    (dift / "test.json").write_text(json.dumps(test))
    (dift / "valid.json").write_text(json.dumps(test[:2]))
    art = import_dift(kg, dift, tmp_path / "stage1", config=_test_files_only(), log=quiet)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["stage"] == "embed" and manifest["metrics"]["test_unpaired_dropped"] == 1
    ranked = RankedQueries.load(art / "candidates" / "test.npz")
    assert ranked.triples.tolist() == [[h, r, t], [h, r, t]] and ranked.direction.tolist() == [0, 1]
    assert ranked.candidates[0].tolist() == [t, *(e.index(o) for o in others)]
    lines = []
    out = run_instruct(InstructConfig(ids="none", top_k=3, neighbours=1), kg, art, tmp_path / "inst",
                       log=lines.append)
    records = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert [rec["gold"] for rec in records] == [t, h] and all(rec["stage1_rank"] == 1 for rec in records)
    # DIFT's valid lists serve LM-valid as given (no model to rank them again, and no warning about it)
    assert (art / "candidates" / "valid_eval.npz").exists() and not any("warning" in line for line in lines)


def test_bad_dift_file_names_file_and_record(stage1, tmp_path):
    kg, _, _ = stage1
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.json").write_text(json.dumps([{"triplet": ["nobody", "r", "x"], "inverse": False,
                                                            "rank": 1, "topk_ents": [], "topk_scores": []}]))
    with pytest.raises(ValueError, match=r"test.json: record 0 .*'nobody' is not in the KG"):
        import_dift(kg, tmp_path / "d", tmp_path / "o", config=_test_files_only(), log=quiet)
    (tmp_path / "d" / "test.json").write_text("{not json")
    with pytest.raises(ValueError, match="test.json: not a JSON list of DIFT records"):
        import_dift(kg, tmp_path / "d", tmp_path / "o", config=_test_files_only(), log=quiet)
    (tmp_path / "d" / "test.json").write_text("[5]")  # was AttributeError: 'int' object has no attribute 'get'
    with pytest.raises(ValueError, match=r"test.json: record 0: 5 is not a JSON object"):
        import_dift(kg, tmp_path / "d", tmp_path / "o", config=_test_files_only(), log=quiet)


def test_export_checks_every_split_before_writing(stage1, tmp_path):
    """--splits valid,tset wrote valid.json, then failed on tset (and told to export a split named tset)."""
    kg, embed, _ = stage1
    with pytest.raises(ValueError, match="--splits: tset: expected some of train, valid, test"):
        write_dift(embed, kg, tmp_path / "dift", splits=("valid", "tset"))
    assert not (tmp_path / "dift").exists()


def test_export_refuses_a_stage1_artifact_in_another_entity_order(stage1, tmp_path):
    """Its candidate ids are rows of its own order: read as the KG's they named other entities."""
    import shutil

    kg, embed, _ = stage1
    moved = tmp_path / "embed"
    shutil.copytree(embed, moved)
    names = [row.split("\t")[1] for row in (moved / "entities.tsv").read_text().splitlines()]
    names[0], names[1] = names[1], names[0]
    (moved / "entities.tsv").write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(names)))
    with pytest.raises(ValueError, match="entity order differs"):
        write_dift(moved, kg, tmp_path / "dift")
