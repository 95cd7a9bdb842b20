"""A seeded synthetic knowledge graph whose entities sit in a known taxonomy.

Why: every later stage claims to recover a hierarchy (stage 3 builds a tree,
stage 4 turns it into code prefixes, stage 5 uses the top level as ontology
classes).  On a real KG the "true" hierarchy is unknown; here it is the
generator's input, so a test or the offline demo can measure how well codes
recover it, level by level, in seconds and without downloads.

How the graph is made (all randomness from one ``np.random.default_rng(seed)``):

* Taxonomy: ``branching = (4, 4, 4)`` gives 4 top types, 4 subtypes each and
  4 fine groups each (64 leaves).  Type ids are global per level: the level-1
  id of subtype ``k`` of top type ``t`` is ``t * branching[1] + k``, and so on
  down.  Every entity is a leaf member of one fine group; group sizes vary
  (Dirichlet weights), each group has at least two members, and entity ids are
  shuffled so an id says nothing about its type.
* Popularity: each entity gets a log-normal weight; heads and tails are drawn
  in proportion to it, so degrees are skewed as in real KGs, and the most
  popular member of each group is that group's *hub*.
* Relations: ``r00_belongs_to`` is hierarchical (WN18RR's hypernym is the model):
  an entity points to the hub of its fine group, or less often of a coarser
  group, so the graph holds stars nested like the taxonomy.  About a quarter
  of the other relations are *same-type* (``similar_to``-like: range equals
  domain, tails mostly in the head's own fine group); the rest are
  *cross-type*, with a domain (a top type or subtype) and a disjoint range.
  A cross-type relation maps the head's position in the tree onto the range's
  subtree by one fixed permutation per level, so heads that share a subtype
  get tails that share a subtype: graph structure mirrors the hierarchy at
  every level, and a KG embedding trained on it clusters by top type and
  subtype.  Tails fall in the mapped fine group most often, otherwise in the
  mapped coarser group (weights ``_LOCALITY ** depth``).  A ``noise`` share of
  tails is uniform over all entities, ignoring the range.
* Size: ``triples_per_entity`` is the average *degree* (head plus tail
  mentions), so the graph holds about ``num_entities * triples_per_entity / 2``
  distinct triples before the split (2000 x 12 / 2 = 12,000 by default).  A
  relation whose small domain runs out of distinct pairs passes its shortfall
  on to the next one, so only the last relations can leave the total short
  (a few tiny configs do: one relation, or a single small domain); the
  ``belongs_to`` triples that make every entity occur at least once add a few.
* Split: one triple per entity and per relation is kept for train; valid and
  test are drawn from the remaining ones, so they contain no unseen entity or
  relation.  No triple occurs twice in or across splits.
* Text: labels read like ``"amber falcon 12"`` (a random type-neutral
  adjective, the fine group's word and a serial unique within the group, so
  labels are unique), descriptions like ``"an amber falcon, a kind of bird,
  which is an animal (a living creature that moves and feeds); it has feathers
  and lays eggs; first recorded in 1843"``.  A sentence encoder can group
  entities by type from the text alone.  A ``duplicate_labels`` share of
  entities then takes the label of another member of its fine group on
  purpose: real KGs repeat names (WN18RR: 12,873 entities share a name), and
  later stages must resolve answers by id, never by name.

Layout written by ``write_synthetic`` (the standard kgtok dataset layout)::

    train.txt valid.txt test.txt  h<TAB>r<TAB>t raw ids, one triple a line
    entity_text.tsv               id<TAB>label<TAB>description
    entity_types.tsv              id<TAB>level-0 type name<TAB>level-1 ...
                                  (names are paths: animal, animal/bird, ...)
    synthetic.json                the SyntheticConfig
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kgtok.artifacts import atomic_dir, clean_leftovers, folder_lock
from kgtok.config import check_fields, config_to_dict, in_range

__all__ = ["SyntheticConfig", "SyntheticKG", "generate", "oracle_ranks", "true_head_probabilities",
           "true_tail_probabilities", "write_synthetic"]


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Settings of the synthetic KG; every default lives here.

    The same config on any machine gives the same graph and byte-identical
    files (``write_synthetic``).
    """

    num_entities: int = 2000  # 200..2000000; 2000 keeps tests and the demo fast, 20000 (about WN18RR's half) times the stages, 1M scales them (bench/scale.py)
    branching: tuple[int, ...] = (4, 4, 4)  # children per level (1..5 levels, 2..64 each); deeper trees test more code levels but need more entities per leaf (product <= num_entities / 2)
    num_relations: int = 24  # >= 1; r00 is the hierarchical one; more relations spread the triples thinner per relation
    triples_per_entity: float = 12.0  # average degree (head + tail mentions): about num_entities * this / 2 triples; train-only FB15k-237 ~ 37, WN18RR ~ 4.2; higher is easier to learn and slower
    valid_fraction: float = 0.05  # share of all triples held out for validation (stage 5 builds its LM training data from these)
    test_fraction: float = 0.05  # share held out for test; larger gives steadier metrics but a sparser train graph
    noise: float = 0.05  # share of tails drawn uniformly, ignoring domain/range; 0 gives a graph cleaner than any real KG, more blurs the hierarchy
    duplicate_labels: float = 0.02  # share of entities that take another entity's label (same fine group); 0 gives unique labels, >0 tests resolution by id
    seed: int = 0  # the one random seed; different seeds give different graphs and texts

    def __post_init__(self) -> None:
        # Lists (from JSON/YAML or a caller) become a tuple, so the frozen config stays hashable.
        if isinstance(self.branching, (list, tuple)) and all(_is_int(b) for b in self.branching):
            object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        leaves = _product(self.branching) if _is_branching(self.branching) else 0
        check_fields(
            self,
            [
                ("num_entities", lambda n: _is_int(n) and 200 <= n <= 2_000_000, "an integer in [200, 2000000]"),
                ("branching", _is_branching, "a tuple of 1..5 integers, each in [2, 64]"),
                (
                    "branching",
                    lambda b: not _is_int(self.num_entities) or leaves <= self.num_entities // 2,
                    f"at most num_entities // 2 leaf groups (at least two entities each); "
                    f"these branching factors give {leaves} leaf groups",
                ),
                ("num_relations", lambda n: _is_int(n) and 1 <= n <= 999, "an integer in [1, 999]"),
                ("triples_per_entity", in_range(2.0, 200.0), "a number in [2, 200]"),
                # an empty split is a file load_kg refuses
                ("valid_fraction", in_range(0.0, 0.3, low_open=True), "a number in (0, 0.3]"),
                ("test_fraction", in_range(0.0, 0.3, low_open=True), "a number in (0, 0.3]"),
                ("noise", in_range(0.0, 1.0), "a number in [0, 1]"),
                ("duplicate_labels", in_range(0.0, 0.5), "a number in [0, 0.5]"),
                ("seed", lambda s: _is_int(s) and s >= 0, "a non-negative integer"),
            ],
        )


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_branching(b: object) -> bool:
    return isinstance(b, tuple) and 1 <= len(b) <= 5 and all(_is_int(k) and 2 <= k <= 64 for k in b)


