"""Loading both layouts, text files, counts of the shared datasets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import TEST, TRAIN, shared_dataset
from kgtok.data import KGFormatError, load_kg
from kgtok.data.errors import KGDataWarning


def test_raw_layout_ids_and_tensors(make_kg):
    kg = load_kg(make_kg())
    assert kg.counts() == {"entities": 4, "relations": 2, "train": 5, "valid": 2, "test": 2}
    # Ids follow first appearance in train, so train entities come first.
    assert kg.entity_names == ["a", "b", "c", "d"]
    assert kg.relation_names == ["likes", "hates"]
    assert kg.train.dtype == torch.int64 and kg.train.shape == (5, 3)
    decoded = [(kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]) for h, r, t in kg.train.tolist()]
    assert decoded == TRAIN
    decoded_test = [(kg.entity_names[h], kg.relation_names[r], kg.entity_names[t]) for h, r, t in kg.test.tolist()]
    assert decoded_test == TEST
    assert kg.labels == ["a", "b", "c", "d"]  # no text: the id stands in


def test_dict_layout_fixes_id_order(make_kg):
    directory = make_kg(
        entities__dict=["0\td", "1\tc", "2\tb", "3\ta"],
        relations__dict=["0\thates", "1\tlikes"],
    )
    kg = load_kg(directory)
    assert kg.entity_names == ["d", "c", "b", "a"]
    assert kg.relation_names == ["hates", "likes"]
    assert kg.train[0].tolist() == [3, 1, 2]  # (a, likes, b)


def test_dict_layout_rejects_unknown_entity(make_kg):
    directory = make_kg(entities__dict=["0\ta", "1\tb", "2\tc"], relations__dict=["0\tlikes", "1\thates"])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.path.name == "train.txt" and err.value.line == 4  # first mention of "d"
    assert "'d'" in str(err.value) and "entities.dict" in str(err.value)


def test_dict_layout_rejects_bad_ids(make_kg):
    directory = make_kg(entities__dict=["0\ta", "1\tb", "5\tc", "3\td"], relations__dict=["0\tlikes", "1\thates"])
    with pytest.raises(KGFormatError, match=r"entities.dict:3: ids must be 0..3"):
        load_kg(directory)
    directory = make_kg(name="kg2", entities__dict=["0\ta", "x\tb"], relations__dict=["0\tlikes", "1\thates"])
    with pytest.raises(KGFormatError, match=r"entities.dict:2: id 'x' is not an integer"):
        load_kg(directory)


def test_entity_text_tsv(make_kg):
    directory = make_kg(entity_text__tsv=["a\tAlpha\tfirst letter", "b\tBeta", "c\tGamma\t", "zz\tUnknown\tnot in kg"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kg = load_kg(directory)
    assert kg.labels == ["Alpha", "Beta", "Gamma", "d"]
    assert kg.descriptions == ["first letter", "", "", ""]
    assert kg.report.missing_label == 1 and kg.report.missing_description == 3
    assert kg.report.text_unknown_entities == 1
    assert any("1 entities have no label" in str(w.message) for w in caught)
    # the line that may have been meant for the unlabelled entity is named (a typo'd id said nothing)
    assert any("1 text line(s) name ids no triple has (a typo?), e.g. " in str(w.message)
               and "entity_text.tsv:4: 'zz'" in str(w.message) for w in caught)


def test_kgbert_style_text_files(make_kg):
    directory = make_kg(
        entity2text__txt=["a\tAlpha", "b\tBeta", "c\tGamma", "d\tDelta"],
        entity2textlong__txt=["a\tthe first", "d\tthe fourth"],
    )
    kg = load_kg(directory)
    assert kg.labels == ["Alpha", "Beta", "Gamma", "Delta"]
    assert kg.descriptions == ["the first", "", "", "the fourth"]


def test_entity_types(make_kg):
    directory = make_kg(entity_types__tsv=["a\tanimal\tanimal/bird", "b\tanimal\tanimal/fish", "c\tplace\tplace/city"])
    kg = load_kg(directory)
    assert kg.type_names == [["animal", "place"], ["animal/bird", "animal/fish", "place/city"]]
    assert kg.entity_types.tolist() == [[0, 0], [0, 1], [1, 2], [-1, -1]]
    (directory / "entity_types.tsv").write_text("a\tanimal\ndd\tplace\n")  # an id no triple has: said, with its line
    with pytest.warns(KGDataWarning, match=r"entity_types.tsv:2: 'dd' is no entity of the KG \(1 such line"):
        assert load_kg(directory).entity_types.tolist() == [[0], [-1], [-1], [-1]]


@pytest.mark.filterwarnings("ignore::kgtok.data.errors.UnseenEntityWarning")
def test_unicode_and_blank_lines(make_kg):
    directory = make_kg(train=["Zürich\tnear\tGenève", "", "Genève\tnear\tZürich"], valid=[("Zürich", "near", "Zürich")])
    kg = load_kg(directory)
    assert kg.entity_names[:2] == ["Zürich", "Genève"]
    assert kg.report.blank_lines["train"] == 1 and len(kg.train) == 2


@pytest.mark.parametrize(
    "name, counts",
    [
        ("wn18rr", {"entities": 40943, "relations": 11, "train": 86835, "valid": 3034, "test": 3134}),
        ("fb15k237", {"entities": 14541, "relations": 237, "train": 272115, "valid": 17535, "test": 20466}),
        ("umls", {"entities": 135, "relations": 46, "train": 5216, "valid": 652, "test": 661}),
        ("kinship", {"entities": 104, "relations": 25, "train": 8544, "valid": 1068, "test": 1074}),
        ("nations", {"entities": 14, "relations": 55, "train": 1592, "valid": 199, "test": 201}),
    ],
)
def test_shared_dataset_counts(name, counts):
    """The counts of ../shared/datasets/README.md, exactly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kg = load_kg(shared_dataset(name))
    assert kg.counts() == counts
    if name == "fb15k237":
        assert kg.num_entities - kg.report.missing_description == 13666
        assert kg.report.crlf_files == ["train.txt", "valid.txt", "test.txt"]
    if name == "wn18rr":
        assert kg.report.missing_label == 0 and kg.report.missing_description == 0
        # Names are not unique in WN18RR (METHOD.md: 12,873 entities share a name).
        labels = np.asarray(kg.labels, dtype=object)
        _, inverse, freq = np.unique(labels, return_inverse=True, return_counts=True)
        assert int((freq[inverse] > 1).sum()) == 12873


