"""Every bad-input case gets a KGFormatError naming file and line, or a counted warning."""

from __future__ import annotations

import warnings

import pytest

from conftest import TEST, TRAIN, VALID, write_lines
from kgtok.data import KGFormatError, load_kg
from kgtok.data.errors import (
    DuplicateTripleWarning,
    HeaderLineWarning,
    LineEndingWarning,
    SplitOverlapWarning,
    UnseenEntityWarning,
    WhitespaceWarning,
)


@pytest.mark.parametrize("line, found", [("a\tlikes", 2), ("a\tlikes\tb\tc", 4)])
def test_wrong_field_count(make_kg, line, found):
    directory = make_kg(train=[*map("\t".join, TRAIN[:2]), line, *map("\t".join, TRAIN[2:])])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.path == directory / "train.txt"
    assert err.value.line == 3
    assert f"expected 3 tab-separated fields (head<TAB>relation<TAB>tail), found {found}" in str(err.value)
    assert str(err.value).startswith(f"{directory / 'train.txt'}:3: ")


def test_space_separated_hint(make_kg):
    directory = make_kg(valid=["a likes b"])
    with pytest.raises(KGFormatError, match=r"valid.txt:1: .*space-separated"):
        load_kg(directory)


def test_line_number_counts_blank_lines(make_kg):
    directory = make_kg(test=["a\tlikes\tb", "", "", "a\tlikes"])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.path.name == "test.txt" and err.value.line == 4


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(make_kg, content):
    directory = make_kg()
    (directory / "valid.txt").write_bytes(content)
    with pytest.raises(KGFormatError, match=r"valid.txt: file is empty"):
        load_kg(directory)