def _product(xs: Iterable[int]) -> int:
    return int(math.prod(xs))


@dataclass(frozen=True, eq=False)
class SyntheticKG:
    """A generated KG: ids, text, true taxonomy and the three splits.

    ``eq=False``: arrays do not compare to one bool; compare fields instead.

    Attributes
    ----------
    entity_names : list[str]
        Raw ids (``"e00042"``), index = entity index.
    relation_names : list[str]
        Raw ids (``"r07_found_near_bird"``), index = relation index.
    labels, descriptions : list[str]
        One readable ASCII line per entity.
    types : np.ndarray
        ``(num_entities, levels)`` int64, the true path of every entity;
        column 0 is the top type; ids are global per level.
    type_names : list[list[str]]
        Per level, the path name of each type id (``"animal/bird/falcon"``).
    train, valid, test : np.ndarray
        ``(n, 3)`` int64 ``(head, relation, tail)`` indices, sorted.
    relation_domain, relation_range : np.ndarray
        ``(num_relations, 2)`` int64 ``(level, type id)``; level ``-1`` (id 0)
        means every entity (the hierarchical relation).
    relation_kinds : list[str]
        ``"hierarchy"``, ``"same_type"`` or ``"cross_type"`` per relation.
    config : SyntheticConfig
        The config that produced this graph.
    """

    entity_names: list[str]
    relation_names: list[str]
    labels: list[str]
    descriptions: list[str]
    types: np.ndarray
    type_names: list[list[str]]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    relation_domain: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    relation_range: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    relation_kinds: list[str] = field(default_factory=list)
    config: SyntheticConfig | None = None

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    @property
    def levels(self) -> int:
        return int(self.types.shape[1])


# ----------------------------------------------------------------------------
# Words: a hand-written taxonomy (8 x 4 x 4), with generated names past it
# ----------------------------------------------------------------------------

