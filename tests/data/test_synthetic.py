"""Invariants of the synthetic KG generator (kgtok.data.synthetic)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from kgtok.data import synthetic
from kgtok.data.synthetic import SyntheticConfig, SyntheticKG, generate, write_synthetic

FILES = ("train.txt", "valid.txt", "test.txt", "entity_text.tsv", "entity_types.tsv", "synthetic.json")


@pytest.fixture(scope="module")
def kg() -> SyntheticKG:
    return generate(SyntheticConfig())


def all_triples(kg: SyntheticKG) -> np.ndarray:
    return np.concatenate([kg.train, kg.valid, kg.test])


def in_type(kg: SyntheticKG, entities: np.ndarray, level: int, type_id: int) -> np.ndarray:
    """Whether each entity lies in the type (level -1 = every entity)."""
    if level < 0:
        return np.ones(len(entities), dtype=bool)
    return kg.types[entities, level] == type_id


# ---------------------------------------------------------------- determinism


def test_same_config_gives_equal_graphs(kg: SyntheticKG) -> None:
    again = generate(SyntheticConfig())
    for name in ("types", "train", "valid", "test", "relation_domain", "relation_range"):
        np.testing.assert_array_equal(getattr(kg, name), getattr(again, name), err_msg=name)
    for name in ("entity_names", "relation_names", "labels", "descriptions", "type_names", "relation_kinds"):
        assert getattr(kg, name) == getattr(again, name), name


def test_write_twice_gives_identical_bytes(tmp_path: Path) -> None:
    config = SyntheticConfig(num_entities=300, seed=3)
    a = write_synthetic(config, tmp_path / "a")
    b = write_synthetic(config, tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_files_do_not_depend_on_the_write_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are turned into text a chunk at a time (bounded memory at 1M entities); chunk edges change no byte."""
    config = SyntheticConfig(num_entities=300, seed=3)
    whole = write_synthetic(config, tmp_path / "whole")
    monkeypatch.setattr(synthetic, "_WRITE_CHUNK", 7)
    chunked = write_synthetic(config, tmp_path / "chunked")
    for name in FILES:
        assert (whole / name).read_bytes() == (chunked / name).read_bytes(), name


def test_sizes_up_to_two_million_entities() -> None:
    assert SyntheticConfig(num_entities=2_000_000).num_entities == 2_000_000  # bench/scale.py generates 1M
    with pytest.raises(ValueError, match=r"num_entities=2000001: expected an integer in \[200, 2000000\]"):
        SyntheticConfig(num_entities=2_000_001)


def test_different_seed_differs(kg: SyntheticKG) -> None:
    other = generate(SyntheticConfig(seed=1))
    assert not np.array_equal(kg.types, other.types)
    assert kg.train.shape != other.train.shape or not np.array_equal(kg.train, other.train)
    assert kg.labels != other.labels


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("num_entities", [200, 20000])
def test_sizes_match_config(num_entities: int) -> None:
    config = SyntheticConfig(num_entities=num_entities)
    start = time.perf_counter()
    kg = generate(config)
    seconds = time.perf_counter() - start
    assert seconds < 5.0, f"{num_entities} entities took {seconds:.1f}s"  # about 0.4 s for 20000
    n_total = len(all_triples(kg))
    expected = num_entities * config.triples_per_entity / 2
    # Tolerance 10%: small domains can run out of distinct pairs; coverage adds a few.
    assert abs(n_total - expected) <= 0.1 * expected, (n_total, expected)
    # Held-out splits are rounded shares of the total (+-1 triple).
    assert abs(len(kg.valid) - config.valid_fraction * n_total) <= 1
    assert abs(len(kg.test) - config.test_fraction * n_total) <= 1
    assert len(kg.entity_names) == len(kg.labels) == len(kg.descriptions) == num_entities
    assert len(kg.relation_names) == config.num_relations
    assert kg.types.shape == (num_entities, len(config.branching))
    for split in (kg.train, kg.valid, kg.test):
        assert split.dtype == np.int64 and split.ndim == 2 and split.shape[1] == 3