def test_dict_layout_rejects_repeated_id_and_name(make_kg):
    directory = make_kg(entities__dict=["0\ta", "1\tb", "1\tc", "3\td"], relations__dict=["0\tlikes", "1\thates"])
    with pytest.raises(KGFormatError, match=r"entities.dict:3: id 1 appears twice"):
        load_kg(directory)
    directory = make_kg(name="kg2", entities__dict=["0\ta", "1\tb", "2\tc", "3\td"], relations__dict=["0\tlikes", "1\tlikes"])
    with pytest.raises(KGFormatError, match=r"relations.dict:2: name 'likes' appears twice"):
        load_kg(directory)


def test_uniform_files_read_by_one_split_as_line_by_line(tmp_path):
    """The one-split path for files whose lines all have the same field count gives the same table."""
    from kgtok.data import reader

    lines = ["a\tZürich\tfirst", "b\tBeta\tsecond", "c\t\tthird"]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "u.tsv").write_text("\n".join(lines), encoding="utf-8")  # no final newline
    (tmp_path / "two.tsv").write_text("a\tAlpha\nb\tBeta\n", encoding="utf-8")
    by_line = reader._columns_by_line(tmp_path / "t.tsv", lines, np.arange(1, 4), (2, 3), "id<TAB>l<TAB>d")
    for name in ("t.tsv", "u.tsv"):
        table = reader.read_table(tmp_path / name, (2, 3), "id<TAB>label<TAB>description", id_columns=1)
        assert table.columns == by_line and table.line_numbers.tolist() == [1, 2, 3]
    padded = reader.read_table(tmp_path / "two.tsv", (2, 3), "id<TAB>label<TAB>description", id_columns=1)
    assert padded.columns == [["a", "b"], ["Alpha", "Beta"], ["", ""]]
    assert reader._uniform_columns("a\tb\nc\n", ["a\tb", "c"], (1, 2), skip=False) is None  # mixed: by line
    # A line of tabs only is blank, skipped and counted, as line by line: not a row of empty ids
    (tmp_path / "tabs.txt").write_text("a\tr\tb\n\t\t\nc\tr\td\n", encoding="utf-8")
    table = reader.read_table(tmp_path / "tabs.txt", (3,), "head<TAB>relation<TAB>tail", id_columns=3)
    assert table.columns == [["a", "c"], ["r", "r"], ["b", "d"]] and table.line_numbers.tolist() == [1, 3]
    assert table.blank_lines == 1