# (top word, what it is, [(subtype word, a fact about it, [fine words])])
_TAXONOMY: list[tuple[str, str, list[tuple[str, str, list[str]]]]] = [
    ("animal", "a living creature that moves and feeds", [
        ("bird", "it has feathers and lays eggs", ["falcon", "sparrow", "heron", "owl"]),
        ("fish", "it swims and breathes through gills", ["trout", "salmon", "carp", "tuna"]),
        ("insect", "it has six legs and a hard shell", ["beetle", "ant", "moth", "wasp"]),
        ("mammal", "it has fur and feeds its young on milk", ["wolf", "deer", "otter", "badger"]),
    ]),
    ("plant", "a living organism that grows from the soil and needs sunlight", [
        ("tree", "it has a woody trunk and branches", ["oak", "pine", "birch", "maple"]),
        ("flower", "it blooms with colourful petals", ["rose", "tulip", "lily", "daisy"]),
        ("herb", "its leaves are used for flavour or medicine", ["basil", "mint", "thyme", "sage"]),
        ("cereal", "it is grown in fields for its grain", ["wheat", "barley", "rice", "oat"]),
    ]),
    ("mineral", "a natural solid substance dug from the earth", [
        ("gemstone", "it is cut and polished for jewellery", ["ruby", "emerald", "sapphire", "opal"]),
        ("ore", "it is smelted to obtain a metal", ["hematite", "bauxite", "galena", "malachite"]),
        ("building stone", "it is quarried for walls and floors", ["granite", "marble", "slate", "basalt"]),
        ("crystal", "it forms clear geometric crystals", ["quartz", "calcite", "fluorite", "gypsum"]),
    ]),
    ("building", "a structure with walls and a roof made by people", [
        ("place of worship", "people gather in it to pray", ["church", "temple", "mosque", "chapel"]),
        ("dwelling", "people live in it", ["cottage", "villa", "apartment", "cabin"]),
        ("fortification", "it was built for defence in war", ["castle", "fortress", "citadel", "watchtower"]),
        ("public building", "it is open to the public", ["library", "museum", "theatre", "hospital"]),
    ]),
    ("musical instrument", "a device for making music", [
        ("string instrument", "it sounds by vibrating strings", ["violin", "cello", "harp", "guitar"]),
        ("woodwind instrument", "it is played by blowing across a reed or hole", ["flute", "clarinet", "oboe", "bassoon"]),
        ("brass instrument", "it is a metal tube played through a cup mouthpiece", ["trumpet", "trombone", "tuba", "french horn"]),
        ("percussion instrument", "it is struck or shaken to keep the beat", ["drum", "cymbal", "xylophone", "tambourine"]),
    ]),
    ("vehicle", "a machine that carries people or goods", [
        ("road vehicle", "it travels on roads on wheels", ["car", "bus", "truck", "motorcycle"]),
        ("watercraft", "it floats and travels on water", ["sailboat", "canoe", "ferry", "yacht"]),
        ("aircraft", "it flies through the air", ["airplane", "helicopter", "glider", "airship"]),
        ("rail vehicle", "it runs on railway tracks", ["locomotive", "tram", "monorail", "railcar"]),
    ]),
    ("food", "something prepared to be eaten", [
        ("bread", "it is baked from dough", ["baguette", "bagel", "croissant", "pretzel"]),
        ("soup", "it is a hot liquid dish served in a bowl", ["broth", "chowder", "minestrone", "bisque"]),
        ("dessert", "it is sweet and served after a meal", ["cake", "pudding", "pie", "tart"]),
        ("cheese", "it is made from curdled milk", ["cheddar", "brie", "gouda", "feta"]),
    ]),
    ("tool", "a hand-held object used to do work", [
        ("cutting tool", "it has a sharp edge for cutting", ["knife", "saw", "chisel", "scissors"]),
        ("striking tool", "it is swung to hit things", ["hammer", "mallet", "sledgehammer", "pickaxe"]),
        ("measuring tool", "it is used to measure length or angle", ["ruler", "caliper", "protractor", "tape measure"]),
        ("garden tool", "it is used to work the soil", ["spade", "rake", "hoe", "trowel"]),
    ]),
]

# Type-neutral words, so that a label's type comes from its noun only.
_ADJECTIVES = (
    "amber", "azure", "crimson", "golden", "silver", "ivory", "scarlet", "violet",
    "northern", "southern", "eastern", "western", "upper", "lower", "old", "new",
    "little", "grand", "bright", "dusky", "quiet", "lucky", "royal", "hidden",
    "misty", "sunny", "windy", "frosty", "stormy", "early", "late", "plain",
)

_SAME_TYPE_VERBS = ("similar_to", "related_to", "resembles", "often_confused_with", "grouped_with", "compared_with")
_CROSS_TYPE_VERBS = (
    "found_near", "used_with", "made_for", "depends_on", "competes_with", "inspired_by",
    "located_in", "produces", "consumes", "linked_to", "traded_for", "named_after",
    "shown_with", "kept_in", "protected_by", "replaced_by",
)

_SAME_TYPE_SHARE = 0.25  # of the non-hierarchical relations
_HIERARCHY_SHARE = 0.15  # of the triple budget, for r00_belongs_to
_LOCALITY = 3.0  # a tail one level deeper in the mapped path is this much likelier
_POPULARITY_SIGMA = 1.0  # log-normal spread of entity popularity (degree skew)
_GROUP_SIZE_ALPHA = 2.0  # Dirichlet concentration of leaf-group sizes; lower = more uneven


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _slug(word: str) -> str:
    return word.replace(" ", "_")