@pytest.mark.parametrize("branching", [(8,), (10, 6), (2, 2, 2, 2, 2)])
def test_other_taxonomy_shapes(branching: tuple[int, ...]) -> None:
    kg = generate(SyntheticConfig(num_entities=400, branching=branching, num_relations=6))
    assert kg.types.shape == (400, len(branching))
    assert [len(names) for names in kg.type_names] == [int(np.prod(branching[: i + 1])) for i in range(len(branching))]
    assert all(len(set(names)) == len(names) for names in kg.type_names)
    assert set(kg.train[:, [0, 2]].ravel().tolist()) == set(range(400))
    assert abs(len(all_triples(kg)) - 400 * 6) <= 0.1 * 400 * 6


def test_config_reports_every_violation() -> None:
    with pytest.raises(ValueError) as err:
        SyntheticConfig(num_entities=100, noise=1.5, branching=(1, 4), seed=-1)
    message = str(err.value)
    for name in ("num_entities", "noise", "branching", "seed"):
        assert name in message
    with pytest.raises(ValueError, match="leaf groups"):
        SyntheticConfig(num_entities=200, branching=(8, 8, 8))


def test_every_split_gets_triples_or_the_config_is_refused(tmp_path: Path) -> None:
    """An empty valid or test file is one load_kg refuses: a zero fraction is refused, a tiny one still gives a
    triple, and one relation (every triple some entity's only mention, all kept in train) is named."""
    from kgtok.data import load_kg

    with pytest.raises(ValueError, match=r"valid_fraction.*\(0, 0.3\]"):
        SyntheticConfig(valid_fraction=0.0)
    tiny = generate(SyntheticConfig(num_entities=200, test_fraction=1e-4))
    assert len(tiny.test) == 1 and len(tiny.valid) > 1
    load_kg(write_synthetic(SyntheticConfig(num_entities=200, test_fraction=1e-4), tmp_path / "tiny"))
    with pytest.raises(ValueError, match="none is left for valid and test; raise num_relations"):
        generate(SyntheticConfig(num_entities=200, num_relations=1))


# ---------------------------------------------------------------- triples


def test_no_duplicate_triples(kg: SyntheticKG) -> None:
    triples = all_triples(kg)
    assert len(np.unique(triples, axis=0)) == len(triples)
    assert np.all(triples[:, 0] != triples[:, 2]), "self loops"


def test_heldout_entities_and_relations_occur_in_train(kg: SyntheticKG) -> None:
    train_entities = set(kg.train[:, [0, 2]].ravel().tolist())
    assert train_entities == set(range(kg.num_entities)), "every entity occurs in train"
    assert set(kg.train[:, 1].tolist()) == set(range(kg.num_relations))
    for split in (kg.valid, kg.test):
        assert len(split) > 0
        assert set(split[:, [0, 2]].ravel().tolist()) <= train_entities
    assert len(kg.valid) + len(kg.test) > 0.05 * len(all_triples(kg))


def test_heads_in_domain_and_tails_in_range(kg: SyntheticKG) -> None:
    triples = all_triples(kg)
    assert kg.relation_domain.shape == kg.relation_range.shape == (kg.num_relations, 2)
    assert kg.relation_kinds.count("hierarchy") == 1
    assert "same_type" in kg.relation_kinds and "cross_type" in kg.relation_kinds
    for r in range(kg.num_relations):
        h, t = triples[triples[:, 1] == r][:, [0, 2]].T
        (dl, dt), (rl, rt) = kg.relation_domain[r], kg.relation_range[r]
        # Noise (5%) only moves tails; heads are always drawn from the domain.
        assert in_type(kg, h, dl, dt).mean() >= 0.9, kg.relation_names[r]
        assert in_type(kg, t, rl, rt).mean() >= 0.9, kg.relation_names[r]
        if kg.relation_kinds[r] == "same_type":
            assert (dl, dt) == (rl, rt)
            # Tails prefer the head's own fine group: the hierarchy shows in the graph.
            assert (kg.types[h, -1] == kg.types[t, -1]).mean() > 0.4, kg.relation_names[r]
        if kg.relation_kinds[r] == "cross_type":
            assert dl >= 0 and rl >= 0
            assert not np.any(in_type(kg, h, rl, rt) & in_type(kg, h, dl, dt)), "domain and range overlap"


def test_hierarchy_relation_points_to_group_members(kg: SyntheticKG) -> None:
    triples = all_triples(kg)
    r = kg.relation_kinds.index("hierarchy")
    h, t = triples[triples[:, 1] == r][:, [0, 2]].T
    assert len(h) > 0.1 * kg.num_entities
    same_top = kg.types[h, 0] == kg.types[t, 0]
    assert same_top.mean() >= 0.9
    assert (kg.types[h, -1] == kg.types[t, -1]).mean() > 0.5, "mostly the fine group's hub"
    assert len(np.unique(t)) < 0.2 * len(t), "tails are few hubs"


