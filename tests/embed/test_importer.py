"""Embeddings trained elsewhere become the same artifact as trained ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kgtok.data import KGFormatError, load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, RankedQueries, run_embed
from kgtok.embed.importer import ImportConfig, import_embeddings, read_order


def test_import_reorders_rows_and_reproduces_ranking(tmp_path):
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=200, seed=2), tmp_path / "kg"))
    config = EmbedConfig(model="rotate", dim=8, max_steps=30, eval_every=30, num_negatives=8, batch_size=128,
                         threads=1, top_k=5, export_splits=("test",), margin=6.0)
    trained = run_embed(config, kg, tmp_path / "trained", progress=False, log=lambda *_: None)
    entities = np.load(trained / "entity_embeddings.npy")
    relations = np.load(trained / "relation_embeddings.npy")
    # A foreign tool stores rows in another order, RotatE-style relation params (not phases).
    rng = np.random.default_rng(0)
    perm = rng.permutation(kg.num_entities)
    np.save(tmp_path / "ent.npy", entities[perm])
    (tmp_path / "entities.dict").write_text("".join(f"{i}\t{kg.entity_names[p]}\n" for i, p in enumerate(perm)))
    bound = (6.0 + 2.0) / 8
    np.save(tmp_path / "rel.npy", relations * bound / np.pi)
    (tmp_path / "relations.txt").write_text("".join(f"{n}\n" for n in kg.relation_names))
    imported = import_embeddings(
        kg, tmp_path / "ent.npy", tmp_path / "entities.dict", tmp_path / "imported",
        relation_vectors=tmp_path / "rel.npy", relation_order=tmp_path / "relations.txt",
        config=ImportConfig(model="rotate", margin=6.0, top_k=5, export_splits=("test",), threads=1),
        progress=False, log=lambda *_: None,
    )
    np.testing.assert_allclose(np.load(imported / "entity_embeddings.npy"), entities)
    a = RankedQueries.load(trained / "candidates" / "test.npz")
    b = RankedQueries.load(imported / "candidates" / "test.npz")
    np.testing.assert_array_equal(a.candidates, b.candidates)
    np.testing.assert_allclose(a.rank, b.rank)
    assert json.loads((imported / "manifest.json").read_text())["stage"] == "embed"


def test_import_vectors_only_and_errors(tmp_path):
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=200, seed=2), tmp_path / "kg"))
    vectors = np.arange(kg.num_entities * 3, dtype=np.float32).reshape(-1, 3)
    np.save(tmp_path / "v.npy", vectors[::-1])
    (tmp_path / "order.txt").write_text("".join(f"{n}\n" for n in reversed(kg.entity_names)))
    said: list[str] = []
    dest = import_embeddings(kg, tmp_path / "v.npy", tmp_path / "order.txt", tmp_path / "out", log=said.append)
    np.testing.assert_array_equal(np.load(dest / "entity_embeddings.npy"), vectors)
    assert said == [f"embed import: {kg.num_entities} x 3 entity vectors, no ranking (needs model= and relations) "
                    f"-> {tmp_path / 'out'}"]  # it said nothing at all
    (tmp_path / "short.txt").write_text("".join(f"{n}\n" for n in kg.entity_names[:-1]) + "stranger\n")
    with pytest.raises(ValueError, match=r"1 entity\(s\) of the KG have no vector"):
        import_embeddings(kg, tmp_path / "v.npy", tmp_path / "short.txt", tmp_path / "out2", log=lambda *_: None)
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ValueError, match="needs relation_vectors"):
        import_embeddings(kg, tmp_path / "v.npy", tmp_path / "order.txt", tmp_path / "out3",
                          config=ImportConfig(model="transe"), log=lambda *_: None)
    (tmp_path / "bad.dict").write_text("0\ta\nx\tb\n")
    with pytest.raises(KGFormatError, match=r"bad.dict:2: expected an integer"):
        read_order(tmp_path / "bad.dict")


def test_a_reciprocal_relation_matrix_without_reciprocal_true_says_so():
    """kgtok's own relation_embeddings.npy after 1-vs-all training has 2R rows: the error said only "48 rows but
    the order file lists 24 relations"."""
    from kgtok.embed.importer import align_rows

    with pytest.raises(ValueError, match="reciprocal relations after the originals.*give reciprocal=true"):
        align_rows(np.zeros((4, 3)), ["r", "s"], ["r", "s"], what="relation", source="rel.npy")
    with pytest.raises(ValueError, match=r"5 rows but the order file lists 2 relations$"):
        align_rows(np.zeros((5, 3)), ["r", "s"], ["r", "s"], what="relation", source="rel.npy")


def test_vectors_that_are_not_a_matrix_of_finite_numbers_are_refused():
    """A 1-D or 3-D entity array imported with exit 0 and broke the hierarchy later (IndexError traceback)."""
    from kgtok.embed.importer import align_rows

    for bad in (np.zeros(2), np.zeros((2, 3, 1))):
        with pytest.raises(ValueError, match=r"v.npy: entity vectors of shape .*expected a 2-D array of numbers"):
            align_rows(bad, ["a", "b"], ["a", "b"], what="entity", source="v.npy")
    with pytest.raises(ValueError, match=r"v.npy: 1 entity row\(s\) hold NaN or infinite values"):
        align_rows(np.array([[0.0, np.nan], [1.0, 2.0]]), ["a", "b"], ["a", "b"], what="entity", source="v.npy")