def _taxonomy_words(branching: Sequence[int]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Readable word, path name and fact of every type, per level.

    The hand-written taxonomy covers 8 x 4 x 4; types past it get names built
    from their parent's word ("animal kind 5"), still unique per level and
    still carrying the parent's words for a text encoder.  Type ids follow the
    global numbering: child ``k`` of type ``p`` is ``p * width + k``.
    """
    words: list[list[str]] = []
    names: list[list[str]] = []
    facts: list[list[str]] = []
    parent_words, parent_names = [""], [""]
    parent_children: list[list | None] = [_TAXONOMY]  # hand-written children of each parent type
    for level, width in enumerate(branching):
        level_words, level_names, level_facts, level_children = [], [], [], []
        for parent_word, parent_name, children in zip(parent_words, parent_names, parent_children):
            for k in range(width):
                word, fact, grandchildren = _child_type(level, k, parent_word, children)
                level_words.append(word)
                level_facts.append(fact)
                level_names.append(f"{parent_name}/{_slug(word)}" if level else _slug(word))
                level_children.append(grandchildren)
        words.append(level_words)
        names.append(level_names)
        facts.append(level_facts)
        parent_words, parent_names, parent_children = level_words, level_names, level_children
    for level_names in names:
        assert len(set(level_names)) == len(level_names), "type names must be unique per level"
    return words, names, facts


def _child_type(level: int, k: int, parent_word: str, children: list | None) -> tuple[str, str, list | None]:
    """Word, fact and hand-written children of child ``k`` of a type."""
    if children is not None and k < len(children):
        item = children[k]
        if isinstance(item, str):  # a fine group: a word only
            return item, "", None
        return item[0], item[1], item[2]
    if level == 0:
        return f"thing of class {k + 1}", f"something of class {k + 1}", None
    if level == 1:
        return f"{parent_word} kind {k + 1}", f"it is one of the {parent_word} kind {k + 1} group", None
    return f"{parent_word} form {k + 1}", "", None


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


class _GroupSampler:
    """Draws entities from given groups in proportion to their popularity.

    Vectorised inverse-CDF sampling: entities sorted by group, one cumulative
    weight array, and a ``searchsorted`` inside each group's slice.
    """

    def __init__(self, group_of_entity: np.ndarray, num_groups: int, weights: np.ndarray) -> None:
        self.order = np.argsort(group_of_entity, kind="stable")  # (N,) entity indices by group
        sizes = np.bincount(group_of_entity, minlength=num_groups)
        self.end = np.cumsum(sizes)  # (G,) exclusive end of each group's slice
        self.start = self.end - sizes
        self.cum = np.cumsum(weights[self.order])  # (N,)
        self.cum_start = np.where(self.start > 0, self.cum[np.maximum(self.start - 1, 0)], 0.0)
        self.cum_total = self.cum[self.end - 1] - self.cum_start

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        target = self.cum_start[groups] + rng.random(len(groups)) * self.cum_total[groups]
        pos = np.searchsorted(self.cum, target, side="right")
        pos = np.clip(pos, self.start[groups], self.end[groups] - 1)  # guard float round-off
        return self.order[pos]


def _assign_types(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """``(N, levels)`` true paths: two members per leaf, the rest by Dirichlet sizes."""
    branching = config.branching
    n, leaves = config.num_entities, _product(branching)
    group_weights = rng.dirichlet(np.full(leaves, _GROUP_SIZE_ALPHA))
    leaf = np.concatenate([np.tile(np.arange(leaves), 2), rng.choice(leaves, n - 2 * leaves, p=group_weights)])
    leaf = rng.permutation(leaf)  # entity ids say nothing about their type
    types = np.empty((n, len(branching)), dtype=np.int64)  # (N, levels)
    for level in range(len(branching)):
        types[:, level] = leaf // _product(branching[level + 1 :])
    return types


def _hubs(types: np.ndarray, popularity: np.ndarray, branching: Sequence[int]) -> list[np.ndarray]:
    """Per level, the most popular member of every group (nested: a coarse hub is a fine hub too)."""
    hubs = []
    for level in range(types.shape[1]):
        groups = types[:, level]
        order = np.lexsort((-popularity, groups))
        first = np.ones(len(order), dtype=bool)
        first[1:] = groups[order][1:] != groups[order][:-1]
        hub = np.empty(_product(branching[: level + 1]), dtype=np.int64)
        hub[groups[order][first]] = order[first]
        hubs.append(hub)
    return hubs


def _parent_hubs(
    heads: np.ndarray, max_level: np.ndarray, types: np.ndarray, hubs: list[np.ndarray]
) -> np.ndarray:
    """The hub of the deepest group at or above ``max_level`` that is not the head itself.

    A top-level hub has no such group; it points to the next top type's hub.
    """
    tails = np.full(len(heads), -1, dtype=np.int64)
    for level in range(types.shape[1] - 1, -1, -1):
        candidate = hubs[level][types[heads, level]]
        take = (tails < 0) & (max_level >= level) & (candidate != heads)
        tails[take] = candidate[take]
    rest = tails < 0
    top = hubs[0]
    tails[rest] = top[(types[heads[rest], 0] + 1) % len(top)]
    return tails


@dataclass(frozen=True)
class _Relation:
    kind: str
    domain: tuple[int, int]  # (level, type id); level -1 = all entities
    range: tuple[int, int]
    perms: tuple[np.ndarray, ...]  # per level, child position -> child position
    count: int  # triples wanted


def _design_relations(config: SyntheticConfig, rng: np.random.Generator) -> list[_Relation]:
    """Kind, domain, range, tree map and triple budget of every relation."""
    branching = config.branching
    levels = len(branching)
    types_per_level = [_product(branching[: lvl + 1]) for lvl in range(levels)]
    budget = round(config.num_entities * config.triples_per_entity / 2)
    others = config.num_relations - 1
    hierarchy_count = min(
        budget if others == 0 else round(_HIERARCHY_SHARE * budget), config.num_entities - branching[0]
    )
    num_same = min(others, max(1, round(_SAME_TYPE_SHARE * others))) if others else 0
    kinds = rng.permutation(np.array(["same_type"] * num_same + ["cross_type"] * (others - num_same)))
    # Zipf-like relation frequencies in random order, as in real KGs.
    weights = 1.0 / (rng.permutation(others) + 1.0) ** 0.8 if others else np.zeros(0)
    counts = np.maximum(1, np.floor(weights / max(weights.sum(), 1e-12) * (budget - hierarchy_count))).astype(int)

    identity = tuple(np.arange(b) for b in branching)
    relations = [_Relation("hierarchy", (-1, 0), (-1, 0), identity, int(hierarchy_count))]
    # Domains cycle over the top types, so every top type heads about as many relations.
    domain_tops = np.concatenate([rng.permutation(branching[0]) for _ in range(others // branching[0] + 1)])
    for kind, count, domain_top in zip(kinds, counts, domain_tops.tolist()):
        domain_level = int(rng.integers(min(2, levels)))
        domain_type = domain_top if domain_level == 0 else domain_top * branching[1] + int(rng.integers(branching[1]))
        if kind == "same_type":
            relations.append(_Relation("same_type", (domain_level, domain_type), (domain_level, domain_type), identity, int(count)))
            continue
        range_level = int(rng.integers(min(2, levels)))
        candidates = np.arange(types_per_level[range_level])
        # The range must not overlap the domain's subtree (neither contains the other).
        if range_level <= domain_level:
            span = _product(branching[range_level + 1 : domain_level + 1])
            overlap = candidates == domain_type // span
        else:
            span = _product(branching[domain_level + 1 : range_level + 1])
            overlap = candidates // span == domain_type
        range_type = int(rng.choice(candidates[~overlap]))
        perms = tuple(rng.permutation(b) for b in branching)
        relations.append(_Relation("cross_type", (domain_level, domain_type), (range_level, range_type), perms, int(count)))
    return relations


def _mapped_paths(heads: np.ndarray, relation: _Relation, types: np.ndarray, branching: Sequence[int]) -> np.ndarray:
    """``(n, levels)`` the path in the range subtree that each head maps onto."""
    range_level, range_type = relation.range
    mapped = np.empty((len(heads), len(branching)), dtype=np.int64)
    for level in range(len(branching)):
        if level <= range_level:
            mapped[:, level] = range_type // _product(branching[level + 1 : range_level + 1])
        else:
            position = relation.perms[level][types[heads, level] % branching[level]]
            mapped[:, level] = mapped[:, level - 1] * branching[level] + position
    return mapped


def _sample_relation(
    relation: _Relation,
    types: np.ndarray,
    hubs: list[np.ndarray],
    samplers: list[_GroupSampler],
    config: SyntheticConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (head, tail) pairs of one relation, about ``relation.count`` of them."""
    n_entities, levels = types.shape
    if relation.kind == "hierarchy":
        # Distinct heads, so pairs are distinct; top-level hubs have no parent.
        candidates = np.setdiff1d(np.arange(n_entities), hubs[0])
        heads = rng.permutation(candidates)[: relation.count]
        depth_weights = _LOCALITY ** np.arange(levels)
        max_level = rng.choice(levels, len(heads), p=depth_weights / depth_weights.sum())
        tails = _parent_hubs(heads, max_level, types, hubs)
        noisy = rng.random(len(heads)) < config.noise
        tails[noisy] = rng.integers(n_entities, size=int(noisy.sum()))
        keep = tails != heads
        return heads[keep], tails[keep]

    domain_level, domain_type = relation.domain
    range_level = relation.range[0]
    depth_weights = _LOCALITY ** np.arange(levels - range_level)
    depth_p = depth_weights / depth_weights.sum()
    heads_all, tails_all = np.zeros(0, np.int64), np.zeros(0, np.int64)
    kept = np.zeros(0, np.int64)
    for attempt in range(4):  # small domains give duplicates; draw more until the budget is met
        n = (int(1.5 * relation.count) + 16) << attempt
        heads = samplers[domain_level].sample(np.full(n, domain_type), rng)
        mapped = _mapped_paths(heads, relation, types, config.branching)  # (n, levels)
        tail_level = range_level + rng.choice(len(depth_p), n, p=depth_p)
        tails = np.empty(n, dtype=np.int64)
        for level in range(range_level, levels):
            at = tail_level == level
            tails[at] = samplers[level].sample(mapped[at, level], rng)
        noisy = rng.random(n) < config.noise
        tails[noisy] = rng.integers(n_entities, size=int(noisy.sum()))
        no_loop = heads != tails
        heads_all = np.concatenate([heads_all, heads[no_loop]])
        tails_all = np.concatenate([tails_all, tails[no_loop]])
        _, first = np.unique(heads_all * n_entities + tails_all, return_index=True)
        kept = np.sort(first)[: relation.count]  # first occurrences, in draw order
        if len(kept) >= relation.count:
            break
    return heads_all[kept], tails_all[kept]


def _split(
    triples: np.ndarray, n_entities: int, n_relations: int, config: SyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/valid/test with every entity and relation kept in train."""
    triples = triples[rng.permutation(len(triples))]
    m = len(triples)
    protected = np.zeros(m, dtype=bool)
    # One triple per entity (its first mention) and per relation stays in train.
    _, first_entity = np.unique(np.concatenate([triples[:, 0], triples[:, 2]]), return_index=True)
    protected[first_entity % m] = True
    _, first_relation = np.unique(triples[:, 1], return_index=True)
    protected[first_relation] = True
    assert len(first_entity) == n_entities and len(first_relation) == n_relations
    pool = np.flatnonzero(~protected)
    if len(pool) < 2:  # e.g. one relation: every triple is some head's only mention, so all stay in train
        raise ValueError(f"synthetic KG: {m} triples, all needed in train (each entity and relation keeps one), "
                         "so none is left for valid and test; raise num_relations or triples_per_entity")
    n_valid, n_test = max(1, round(config.valid_fraction * m)), max(1, round(config.test_fraction * m))
    if n_valid + n_test > len(pool):  # only with very sparse graphs: shrink both alike, one each at least
        scale = len(pool) / (n_valid + n_test)
        n_valid, n_test = max(1, int(n_valid * scale)), max(1, int(n_test * scale))
        n_valid = min(n_valid, len(pool) - n_test)
    in_split = np.zeros(m, dtype=np.int8)  # 0 train, 1 valid, 2 test
    in_split[pool[:n_valid]] = 1
    in_split[pool[n_valid : n_valid + n_test]] = 2

    def sorted_split(code: int) -> np.ndarray:
        part = triples[in_split == code]
        return part[np.lexsort((part[:, 2], part[:, 1], part[:, 0]))]

    return sorted_split(0), sorted_split(1), sorted_split(2)


def _entity_text(
    types: np.ndarray,
    words: list[list[str]],
    facts: list[list[str]],
    leaf_sampler: _GroupSampler,
    config: SyntheticConfig,
    rng: np.random.Generator,
) -> tuple[list[str], list[str]]:
    """Labels ``"amber falcon 12"`` and one-line descriptions that name the type path."""
    n, levels = types.shape
    leaf = types[:, -1]
    # Serial = rank of the entity inside its leaf group (by id), so labels are unique.
    serial = np.empty(n, dtype=np.int64)
    serial[leaf_sampler.order] = np.arange(n) - np.repeat(leaf_sampler.start, leaf_sampler.end - leaf_sampler.start)
    adjective = rng.integers(len(_ADJECTIVES), size=n)
    year = rng.integers(1700, 2021, size=n)

    # Per leaf group, the part of the description after "an amber falcon".
    def tail_text(leaf_id: int) -> str:
        path = [leaf_id // _product(config.branching[lvl + 1 :]) for lvl in range(levels)]
        parts = [f", a kind of {words[lvl][path[lvl]]}" for lvl in range(levels - 2, 0, -1)]
        if levels >= 2:
            top = words[0][path[0]]
            parts.append(f", which is {_article(top)} {top} ({facts[0][path[0]]})")
        else:
            parts.append(f" ({facts[0][path[0]]})")
        if levels >= 2 and facts[1][path[1]]:
            parts.append(f"; {facts[1][path[1]]}")
        return "".join(parts)

    leaf_words = words[-1]
    leaf_tails = [tail_text(g) for g in range(len(leaf_words))]
    labels = [f"{_ADJECTIVES[a]} {leaf_words[g]} {s + 1}" for a, g, s in zip(adjective.tolist(), leaf.tolist(), serial.tolist())]
    descriptions = [
        f"{_article(_ADJECTIVES[a])} {_ADJECTIVES[a]} {leaf_words[g]}{leaf_tails[g]}; first recorded in {y}"
        for a, g, y in zip(adjective.tolist(), leaf.tolist(), year.tolist())
    ]
    # Some entities copy the label of the next member of their leaf group (groups have >= 2 members).
    copies = rng.choice(n, round(config.duplicate_labels * n), replace=False)
    rank = serial[copies]
    start, size = leaf_sampler.start[leaf[copies]], (leaf_sampler.end - leaf_sampler.start)[leaf[copies]]
    sources = leaf_sampler.order[start + (rank + 1) % size]
    original = list(labels)
    for target, source in zip(copies.tolist(), sources.tolist()):
        labels[target] = original[source]
    return labels, descriptions


def _generator_state(
    config: SyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[_GroupSampler], list[np.ndarray], list[_Relation]]:
    """Taxonomy, popularity, samplers, hubs and relation designs: the first draws of ``generate``."""
    branching = config.branching
    types = _assign_types(config, rng)  # (N, levels)
    popularity = rng.lognormal(0.0, _POPULARITY_SIGMA, size=config.num_entities)  # (N,)
    samplers = [_GroupSampler(types[:, lvl], _product(branching[: lvl + 1]), popularity)
                for lvl in range(len(branching))]
    hubs = _hubs(types, popularity, branching)
    return types, popularity, samplers, hubs, _design_relations(config, rng)


def true_tail_probabilities(config: SyntheticConfig, heads: np.ndarray, relations: np.ndarray) -> np.ndarray:
    """``(n, N)`` the generator's probability of each tail for the queries ``(heads[i], relations[i], ?)``.

    Indices are the generator's (entity ``e00042`` is 42). Exact for the
    sampling process (self-loops are redrawn), up to the removal of repeated pairs; an
    upper bound for any model: ranking by it is the best anyone can do on
    the synthetic KG (see :func:`oracle_ranks`).
    """
    return _tail_probabilities(config, _generator_state(config, np.random.default_rng(config.seed)), heads, relations)


def _tail_probabilities(config: SyntheticConfig, state: tuple, heads: np.ndarray, relations: np.ndarray) -> np.ndarray:
    """:func:`true_tail_probabilities` given the generator's state (built once by the callers)."""
    types, popularity, _, hubs, designs = state
    n_entities, levels = types.shape
    heads, relations = np.asarray(heads, dtype=np.int64), np.asarray(relations, dtype=np.int64)
    out = np.full((len(heads), n_entities), config.noise / n_entities)
    for r in np.unique(relations):
        rows, h, design = np.flatnonzero(relations == r), heads[relations == r], designs[int(r)]
        if design.kind == "hierarchy":
            depth_p = _LOCALITY ** np.arange(levels)
            depth_p = depth_p / depth_p.sum()
            for level in range(levels):
                tails = _parent_hubs(h, np.full(len(h), level), types, hubs)
                out[rows, tails] += (1 - config.noise) * depth_p[level]
            continue
        range_level = design.range[0]
        depth_p = _LOCALITY ** np.arange(levels - range_level)
        depth_p = depth_p / depth_p.sum()
        mapped = _mapped_paths(h, design, types, config.branching)  # (n, levels)
        for level in range(range_level, levels):
            totals = np.bincount(types[:, level], weights=popularity, minlength=_product(config.branching[: level + 1]))
            member = types[None, :, level] == mapped[:, level, None]  # (n, N)
            share = member * popularity[None, :] / totals[mapped[:, level]][:, None]
            out[rows] += (1 - config.noise) * depth_p[level - range_level] * share
    out[np.arange(len(heads)), heads] = 0.0  # self-loops are dropped and drawn again: renormalise
    return out / out.sum(1, keepdims=True)


ORACLE_CHUNK_CELLS = 1 << 22  # heads x entities per block of true_head_probabilities (~32 MB of float64 each)


def true_head_probabilities(config: SyntheticConfig, relations: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """``(n, N)`` P(head | relation, tail) ∝ P(head | relation) P(tail | head, relation), generator indices."""
    state = _generator_state(config, np.random.default_rng(config.seed))
    types, popularity, _, hubs, designs = state
    n_entities = types.shape[0]
    relations, tails = np.asarray(relations, dtype=np.int64), np.asarray(tails, dtype=np.int64)
    out = np.zeros((len(tails), n_entities))
    everyone = np.arange(n_entities)
    for r in np.unique(relations):
        rows, design = np.flatnonzero(relations == r), designs[int(r)]
        if design.kind == "hierarchy":  # heads: distinct entities other than the top-level hubs, uniformly
            prior = np.ones(n_entities)
            prior[hubs[0]] = 0.0
        else:  # heads: members of the domain, by popularity
            level, domain_type = design.domain
            prior = popularity * (types[:, level] == domain_type)
        # P(tail | head, r) for every head, only the queries' tail columns: heads in chunks, so memory is
        # O(chunk x N), not O(N^2) (about 12 GB at 20,000 entities)
        p_tail = np.empty((n_entities, len(rows)))  # (N heads, n)
        block = ORACLE_CHUNK_CELLS // n_entities or 1
        for start in range(0, n_entities, block):
            chunk = everyone[start: start + block]
            p_tail[chunk] = _tail_probabilities(config, state, chunk, np.full(len(chunk), r))[:, tails[rows]]
        joint = prior[None, :] * p_tail.T  # (n, N heads)
        out[rows] = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
    return out


def generate(config: SyntheticConfig) -> SyntheticKG:
    """Generate the synthetic KG described by ``config``.

    Parameters
    ----------
    config : SyntheticConfig
        All settings, including the seed.

    Returns
    -------
    SyntheticKG
        Ids, text, the true taxonomy (``types``), relation domains/ranges and
        the train/valid/test triples.  The same config always gives equal
        arrays and lists.
    """
    # Over 60 lines on purpose: the generator's recipe (taxonomy, relations, triples, text) read in order.
    rng = np.random.default_rng(config.seed)
    branching = config.branching
    levels = len(branching)
    n = config.num_entities

    types, popularity, samplers, hubs, relations = _generator_state(config, rng)

    heads, rels, tails = [], [], []
    shortfall = 0  # triples a small domain could not supply pass on to the next relation
    for r, relation in enumerate(relations):
        if r > 0:
            relation = dataclasses.replace(relation, count=relation.count + shortfall)
        h, t = _sample_relation(relation, types, hubs, samplers, config, rng)
        shortfall = max(0, relation.count - len(h)) if r > 0 else 0
        assert len(h) > 0, f"relation {r} got no triples"
        heads.append(h)
        rels.append(np.full(len(h), r, dtype=np.int64))
        tails.append(t)
    # Entities no triple mentions get one belongs_to triple, so none is unseen.
    mentioned = np.bincount(np.concatenate(heads + tails), minlength=n) > 0
    lonely = np.flatnonzero(~mentioned)
    heads.append(lonely)
    rels.append(np.zeros(len(lonely), dtype=np.int64))
    tails.append(_parent_hubs(lonely, np.full(len(lonely), levels - 1), types, hubs))
    triples = np.stack([np.concatenate(heads), np.concatenate(rels), np.concatenate(tails)], axis=1).astype(np.int64)
    train, valid, test = _split(triples, n, len(relations), config, rng)

    words, type_names, facts = _taxonomy_words(branching)
    labels, descriptions = _entity_text(types, words, facts, samplers[-1], config, rng)

    width = max(5, len(str(n - 1)))
    entity_names = [f"e{i:0{width}d}" for i in range(n)]
    rwidth = max(2, len(str(len(relations) - 1)))
    relation_names = []
    same_i = cross_i = 0
    for r, relation in enumerate(relations):
        if relation.kind == "hierarchy":
            verb = "belongs_to"
        elif relation.kind == "same_type":
            verb, same_i = _SAME_TYPE_VERBS[same_i % len(_SAME_TYPE_VERBS)], same_i + 1
        else:
            verb, cross_i = _CROSS_TYPE_VERBS[cross_i % len(_CROSS_TYPE_VERBS)], cross_i + 1
        range_level, range_type = relation.range
        suffix = "" if range_level < 0 else "_" + _slug(words[range_level][range_type])
        relation_names.append(f"r{r:0{rwidth}d}_{verb}{suffix}")

    return SyntheticKG(
        entity_names=entity_names,
        relation_names=relation_names,
        labels=labels,
        descriptions=descriptions,
        types=types,
        type_names=type_names,
        train=train,
        valid=valid,
        test=test,
        relation_domain=np.array([rel.domain for rel in relations], dtype=np.int64).reshape(-1, 2),
        relation_range=np.array([rel.range for rel in relations], dtype=np.int64).reshape(-1, 2),
        relation_kinds=[rel.kind for rel in relations],
        config=config,
    )


# ----------------------------------------------------------------------------
# Writing the standard layout
# ----------------------------------------------------------------------------


_WRITE_CHUNK = 65536  # rows turned into text at a time: bounded memory for millions of triples


def _write_lines(path: Path, rows: Iterable[str]) -> None:
    """Write ASCII lines ending in ``\\n`` (ASCII fails loudly on stray text), a chunk of rows per write."""
    rows = iter(rows)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        while chunk := list(itertools.islice(rows, _WRITE_CHUNK)):
            f.write("\n".join(chunk))
            f.write("\n")


def _triple_lines(triples: np.ndarray, entities: Sequence[str], relations: Sequence[str]) -> Iterable[str]:
    """``head<TAB>relation<TAB>tail`` lines, converting a chunk of the (n, 3) array at a time."""
    for start in range(0, len(triples), _WRITE_CHUNK):
        for h, r, t in triples[start : start + _WRITE_CHUNK].tolist():
            yield f"{entities[h]}\t{relations[r]}\t{entities[t]}"


def _config_json(config: SyntheticConfig) -> str:
    return json.dumps(config_to_dict(config), indent=2) + "\n"


def _holds_config(dest: Path, config: SyntheticConfig) -> bool:
    try:
        return json.loads((dest / "synthetic.json").read_text(encoding="utf-8")) == config_to_dict(config)
    except (OSError, ValueError):
        return False


def write_kg_files(kg: SyntheticKG, config: SyntheticConfig, directory: Path) -> None:
    """The KG directory's files: splits, ``entity_text.tsv``, ``entity_types.tsv``, ``synthetic.json``."""
    ent, rel = kg.entity_names, kg.relation_names
    for split in ("train", "valid", "test"):
        _write_lines(directory / f"{split}.txt", _triple_lines(getattr(kg, split), ent, rel))
    _write_lines(
        directory / "entity_text.tsv",
        (f"{e}\t{label}\t{desc}" for e, label, desc in zip(ent, kg.labels, kg.descriptions)),
    )
    type_names = kg.type_names
    paths = kg.types.tolist()  # (N, levels): small next to the triples
    _write_lines(
        directory / "entity_types.tsv",
        ("\t".join([e] + [type_names[lvl][tid] for lvl, tid in enumerate(path)]) for e, path in zip(ent, paths)),
    )
    _write_lines(directory / "synthetic.json", [_config_json(config).rstrip("\n")])


def write_synthetic(config: SyntheticConfig, dest: str | Path) -> Path:
    """Generate the KG and write it to the directory ``dest``, atomically.

    Everything is written to a hidden sibling (:func:`kgtok.artifacts.atomic_dir`)
    and then renamed onto ``dest``, so a reader never sees half a dataset.

    Parameters
    ----------
    config : SyntheticConfig
        What to generate; also written as ``synthetic.json``.
    dest : str or Path
        Target directory; it must not exist, be empty, or already hold the
        same config (then it is returned unchanged, without regenerating).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    FileExistsError
        ``dest`` is a file, or a non-empty directory written from another config.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest):  # one writer; a killed one's temporary folder goes (it stayed for ever)
        clean_leftovers(dest.parent, dest.name)
        return _write_synthetic(config, dest)


def _write_synthetic(config: SyntheticConfig, dest: Path) -> Path:
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a directory; expected a directory for the synthetic KG")
        if any(dest.iterdir()):
            if _holds_config(dest, config):
                return dest
            raise FileExistsError(
                f"{dest} is a non-empty directory without a synthetic.json for this config; "
                "choose another destination or remove it"
            )
    kg = generate(config)
    with atomic_dir(dest) as tmp:
        write_kg_files(kg, config, tmp)
    return dest


def oracle_ranks(config: SyntheticConfig, kg: Any, split: str = "test") -> dict[str, np.ndarray]:
    """Filtered realistic ranks of a split's triples when every query is answered by the generator itself.

    ``kg``: the :class:`~kgtok.data.graph.KnowledgeGraph` loaded from
    ``write_synthetic(config, ...)``. Returns ``{"head": ranks, "tail": ranks}``
    in the split's triple order: the ceiling of any link predictor on this graph.
    """
    import torch

    from kgtok.metrics import realistic_rank

    entity = np.array([int(name[1:]) for name in kg.entity_names])  # kgtok id -> generator index
    relation = np.array([int(name[1:].split("_")[0]) for name in kg.relation_names])
    h, r, t = kg.triples[split].numpy().T
    tail_scores = true_tail_probabilities(config, entity[h], relation[r])[:, entity]
    head_scores = true_head_probabilities(config, relation[r], entity[t])[:, entity]
    ranks = {}
    for side, scores, gold, (rows, cols) in (("head", head_scores, h, kg.filter_index.head_pairs(r, t)),
                                             ("tail", tail_scores, t, kg.filter_index.tail_pairs(h, r))):
        ranks[side] = realistic_rank(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(gold),
                                     rows, cols).numpy()
    return ranks