# ---------------------------------------------------------------- taxonomy and text


def test_types_form_a_tree(kg: SyntheticKG) -> None:
    branching = kg.config.branching
    types = kg.types
    assert types.dtype == np.int64 and types.shape[1] == len(branching)
    for level in range(1, len(branching)):
        np.testing.assert_array_equal(types[:, level] // branching[level], types[:, level - 1])
    for level, names in enumerate(kg.type_names):
        assert len(names) == int(np.prod(branching[: level + 1]))
        assert len(set(names)) == len(names)
        if level:
            parents = kg.type_names[level - 1]
            assert all(name.startswith(parents[i // branching[level]] + "/") for i, name in enumerate(names))
    # Every leaf group has at least two members; ids do not follow types.
    assert np.bincount(types[:, -1], minlength=len(kg.type_names[-1])).min() >= 2
    assert not np.all(np.diff(types[:, 0]) >= 0)


def test_text_names_the_type(kg: SyntheticKG) -> None:
    assert kg.type_names[0][:4] == ["animal", "plant", "mineral", "building"]
    words = [[name.rsplit("/", 1)[-1].replace("_", " ") for name in names] for names in kg.type_names]
    for e in range(0, kg.num_entities, 97):
        top, sub, fine = (words[level][kg.types[e, level]] for level in range(3))
        assert fine in kg.labels[e]
        assert f"{fine}, a kind of {sub}, which is" in kg.descriptions[e] and top in kg.descriptions[e]
    # Unique but for the duplicate_labels share, which copies within the fine group.
    n_dup = kg.num_entities - len(set(kg.labels))
    assert 0 < n_dup <= kg.config.duplicate_labels * kg.num_entities
    unique = generate(SyntheticConfig(num_entities=300, duplicate_labels=0.0))
    assert len(set(unique.labels)) == 300
    for text in kg.labels + kg.descriptions + kg.relation_names:
        assert text.isascii() and "\t" not in text and "\n" not in text and text.strip() == text


# ---------------------------------------------------------------- files


def test_file_layout(tmp_path: Path) -> None:
    config = SyntheticConfig(num_entities=300, seed=5)
    dest = write_synthetic(config, tmp_path / "kg")
    kg = generate(config)
    assert dest == tmp_path / "kg"
    entity = {name: i for i, name in enumerate(kg.entity_names)}
    relation = {name: i for i, name in enumerate(kg.relation_names)}
    for split in ("train", "valid", "test"):
        data = (dest / f"{split}.txt").read_bytes()
        assert b"\r" not in data and data.endswith(b"\n")
        rows = [line.split("\t") for line in data.decode("ascii").splitlines()]
        assert all(len(row) == 3 for row in rows)
        parsed = np.array([[entity[h], relation[r], entity[t]] for h, r, t in rows], dtype=np.int64)
        np.testing.assert_array_equal(parsed, getattr(kg, split))
    text_rows = [line.split("\t") for line in (dest / "entity_text.tsv").read_text("ascii").splitlines()]
    assert text_rows == [[e, label, desc] for e, label, desc in zip(kg.entity_names, kg.labels, kg.descriptions)]
    type_rows = [line.split("\t") for line in (dest / "entity_types.tsv").read_text("ascii").splitlines()]
    assert len(type_rows) == kg.num_entities
    for e, row in enumerate(type_rows):
        assert row[0] == kg.entity_names[e]
        assert row[1:] == [kg.type_names[level][kg.types[e, level]] for level in range(kg.levels)]
    saved = json.loads((dest / "synthetic.json").read_text())
    assert saved["num_entities"] == 300 and saved["branching"] == [4, 4, 4] and saved["seed"] == 5


def test_existing_destination(tmp_path: Path) -> None:
    config = SyntheticConfig(num_entities=200)
    dest = write_synthetic(config, tmp_path / "kg")
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert write_synthetic(config, dest) == dest  # same config: left as it is
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    with pytest.raises(FileExistsError):
        write_synthetic(SyntheticConfig(num_entities=200, seed=1), dest)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_synthetic(config, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sorted(p.name for p in write_synthetic(config, empty).iterdir()) == sorted(FILES)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._write_lines

    def failing(path: Path, rows) -> None:  # noqa: ANN001
        if path.name == "entity_types.tsv":
            raise OSError("disk full")
        real(path, rows)

    monkeypatch.setattr(synthetic, "_write_lines", failing)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(SyntheticConfig(num_entities=200), tmp_path / "kg")
    assert list(tmp_path.iterdir()) == [], "neither dest nor a temporary directory may remain"


def test_true_probabilities_cover_every_generated_triple(tmp_path: Path) -> None:
    # Without noise every generated triple lies in the support of the generator's own distribution.
    config = SyntheticConfig(num_entities=300, num_relations=6, noise=0.0, seed=2)
    kg = generate(config)
    triples = np.concatenate([kg.train, kg.valid, kg.test])
    h, r, t = triples.T
    tails = synthetic.true_tail_probabilities(config, h, r)
    heads = synthetic.true_head_probabilities(config, r, t)
    rows = np.arange(len(triples))
    assert np.all(tails[rows, t] > 0) and np.all(heads[rows, h] > 0)
    # Each row is a distribution over entities other than the query's own ...
    np.testing.assert_allclose(tails.sum(1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(heads.sum(1), 1.0, rtol=1e-9)
    assert np.all(tails[rows, h] == 0)
    # ... and it is informative: far above uniform for the observed tails.
    assert np.median(tails[rows, t]) > 10 / config.num_entities


def test_head_probabilities_are_the_same_in_blocks_of_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads in blocks keep memory at O(block x N) (the whole N x N table took ~31 bytes x N^2, 12 GB at
    20,000 entities), with the same numbers."""
    config = SyntheticConfig(num_entities=300, num_relations=6, seed=2)
    kg = generate(config)
    h, r, t = kg.test[:40].T
    whole = synthetic.true_head_probabilities(config, r, t)
    monkeypatch.setattr(synthetic, "ORACLE_CHUNK_CELLS", 7 * config.num_entities)  # blocks of 7 heads
    np.testing.assert_array_equal(synthetic.true_head_probabilities(config, r, t), whole)


def test_oracle_ranks_beat_chance_on_the_written_kg(tmp_path: Path) -> None:
    from kgtok.data.graph import load_kg

    config = SyntheticConfig(num_entities=300, num_relations=6, seed=2)
    kg = load_kg(write_synthetic(config, tmp_path / "kg"))
    ranks = synthetic.oracle_ranks(config, kg, "test")
    n = len(kg.triples["test"])
    assert ranks["head"].shape == ranks["tail"].shape == (n,)
    both = np.concatenate([ranks["head"], ranks["tail"]])
    assert np.all(both >= 1) and np.mean(1 / both) > 0.2  # chance would be ~ 1/150 (MRR ~ 0.02)


def test_write_synthetic_removes_a_killed_writers_temporary_folder(tmp_path):
    """kgtok data synthetic killed mid-write left .NAME.tmp-* behind for ever (no lock, no clean-up)."""
    leftover = tmp_path / ".kg.tmp-killed"
    leftover.mkdir()
    (leftover / "train.txt").write_text("a\tr\tb\n")
    write_synthetic(SyntheticConfig(num_entities=200), tmp_path / "kg")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["kg"]


def test_stage_zero_runs_from_python(tmp_path: Path) -> None:
    from kgtok.data.stage import DataConfig, run_data, run_synthetic

    quiet = {"log": lambda *_: None}
    config = SyntheticConfig(num_entities=200)
    kg_dir = run_synthetic(config, tmp_path / "kg", **quiet)
    assert kg_dir == tmp_path / "kg" and (kg_dir / "train.txt").read_bytes() == (
        write_synthetic(config, tmp_path / "plain") / "train.txt").read_bytes()
    summary = run_data(DataConfig(), kg_dir, tmp_path / "data", **quiet)
    counts = json.loads((summary / "summary.json").read_text())["counts"]
    assert counts["entities"] == 200 and counts["train"] == len((kg_dir / "train.txt").read_text().splitlines())
    before = (summary / "manifest.json").stat().st_mtime_ns
    assert run_data(DataConfig(), kg_dir, tmp_path / "data", **quiet) == summary  # current: reused
    assert (summary / "manifest.json").stat().st_mtime_ns == before
    run_data(DataConfig(), kg_dir, tmp_path / "data", force=True, **quiet)
    assert (summary / "manifest.json").stat().st_mtime_ns != before