def test_missing_split(make_kg):
    directory = make_kg(test=None)
    with pytest.raises(KGFormatError, match=r"missing split file\(s\) \['test.txt'\]"):
        load_kg(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(KGFormatError, match="nowhere: no such directory"):
        load_kg(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(KGFormatError, match="afile: is a file, not a directory"):
        load_kg(tmp_path / "afile")


def test_undecodable_bytes(make_kg):
    directory = make_kg()
    (directory / "train.txt").write_bytes(b"a\tlikes\tb\nb\tlikes\tc\nc\thates\t\xff\xfea\n")
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.line == 3
    assert "0xff" in str(err.value) and "column 9" in str(err.value) and "UTF-8" in str(err.value)


def test_windows_line_endings_are_read_with_a_warning(make_kg):
    directory = make_kg()
    write_lines(directory / "train.txt", ["\t".join(t) for t in TRAIN], newline="\r\n")
    with pytest.warns(LineEndingWarning, match=r"train.txt: Windows \(CRLF\)"):
        kg = load_kg(directory)
    assert kg.relation_names == ["likes", "hates"]  # no "\r" glued to names
    assert kg.entity_names == ["a", "b", "c", "d"]
    assert kg.report.crlf_files == ["train.txt"]


def test_stray_carriage_return(make_kg):
    directory = make_kg()
    (directory / "train.txt").write_bytes(b"a\tlikes\tb\nb\tlik\res\tc\n")
    with pytest.raises(KGFormatError, match=r"train.txt:2: stray carriage return"):
        load_kg(directory)


def test_duplicates_warn_count_and_keep_one(make_kg):
    rows = TRAIN + [TRAIN[0], TRAIN[0], TRAIN[3]]
    directory = make_kg(train=rows)
    with pytest.warns(DuplicateTripleWarning, match=r"train.txt: 3 duplicate triple"):
        kg = load_kg(directory)
    assert len(kg.train) == len(TRAIN)
    assert kg.report.duplicates == {"train": 3, "valid": 0, "test": 0}
    assert len({tuple(t) for t in kg.train.tolist()}) == len(TRAIN)


def test_unseen_entities_and_relations_are_kept(make_kg):
    directory = make_kg(valid=[("a", "likes", "new1"), ("b", "likes", "c")], test=[("new2", "fears", "new1")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kg = load_kg(directory)
    unseen = [w for w in caught if issubclass(w.category, UnseenEntityWarning)]
    assert len(unseen) == 2
    assert "valid.txt: 1 entit(ies) and 0 relation(s)" in str(unseen[0].message)
    assert "test.txt: 2 entit(ies) and 1 relation(s)" in str(unseen[1].message)
    assert kg.report.unseen_entities == {"valid": 1, "test": 2}
    assert kg.report.unseen_relations == {"valid": 0, "test": 1}
    assert kg.num_entities == 6 and kg.num_relations == 3
    # They get ordinary ids after the train ones, and rank like any other id.
    assert kg.entity_names[4:] == ["new1", "new2"]
    assert kg.filter_index.true_tails(0, 0).tolist() == [1, 4]  # b (train), new1 (valid)


def test_split_overlap_warns(make_kg):
    directory = make_kg(test=[TRAIN[0], ("c", "likes", "d")])
    with pytest.warns(SplitOverlapWarning, match="1 triple"):
        kg = load_kg(directory)
    assert kg.report.split_overlap["train&test"] == 1


def test_text_file_errors_name_their_line(make_kg):
    directory = make_kg(entity_text__tsv=["a\tAlpha\tx", "b\tBeta\tdesc\textra"])
    with pytest.raises(KGFormatError, match=r"entity_text.tsv:2: expected 2 or 3 tab-separated fields"):
        load_kg(directory)


def test_cli_reports_bad_input_without_traceback(make_kg):
    from click.testing import CliRunner

    from kgtok.cli import cli

    directory = make_kg(train=["a\tlikes"])
    result = CliRunner().invoke(cli, ["data", "info", str(directory)])
    assert result.exit_code == 2
    assert "train.txt:1: expected 3 tab-separated fields" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------
# Issue 18: header lines, empty fields, whitespace around ids, unseen names
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["head\trelation\ttail", "head relation tail", "Subject\tPredicate\tObject",
                                    "# h r t"])
def test_header_line_is_refused_with_its_line(make_kg, header):
    directory = make_kg(train=[header, *TRAIN])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.path == directory / "train.txt" and err.value.line == 1
    assert "looks like a column header" in str(err.value) and "skip_header=True" in str(err.value)


def test_header_line_after_blank_lines_is_named_by_its_line(make_kg):
    directory = make_kg(valid=["", "head\trelation\ttail", *map("\t".join, VALID)])
    with pytest.raises(KGFormatError, match=r"valid.txt:2: 'head\\trelation\\ttail' looks like a column header"):
        load_kg(directory)


def test_skip_header_drops_it_with_a_warning(make_kg):
    plain = load_kg(make_kg(name="plain"))
    directory = make_kg(train=["head\trelation\ttail", *TRAIN], test=["h\tr\tt", *TEST], name="headed")
    with pytest.warns(HeaderLineWarning, match=r"train.txt:1: skipped the header line"):
        kg = load_kg(directory, skip_header=True)
    assert kg.entity_names == plain.entity_names and kg.relation_names == plain.relation_names
    assert kg.counts() == plain.counts()
    assert kg.report.skipped_headers == ["train.txt", "test.txt"]


def test_a_first_triple_with_one_column_word_is_data(make_kg):
    kg = load_kg(make_kg(train=[("head", "part_of", "body"), *TRAIN]))
    assert "head" in kg.entity_names and "part_of" in kg.relation_names


@pytest.mark.parametrize("line, column", [("\tlikes\tb", "head"), ("a\t\tb", "relation"), ("a\tlikes\t", "tail")])
def test_empty_field_is_an_error_with_its_line(make_kg, line, column):
    directory = make_kg(train=[*TRAIN[:2], line, *TRAIN[2:]])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.line == 3 and f"{column} is empty" in str(err.value)


@pytest.mark.parametrize("bad", ["a ", " a", "a\u00a0"])
def test_whitespace_around_an_id_is_an_error_naming_it(make_kg, bad):
    directory = make_kg(valid=[("b", "likes", "c"), (bad, "likes", "c")])
    with pytest.raises(KGFormatError) as err:
        load_kg(directory)
    assert err.value.path.name == "valid.txt" and err.value.line == 2
    assert f"head {bad!r} has leading or trailing whitespace" in str(err.value)


def test_strip_whitespace_strips_with_a_warning(make_kg):
    directory = make_kg(valid=[("b", "hates", "c"), ("a ", " likes", "c")], entity_text__tsv=["a \tAlpha", "b\tBeta"])
    with pytest.warns(WhitespaceWarning, match=r"valid.txt:2: stripped whitespace around 2 id field\(s\), e.g. 'a '"):
        kg = load_kg(directory, strip_whitespace=True)
    assert kg.num_entities == 4 and kg.num_relations == 2  # 'a ' is 'a', ' likes' is 'likes'
    assert kg.labels[:2] == ["Alpha", "Beta"]
    assert kg.report.stripped_ids == {"valid.txt": 2}


def test_whitespace_in_text_and_dict_ids_is_refused(make_kg):
    directory = make_kg(entity_text__tsv=["a\tAlpha", "b \tBeta"])
    with pytest.raises(KGFormatError, match=r"entity_text.tsv:2: id 'b ' has leading or trailing whitespace"):
        load_kg(directory)


def test_unseen_warning_names_the_entities(make_kg):
    directory = make_kg(valid=[("b", "likes", "c"), ("q", "hates", "a")], test=[("a", "fears", "zz")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kg = load_kg(directory)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnseenEntityWarning)]
    assert "valid.txt: 1 entit(ies)" in messages[0] and "e.g. entity 'q' (line 2)" in messages[0]
    assert "e.g. relation 'fears' (line 1), entity 'zz' (line 1)" in messages[1]
    assert kg.num_entities == 6


@pytest.mark.parametrize("name, rows", [
    ("entity_text.tsv", ["a\tAlice\ta person who likes Bob", "b\tBob\t", "a\tAcme Corp\t"]),
    ("entity_types.tsv", ["a\tperson", "b\tperson", "a\tcompany"]),
])
def test_an_entity_listed_twice_in_a_text_or_type_file_is_refused(make_kg, name, rows):
    """Its rows were merged field by field (label of one, description of the other) or the last one won."""
    directory = make_kg()
    (directory / name).write_text("\n".join(rows) + "\n")
    with pytest.raises(KGFormatError, match=rf"{name}:3: entity 'a' again \(first on line 1\)"):
        load_kg(directory)
