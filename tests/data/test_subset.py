"""Snowball sub-KGs: connected, closed under the kept entities, text carried along, written atomically."""

from __future__ import annotations

import numpy as np
import pytest

from kgtok.data.graph import load_kg
from kgtok.data.subset import snowball_entities, write_subset


def test_snowball_on_a_path_takes_a_connected_stretch():
    # 0-1-2-...-9 as a path: any 4 entities reached by BFS layers from one seed are consecutive
    train = np.array([[i, 0, i + 1] for i in range(9)])
    for seed in range(10):
        chosen = snowball_entities(train, 10, 4, seeds=1, rng=np.random.default_rng(seed))
        assert len(chosen) == 4 and np.all(np.diff(chosen) == 1), chosen


def test_snowball_restarts_in_another_component():
    train = np.array([[0, 0, 1], [2, 0, 3], [3, 0, 4]])  # components {0,1}, {2,3,4}
    chosen = snowball_entities(train, 5, 5, seeds=1, rng=np.random.default_rng(0))
    assert chosen.tolist() == [0, 1, 2, 3, 4]
    chosen = snowball_entities(train, 5, 3, seeds=1, rng=np.random.default_rng(1))
    assert len(chosen) == 3


def test_written_subset_is_closed_and_keeps_text(make_kg, tmp_path):
    train = [(f"e{i}", "r", f"e{i + 1}") for i in range(30)] + [("e0", "s", "e5"), ("e10", "s", "e20")]
    valid = [("e2", "s", "e4"), ("e25", "s", "e28"), ("e1", "unseen_rel", "e3")]
    test = [("e3", "r", "e9"), ("e4", "r", "e6")]
    text = [f"e{i}\tlabel {i}\tthe {i}th entity" for i in range(31)]
    source = make_kg(train, valid, test, entity_text__tsv=text)
    dest = write_subset(source, tmp_path / "sub", entities=12, seed=3)
    sub, full = load_kg(dest), load_kg(source)
    assert sub.num_entities <= 12
    kept = set(sub.entity_names)

    def named(kg, split):
        return {(kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]) for h, r, t in kg.triples[split].tolist()}

    for split in ("train", "valid", "test"):
        original = named(full, split)
        inside = named(sub, split)
        assert inside <= original  # nothing invented
        if split == "train":  # every training triple among the kept entities is kept
            assert inside == {t for t in original if t[0] in kept and t[2] in kept}
        else:  # valid/test only with train-seen entities and relations
            seen_r = {r for _, r, _ in named(sub, "train")}
            assert all(r in seen_r for _, r, _ in inside)
    assert not sub.report.unseen_entity_triples.get("valid") and not sub.report.unseen_entity_triples.get("test")
    for i, name in enumerate(sub.entity_names):
        assert sub.labels[i] == f"label {name[1:]}" and sub.descriptions[i] == f"the {name[1:]}th entity"
    # same seed, same subset
    again = write_subset(source, tmp_path / "again", entities=12, seed=3)
    assert (again / "train.txt").read_text() == (dest / "train.txt").read_text()


def test_failed_subset_leaves_the_old_one(make_kg, tmp_path):
    source = make_kg()
    dest = write_subset(source, tmp_path / "sub", entities=3)
    before = (dest / "train.txt").read_text()
    with pytest.raises(ValueError, match="entities"):
        write_subset(source, dest, entities=1)
    assert (dest / "train.txt").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sub")] == []


def test_subset_with_an_empty_split_is_refused_before_writing(tmp_path):
    """A 3-entity stretch of a 21-entity path cannot hold both the valid and the test triple: load_kg would
    refuse the empty split, so nothing is written."""
    source = tmp_path / "kg"
    source.mkdir()
    (source / "train.txt").write_text("".join(f"e{i}\tr\te{i + 1}\n" for i in range(20)))
    (source / "valid.txt").write_text("e10\tr\te12\n")
    (source / "test.txt").write_text("e15\tr\te17\n")
    with pytest.raises(ValueError, match="has no (valid|test).*ask for more entities"):
        write_subset(source, tmp_path / "sub", entities=3, seeds=1)
    assert not (tmp_path / "sub").exists()


def test_subset_never_replaces_a_directory_it_did_not_write(make_kg, tmp_path):
    source = make_kg()
    before = (source / "train.txt").read_text()
    with pytest.raises(FileExistsError, match="not a subset kgtok wrote"):
        write_subset(source, source, entities=3)
    assert (source / "train.txt").read_text() == before
