"""The KnowledgeGraph: contiguous ids, int64 triple tensors per split, text, filter index.

Two on-disk layouts are read (see :func:`load_kg`):

* ``train.txt``/``valid.txt``/``test.txt`` with raw ids, ``h<TAB>r<TAB>t``;
* the same plus ``entities.dict``/``relations.dict`` (``id<TAB>name``, the
  RotatE and GS-Quant layout), which then fix the id order.

Entity text comes from ``entity_text.tsv`` (``id<TAB>label<TAB>description``)
or from KG-BERT/DIFT-style pairs of files (``entity2text.txt`` with labels and
``entity2textlong.txt`` with descriptions, and similar names).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from kgtok.data.errors import (
    DuplicateTripleWarning,
    KGDataWarning,
    KGFormatError,
    MissingTextWarning,
    SplitOverlapWarning,
    UnseenEntityWarning,
)
from kgtok.data.filter_index import FilterIndex
from kgtok.data.reader import Table, read_table, read_text

SPLITS = ("train", "valid", "test")

# (label file, description file) pairs used by KG-BERT, DIFT, SimKGC and KG-FIT releases.
LABEL_FILES = ("entity2label.txt", "entity2text.txt", "entity2name.txt")
DESCRIPTION_FILES = ("entity2textlong.txt", "entity2description.txt", "entity2desc.txt", "entity2des.txt")

# Column names seen in header lines of triple files (pandas/CSV exports, RDF tooling, PyKEEN's TSVs).
HEADER_WORDS = frozenset({
    "head", "relation", "tail", "h", "r", "t", "subject", "predicate", "object", "s", "p", "o", "sub", "pred", "obj",
    "rel", "head_id", "relation_id", "tail_id", "head_label", "relation_label", "tail_label", "head_entity",
    "tail_entity", "source", "target", "src", "dst", "entity1", "entity2", "e1", "e2",
})


def looks_like_header(line: str) -> bool:
    """Is this first line of a split a column header (``head<TAB>relation<TAB>tail``, ``# s p o``)?

    A line starting with ``#``, or three fields (tab- or space-separated) that
    are all column words, counts as one.
    """
    if line.lstrip().startswith("#"):
        return True
    words = line.split("\t") if "\t" in line else line.split()
    return len(words) == 3 and all(w.strip().lower() in HEADER_WORDS for w in words)


@dataclass
class LoadReport:
    """What the loader adjusted or noticed; shown by ``kgtok data info``."""

    duplicates: dict[str, int] = field(default_factory=dict)  # split -> extra copies dropped
    blank_lines: dict[str, int] = field(default_factory=dict)
    crlf_files: list[str] = field(default_factory=list)
    unseen_entities: dict[str, int] = field(default_factory=dict)  # split -> entities not in train
    unseen_relations: dict[str, int] = field(default_factory=dict)
    unseen_entity_triples: dict[str, int] = field(default_factory=dict)  # split -> triples touching one
    split_overlap: dict[str, int] = field(default_factory=dict)  # "train&test" -> shared triples
    missing_label: int = 0  # entities whose label fell back to their id
    missing_description: int = 0
    text_unknown_entities: int = 0  # text lines naming entities absent from the triples
    text_unknown_example: str = ""  # the first of them, as file:line: id
    skipped_headers: list[str] = field(default_factory=list)  # files whose header line was skipped
    stripped_ids: dict[str, int] = field(default_factory=dict)  # file -> id fields stripped of whitespace


@dataclass(frozen=True, eq=False)
class KnowledgeGraph:
    """A KG with contiguous integer ids.

    Attributes
    ----------
    entity_names, relation_names : raw ids from the files, index = kgtok id.
    triples : split name -> (n, 3) int64 tensor of (head, relation, tail).
    labels, descriptions : per entity; a missing label is the raw id, a
        missing description is "".
    entity_types : (N, levels) int64 ground-truth type path when the directory
        has ``entity_types.tsv`` (the synthetic KG), else None; -1 where unknown.
    type_names : per level, the names of the type ids.
    """

    name: str
    entity_names: list[str]
    relation_names: list[str]
    triples: dict[str, torch.Tensor]
    labels: list[str]
    descriptions: list[str]
    source: Path | None = None
    entity_types: np.ndarray | None = None
    type_names: list[list[str]] | None = None
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    @property
    def train(self) -> torch.Tensor:
        return self.triples["train"]

    @property
    def valid(self) -> torch.Tensor:
        return self.triples["valid"]

    @property
    def test(self) -> torch.Tensor:
        return self.triples["test"]

    @cached_property
    def entity_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.entity_names)}

    @cached_property
    def relation_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.relation_names)}

    @cached_property
    def all_triples(self) -> np.ndarray:
        """(n, 3) int64: train, valid and test stacked (may repeat across splits)."""
        return np.concatenate([self.triples[s].numpy() for s in SPLITS if s in self.triples])

    @cached_property
    def filter_index(self) -> FilterIndex:
        """Known true answers over train ∪ valid ∪ test, for filtered ranking."""
        return FilterIndex(self.all_triples, self.num_entities, self.num_relations)

    def counts(self) -> dict[str, int]:
        return {
            "entities": self.num_entities,
            "relations": self.num_relations,
            **{split: int(self.triples[split].shape[0]) for split in SPLITS if split in self.triples},
        }

    @classmethod
    def from_arrays(
        cls,
        *,
        entity_names: list[str],
        relation_names: list[str],
        train: np.ndarray,
        valid: np.ndarray,
        test: np.ndarray,
        labels: list[str] | None = None,
        descriptions: list[str] | None = None,
        name: str = "kg",
        entity_types: np.ndarray | None = None,
        type_names: list[list[str]] | None = None,
    ) -> KnowledgeGraph:
        """Build a KG from id arrays already in memory (tests, the synthetic KG)."""
        triples = {
            s: torch.as_tensor(np.asarray(a, dtype=np.int64).reshape(-1, 3))
            for s, a in zip(SPLITS, (train, valid, test))
        }
        return cls(
            name=name,
            entity_names=list(entity_names),
            relation_names=list(relation_names),
            triples=triples,
            labels=list(labels) if labels is not None else list(entity_names),
            descriptions=list(descriptions) if descriptions is not None else [""] * len(entity_names),
            entity_types=entity_types,
            type_names=type_names,
        )


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def _read_dict(path: Path, *, strip_whitespace: bool = False) -> dict[str, int]:
    """Read ``id<TAB>name`` lines; ids must be 0..n-1, each once; names unique."""
    table = read_table(path, (2,), "id<TAB>name", id_columns=2, strip_whitespace=strip_whitespace)
    raw_ids, names = table.columns
    ids = np.empty(len(raw_ids), dtype=np.int64)
    for i, raw in enumerate(raw_ids):  # dictionary files are small (one line per entity)
        try:
            ids[i] = int(raw)
        except ValueError:
            raise KGFormatError(path, int(table.line_numbers[i]), f"id {raw!r} is not an integer") from None
    n = len(ids)
    out_of_range = (ids < 0) | (ids >= n)
    if out_of_range.any():
        row = int(np.argmax(out_of_range))
        raise KGFormatError(
            path, int(table.line_numbers[row]), f"ids must be 0..{n - 1}, each exactly once; found {ids[row]}"
        )
    _, first = np.unique(ids, return_index=True)
    if len(first) < n:  # in range but repeated: report the first repeat
        repeated = np.ones(n, dtype=bool)
        repeated[first] = False
        row = int(np.argmax(repeated))
        raise KGFormatError(path, int(table.line_numbers[row]), f"id {ids[row]} appears twice")
    mapping: dict[str, int] = {}
    for row, name in enumerate(names):
        if name in mapping:
            raise KGFormatError(path, int(table.line_numbers[row]), f"name {name!r} appears twice")
        mapping[name] = int(ids[row])
    return mapping


def _encode_table(
    table: Table, entity_to_id: dict[str, int], relation_to_id: dict[str, int], *, grow: bool, dict_dir: Path
) -> np.ndarray:
    """Map a split's names to (n, 3) ids; grow the vocabularies or refuse unknown names.

    With dictionaries (``grow=False``) the first line naming an unknown entity
    or relation, in file order, is reported.
    """
    columns = []
    for column, vocabulary in ((0, entity_to_id), (1, relation_to_id), (2, entity_to_id)):
        names = table.columns[column]
        if grow:
            for name in dict.fromkeys(names):  # first appearance order, C-speed dedupe
                vocabulary.setdefault(name, len(vocabulary))
        columns.append(np.fromiter(map(vocabulary.get, names, repeat(-1)), dtype=np.int64, count=len(names)))
    ids = np.stack(columns, axis=1)
    unknown = ids < 0
    if unknown.any():
        row = int(np.argmax(unknown.any(axis=1)))
        column = int(np.argmax(unknown[row]))
        kind, dict_name = ("relation", "relations.dict") if column == 1 else ("entity", "entities.dict")
        raise KGFormatError(
            table.path, int(table.line_numbers[row]),
            f"{kind} {table.columns[column][row]!r} is not listed in {dict_dir / dict_name}",
        )
    return ids


def _first_copies(triples: np.ndarray, num_entities: int, num_relations: int) -> np.ndarray:
    """Sorted row indices of the first copy of every triple (file order preserved)."""
    if len(triples) == 0:
        return np.arange(0, dtype=np.int64)
    key = _triple_keys(triples, num_entities, num_relations)
    _, first = np.unique(key, return_index=True)
    return np.sort(first)


def _triple_keys(triples: np.ndarray, num_entities: int, num_relations: int) -> np.ndarray:
    """One int64 per triple (or a structured row view when the product would overflow)."""
    if num_entities * num_entities * max(num_relations, 1) < 2**62:
        return (triples[:, 0] * num_relations + triples[:, 1]) * num_entities + triples[:, 2]
    return np.ascontiguousarray(triples).view([("h", "i8"), ("r", "i8"), ("t", "i8")]).ravel()


def refuse_repeated_ids(table: Table) -> None:
    """An entity listed twice in a text or type file: which row is meant cannot be told (rows merged field by
    field before), so the second line is refused, naming the first."""
    ids = np.asarray(table.columns[0], dtype=object)
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        seen = np.zeros(len(ids), dtype=bool)
        seen[first] = True
        again = int(np.flatnonzero(~seen)[0])
        earlier = int(np.flatnonzero(ids == ids[again])[0])
        raise KGFormatError(table.path, int(table.line_numbers[again]),
                            f"entity {ids[again]!r} again (first on line {int(table.line_numbers[earlier])}); "
                            "keep one line per entity")


def _read_text(
    directory: Path, entity_to_id: dict[str, int], report: LoadReport, *, strip_whitespace: bool = False
) -> tuple[list[str | None], list[str | None]]:
    """Labels and descriptions from whichever text files the directory has."""
    n = len(entity_to_id)
    labels: list[str | None] = [None] * n
    descriptions: list[str | None] = [None] * n

    def assign(table: Table, targets: dict[int, list[str | None]]) -> None:
        refuse_repeated_ids(table)
        for row, name in enumerate(table.columns[0]):
            index = entity_to_id.get(name)
            if index is None:  # text for an entity no triple mentions: harmless, counted
                report.text_unknown_entities += 1
                if not report.text_unknown_example:
                    report.text_unknown_example = f"{table.path}:{int(table.line_numbers[row])}: {name!r}"
                continue
            for column, target in targets.items():
                text = table.columns[column][row].strip()
                if text:
                    target[index] = text

    tsv = directory / "entity_text.tsv"
    if tsv.exists():
        assign(read_table(tsv, (2, 3), "id<TAB>label<TAB>description", id_columns=1,
                          strip_whitespace=strip_whitespace), {1: labels, 2: descriptions})
        return labels, descriptions
    label_file = next((directory / f for f in LABEL_FILES if (directory / f).exists()), None)
    if label_file is not None:
        assign(read_table(label_file, (2,), "id<TAB>label", id_columns=1, strip_whitespace=strip_whitespace),
               {1: labels})
    description_file = next((directory / f for f in DESCRIPTION_FILES if (directory / f).exists()), None)
    if description_file is not None:
        assign(read_table(description_file, (2,), "id<TAB>description", id_columns=1,
                          strip_whitespace=strip_whitespace), {1: descriptions})
    return labels, descriptions


def _read_types(
    directory: Path, entity_to_id: dict[str, int], *, strip_whitespace: bool = False
) -> tuple[np.ndarray, list[list[str]]] | None:
    """Ground-truth type paths from ``entity_types.tsv`` (id<TAB>level-1 type<TAB>...)."""
    path = directory / "entity_types.tsv"
    if not path.exists():
        return None
    text, _ = read_text(path)
    first = next((line for line in text.split("\n") if line.strip()), "")
    width = first.count("\t") + 1
    if width < 2:
        raise KGFormatError(path, 1, "expected id<TAB>type[<TAB>subtype...]")
    table = read_table(path, (width,), f"id followed by {width - 1} type column(s)", id_columns=1,
                       strip_whitespace=strip_whitespace)
    refuse_repeated_ids(table)
    types = np.full((len(entity_to_id), width - 1), -1, dtype=np.int64)
    rows = np.fromiter(map(entity_to_id.get, table.columns[0], repeat(-1)), dtype=np.int64)
    known = rows >= 0
    if not known.all():  # types of entities no triple has: ignored, as text is, but said (a typo'd id?)
        first = int(np.flatnonzero(~known)[0])
        warnings.warn(f"{path}:{int(table.line_numbers[first])}: {table.columns[0][first]!r} is no entity of the "
                      f"KG ({int((~known).sum())} such line(s), ignored)", KGDataWarning, stacklevel=3)
    names_per_level = []
    for level in range(width - 1):
        column = table.columns[level + 1]
        names = sorted(set(column))  # type ids in name order (a sort of objects took 45 s for 1M entities)
        index = {name: i for i, name in enumerate(names)}
        codes = np.fromiter(map(index.__getitem__, column), dtype=np.int64, count=len(column))
        types[rows[known], level] = codes[known]
        names_per_level.append(names)
    return types, names_per_level


def kg_dir_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a KG directory, in words (None when it is one).

    The one check behind ``load_kg``, ``--data`` on the command line and the stage executor.
    """
    path = Path(path)
    if not path.exists():
        return "no such directory; expected a folder with train.txt, valid.txt, test.txt"
    if not path.is_dir():
        return "is a file, not a directory; expected a folder with train.txt, valid.txt, test.txt"
    missing = [f"{s}.txt" for s in SPLITS if not (path / f"{s}.txt").is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())[:20]
        return (f"no {', '.join(missing)} in this folder (missing split file(s) {missing}; found: {present}); "
                "a KG directory needs train.txt, valid.txt and test.txt")
    return None


def _kg_directory(path: str | Path) -> Path:
    """The resolved KG directory, checked to hold the three split files."""
    directory = Path(path).resolve()
    problem = kg_dir_problem(directory)
    if problem:
        raise KGFormatError(directory, None, problem)
    return directory


def _read_splits(directory: Path, report: LoadReport, *, skip_header: bool, strip_whitespace: bool) -> dict:
    """The three split tables, with what was repaired on the way noted in ``report``."""
    tables = {
        s: read_table(directory / f"{s}.txt", (3,), "head<TAB>relation<TAB>tail", id_columns=3,
                      is_header=looks_like_header, skip_header=skip_header, strip_whitespace=strip_whitespace)
        for s in SPLITS
    }
    for split, table in tables.items():
        report.blank_lines[split] = table.blank_lines
        if table.crlf:
            report.crlf_files.append(table.path.name)
        if table.header_line is not None:
            report.skipped_headers.append(table.path.name)
        if table.stripped_ids:
            report.stripped_ids[table.path.name] = table.stripped_ids
    return tables


def _drop_duplicates(raw: dict[str, np.ndarray], tables: dict, num_entities: int, num_relations: int,
                     report: LoadReport) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per split: the first copy of each triple and its file line (a warning counts the dropped copies)."""
    triples: dict[str, np.ndarray] = {}
    line_numbers: dict[str, np.ndarray] = {}  # split -> (n,) file line of each kept triple
    for split in SPLITS:
        keep = _first_copies(raw[split], num_entities, num_relations)
        triples[split], line_numbers[split] = raw[split][keep], tables[split].line_numbers[keep]
        dropped = len(raw[split]) - len(keep)
        report.duplicates[split] = dropped
        if dropped:
            warnings.warn(
                f"{tables[split].path}: {dropped} duplicate triple(s); kept one copy of each",
                DuplicateTripleWarning, stacklevel=3,
            )
    return triples, line_numbers


def _names_by_id(name_to_id: dict[str, int]) -> list[str]:
    names = [""] * len(name_to_id)
    for name, index in name_to_id.items():
        names[index] = name
    return names


def load_kg(
    path: str | Path, *, name: str | None = None, skip_header: bool = False, strip_whitespace: bool = False
) -> KnowledgeGraph:
    """Load a KG directory (see module docstring for the layouts).

    Raises :class:`KGFormatError` naming the file and line of any bad input:
    a wrong field count, an empty field, an id with leading or trailing
    whitespace, a header line (``head<TAB>relation<TAB>tail``); warns
    (:class:`~kgtok.data.errors.KGDataWarning` subclasses) about duplicate
    triples, CRLF endings, and valid/test entities unseen in train, which are
    kept and ranked like any other id.

    Parameters
    ----------
    path : the KG directory.  Messages name its files by their resolved path,
        so loading the same KG as ``kg`` and as ``/abs/kg`` warns in the same words
        (the CLI then shows each warning once per run).
    name : the KG's name (default: the directory's name).
    skip_header : drop a header-like first line of a split file, with a
        :class:`~kgtok.data.errors.HeaderLineWarning`, instead of refusing it.
    strip_whitespace : strip whitespace around ids, with a
        :class:`~kgtok.data.errors.WhitespaceWarning`, instead of refusing them.
    """
    # Over 60 lines with its docstring; the steps are helpers, what is left reads in load order.
    directory = _kg_directory(path)
    report = LoadReport()
    tables = _read_splits(directory, report, skip_header=skip_header, strip_whitespace=strip_whitespace)

    entity_dict, relation_dict = directory / "entities.dict", directory / "relations.dict"
    has_dicts = entity_dict.exists() and relation_dict.exists()
    if entity_dict.exists() != relation_dict.exists():
        raise KGFormatError(directory, None, "entities.dict and relations.dict must come together (found only one)")
    entity_to_id = _read_dict(entity_dict, strip_whitespace=strip_whitespace) if has_dicts else {}
    relation_to_id = _read_dict(relation_dict, strip_whitespace=strip_whitespace) if has_dicts else {}

    # Train first: without dictionaries, train's entities get the smallest ids.
    raw = {
        split: _encode_table(tables[split], entity_to_id, relation_to_id, grow=not has_dicts, dict_dir=directory)
        for split in SPLITS
    }

    triples, line_numbers = _drop_duplicates(raw, tables, len(entity_to_id), len(relation_to_id), report)
    entity_names, relation_names = _names_by_id(entity_to_id), _names_by_id(relation_to_id)
    _check_unseen(triples, line_numbers, entity_names, relation_names, report, directory)
    _check_overlap(triples, len(entity_names), len(relation_names), report, directory)

    labels, descriptions = _read_text(directory, entity_to_id, report, strip_whitespace=strip_whitespace)
    report.missing_label = sum(label is None for label in labels)
    report.missing_description = sum(d is None for d in descriptions)
    has_text = any(label is not None for label in labels) or any(d is not None for d in descriptions)
    if has_text and report.missing_label:
        unknown = (f"; {report.text_unknown_entities} text line(s) name ids no triple has (a typo?), e.g. "
                   f"{report.text_unknown_example}" if report.text_unknown_entities else "")
        warnings.warn(
            f"{directory}: {report.missing_label} entities have no label; their id stands in{unknown}",
            MissingTextWarning, stacklevel=2,
        )
    types = _read_types(directory, entity_to_id, strip_whitespace=strip_whitespace)

    return KnowledgeGraph(
        name=name or directory.name,
        entity_names=entity_names,
        relation_names=relation_names,
        triples={s: torch.from_numpy(np.ascontiguousarray(a)) for s, a in triples.items()},
        labels=[label if label is not None else entity_names[i] for i, label in enumerate(labels)],
        descriptions=[d or "" for d in descriptions],
        source=directory,
        entity_types=types[0] if types else None,
        type_names=types[1] if types else None,
        report=report,
    )


UNSEEN_SHOWN = 3  # unseen names quoted per split in the warning


def _check_unseen(
    triples: dict[str, np.ndarray], line_numbers: dict[str, np.ndarray], entity_names: list[str],
    relation_names: list[str], report: LoadReport, directory: Path,
) -> None:
    """Count valid/test entities and relations never seen in train (kept, as PyKEEN and LibKGE do).

    The warning quotes the first few unseen names with their line: a
    misspelt id (``'c '`` for ``'c'``) shows up as itself, not only as a count.
    """
    num_entities, num_relations = len(entity_names), len(relation_names)
    train = triples["train"]
    seen_entities = np.zeros(num_entities, dtype=bool)
    seen_entities[train[:, 0]] = True
    seen_entities[train[:, 2]] = True
    seen_relations = np.zeros(num_relations, dtype=bool)
    seen_relations[train[:, 1]] = True
    for split in ("valid", "test"):
        t = triples[split]
        entities = np.unique(np.concatenate([t[:, 0], t[:, 2]]))
        unseen_e = int((~seen_entities[entities]).sum())
        unseen_r = int((~seen_relations[np.unique(t[:, 1])]).sum())
        touching = ~seen_entities[t[:, 0]] | ~seen_entities[t[:, 2]] | ~seen_relations[t[:, 1]]
        report.unseen_entities[split] = unseen_e
        report.unseen_relations[split] = unseen_r
        report.unseen_entity_triples[split] = int(touching.sum())
        if unseen_e or unseen_r:
            path = directory / f"{split}.txt"
            examples = _unseen_examples(t, line_numbers[split], seen_entities, seen_relations,
                                        entity_names, relation_names)
            warnings.warn(
                f"{path}: {unseen_e} entit(ies) and {unseen_r} relation(s) do not occur in train "
                f"({int(touching.sum())} triples), e.g. {examples}; kept and ranked as ordinary ids",
                UnseenEntityWarning, stacklevel=3,
            )


def _unseen_examples(
    triples: np.ndarray, line_numbers: np.ndarray, seen_entities: np.ndarray, seen_relations: np.ndarray,
    entity_names: list[str], relation_names: list[str],
) -> str:
    """``entity 'c ' (line 4), relation 'fears' (line 7)``: the first unseen names in file order."""
    shown: dict[tuple[str, int], int] = {}  # (kind, id) -> line, in order of first appearance
    unseen_rows = np.flatnonzero(~seen_entities[triples[:, 0]] | ~seen_relations[triples[:, 1]]
                                 | ~seen_entities[triples[:, 2]])
    for row in unseen_rows:
        h, r, t = (int(x) for x in triples[row])
        for key, seen in ((("entity", h), seen_entities[h]), (("relation", r), seen_relations[r]),
                          (("entity", t), seen_entities[t])):
            if not seen and key not in shown and len(shown) < UNSEEN_SHOWN:
                shown[key] = int(line_numbers[row])
        if len(shown) >= UNSEEN_SHOWN:
            break
    return ", ".join(
        f"{kind} {(entity_names if kind == 'entity' else relation_names)[index]!r} (line {line})"
        for (kind, index), line in shown.items()
    )


def _check_overlap(
    triples: dict[str, np.ndarray], num_entities: int, num_relations: int, report: LoadReport, directory: Path
) -> None:
    keys = {s: np.sort(_triple_keys(triples[s], num_entities, num_relations)) for s in SPLITS}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        shared = int(_members(keys[b], keys[a]).sum())
        report.split_overlap[f"{a}&{b}"] = shared
        if shared:
            warnings.warn(
                f"{directory}: {shared} triple(s) of {b}.txt also occur in {a}.txt (test leakage); kept",
                SplitOverlapWarning, stacklevel=3,
            )


def _members(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """np.isin(keys, sorted_keys) by binary search: numpy's isin took 22 s for 2k keys in 6M triples."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys
