"""EntityTokenizer: entities <-> unique code tuples <-> token strings, scikit-learn style.

    tok = EntityTokenizer(levels=4, codebook_size=1024).fit(fused_vectors, hierarchy)
    tok.encode([0, 5])            # (2, width) codes
    tok.decode(codes)             # entity ids (exact: every tuple is unique)
    tok.token_strings(codes)      # ['<a_17><b_903><c_4><d_250>', ...]
    tok.encode_new(vectors)       # codes of entities added after training (inductive)
    tok.save_pretrained(path); EntityTokenizer.from_pretrained(path)   # save / load: the same
    ids = tok.extend(hf_model, hf_tokenizer, init="codebook")           # (N, width) token ids

Uniqueness (defect 3 of the reference code): after training, entities sharing
a tuple get one more, final *disambiguation* code (their rank in the group, 0
for the first), as semantic-ID work does; the collision rate before the fix is
kept in ``collision_rate_before_``.  The column exists only when needed.
Each level has its own token namespace (defect 5): ``<a_..>``, ``<b_..>``, ...

Saved layout (``save_pretrained``; ``format_version`` 1)::

    tokenizer.json      format_version, kgtok_version, num_entities, levels, codebook_size,
                        width (levels, +1 with the disambiguation column), in_dim,
                        collision_rate_before, encoder (whether model.pt is there), the full
                        QuantizeConfig, the training record; written last
    codes.npy           (num_entities, width) int64 codes, row i = entity i
    base_codes.npy      (num_entities, levels) int64 codes before the disambiguation column
    codebooks.npy       (books, codebook_size, dim) float32 codewords (books = levels; 1 for flat)
    vocab.txt           every code token, one a line: level 0's codes 0..K-1, level 1's, ...,
                        then the disambiguation ranks (the order ``extend`` adds them in)
    entity_tokens.txt   line i: entity i's token string, e.g. <a_17><b_903><c_4><d_250>
    model.pt            RQ-VAE weights (encoder, codebooks, decoder) for encode_new; absent for realm

``from_pretrained`` reads format 1 and directories written before the field
existed (format 0: the same files less vocab.txt and entity_tokens.txt); any
other version is refused with a :class:`FormatVersionError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import string
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok import __version__
from kgtok.config import config_to_dict, saved_config
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.metrics import tuple_groups
from kgtok.quantize.model import RQVAE, Hierarchy
from kgtok.quantize.quantizer import sum_codewords
from kgtok.quantize.train import TrainingRecord, fit_realm, realm_codes, train_rqvae


FORMAT_VERSION = 1  # of the save_pretrained layout (module docstring); bump on any change to it
CONFIG_FILE = "tokenizer.json"


class CollisionWarning(UserWarning):
    """A new entity's code tuple equals an existing one and no disambiguation level exists."""


class VocabularyWarning(UserWarning):
    """A new entity's code needs a token that :meth:`EntityTokenizer.vocabulary` (and so an extended model)
    does not have."""


class NotFittedError(ValueError, AttributeError):
    """The tokenizer was used before ``fit`` or ``load``."""


class FormatVersionError(ValueError):
    """A saved tokenizer's ``format_version`` is not one this kgtok reads."""


def level_namespace(level: int) -> str:
    """a, b, ..., z, aa, ab, ...: one token namespace per level."""
    letters = string.ascii_lowercase
    name = ""
    level += 1
    while level:
        level, rest = divmod(level - 1, 26)
        name = letters[rest] + name
    return name


def disambiguate(codes: np.ndarray) -> tuple[np.ndarray, float]:
    """Append each entity's rank within its group of equal tuples when any tuple repeats.

    Returns (codes, share of entities whose tuple was shared before the fix).
    """
    if len(codes) == 0:
        return codes, 0.0
    groups, sizes = tuple_groups(codes)  # once: the rate and the ranks both read the groups
    rate = float((sizes[groups] > 1).mean())
    if rate == 0.0:
        return codes, rate
    rank = rank_in_group(groups).astype(codes.dtype)
    return np.concatenate([codes, rank[:, None]], axis=1), rate


def rank_in_group(groups: np.ndarray) -> np.ndarray:
    """(n,) group ids -> each row's rank among the rows of its group, in row order (0 for the first)."""
    order = np.lexsort((np.arange(len(groups)), groups))  # by group, then by row
    first = np.searchsorted(groups[order], groups[order], side="left")
    rank = np.empty(len(groups), dtype=np.int64)
    rank[order] = np.arange(len(groups)) - first
    return rank


class EntityTokenizer:
    """Learned entity codes; see the module docstring.

    Parameters
    ----------
    levels, codebook_size : shorthand for ``config.levels`` / ``config.codebook_size``
        (codes per level; the learned codes of the entities are ``codes_``).
    variant : shorthand for ``config.variant``.
    config : the full :class:`QuantizeConfig`.
    """

    def __init__(self, levels: int | None = None, codebook_size: int | None = None, *, variant: str | None = None,
                 config: QuantizeConfig | None = None) -> None:
        self.levels = levels
        self.codebook_size = codebook_size
        self.variant = variant
        self.config = config
        self.resolved_config()  # wrong arguments fail here, as every config does, not at fit

    # --- configuration ----------------------------------------------------------
    def resolved_config(self) -> QuantizeConfig:
        """The config ``fit`` uses: ``config`` (default QuantizeConfig()) with the shorthands applied."""
        if self.config is not None and not isinstance(self.config, QuantizeConfig):
            raise ValueError(f"config must be a QuantizeConfig; got {type(self.config).__name__} {self.config!r}")
        config = self.config or QuantizeConfig()
        changes = {k: v for k, v in (("levels", self.levels), ("codebook_size", self.codebook_size),
                                     ("variant", self.variant)) if v is not None}
        return dataclasses.replace(config, **changes) if changes else config

    def _check_fitted(self) -> None:
        if not hasattr(self, "codes_"):
            raise NotFittedError("this EntityTokenizer is not fitted yet: call fit() or EntityTokenizer.load()")

    # --- learning ---------------------------------------------------------------
    def fit(self, vectors: np.ndarray | torch.Tensor, hierarchy: dict[str, Any] | None = None, *,
            progress: bool = True, log: Callable[[str], None] = print,
            checkpoint: str | Path | None = None) -> EntityTokenizer:
        """Learn codebooks and every entity's codes.

        vectors : (N, D) fused vectors (gsquant, rq, flat) or KGE vectors (realm), row i = entity i.
        hierarchy : stage-3 arrays (:func:`kgtok.hierarchy.load_hierarchy`); needed for GSE/GSR.
        checkpoint : file for resumable training (saved every evaluation, resumed when it matches).
        """
        if hierarchy is not None and not isinstance(hierarchy, Mapping):  # a path failed on string indices
            raise TypeError(f"hierarchy: expected the stage-3 arrays (a dict), got {type(hierarchy).__name__} "
                            f"{hierarchy!r}: read a hierarchy artifact with kgtok.hierarchy.load_hierarchy(path)")
        config = self.resolved_config()
        x = as_vectors(vectors)  # (N, D)
        if len(x) < 2:
            raise ValueError(f"fit needs at least 2 entities; vectors have {len(x)} rows")
        levels, codebook_size = config.resolved_levels(), config.resolved_codebook_size(len(x))
        if config.variant == "realm":
            codebooks, base = fit_realm(x, config, levels, codebook_size, progress=progress)
            model, record = None, TrainingRecord()
        else:
            tree = Hierarchy.from_arrays(hierarchy, levels) if hierarchy is not None else None
            model, record = train_rqvae(x, config, tree, progress=progress, log=log,
                                        checkpoint=Path(checkpoint) if checkpoint else None)
            codebooks = model.quantizer.stacked_codebooks()  # (books, K, code_dim)
            base = model.encode(x)
        base_codes = base.numpy().astype(np.int64)
        codes, collision_rate_before = disambiguate(base_codes)
        # Learned state is set only once all is done: a fit that fails leaves the tokenizer as it was.
        self.config_, self.levels_, self.codebook_size_, self.in_dim_ = config, levels, codebook_size, int(x.shape[1])
        self.codebooks_, self.model_, self.record_ = codebooks, model, record
        self.base_codes_, self.codes_, self.collision_rate_before_ = base_codes, codes, collision_rate_before
        self._build_index()
        return self

    def _build_index(self) -> None:
        keys = self._keys(self.codes_)
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]

    @staticmethod
    def _keys(codes: np.ndarray) -> np.ndarray:
        """One comparable value per row (a raw byte view), so lookups are a searchsorted."""
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        return codes.view(np.dtype((np.void, codes.dtype.itemsize * codes.shape[1]))).ravel()

    # --- applying -----------------------------------------------------------------
    @property
    def width_(self) -> int:
        self._check_fitted()
        return int(self.codes_.shape[1])

    def encode(self, entity_ids: np.ndarray | list[int]) -> np.ndarray:
        """(n,) entity ids, integers in [0, N) -> (n, width) codes."""
        self._check_fitted()
        ids = np.asarray(entity_ids)
        if ids.size == 0:
            ids = ids.astype(np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"entity ids must be integers; got {ids.dtype} values such as {ids.flat[0]!r}")
        outside = (ids < 0) | (ids >= len(self.codes_))
        if outside.any():
            raise ValueError(f"entity ids must lie in [0, {len(self.codes_)}); got {ids[outside].flat[0]} "
                             f"({int(outside.sum())} outside)")
        return self.codes_[ids.astype(np.int64)]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, width) codes -> (n,) entity ids; -1 where no entity has the tuple."""
        self._check_fitted()
        codes = np.atleast_2d(np.asarray(codes, dtype=np.int64))
        if codes.shape[1] != self.width_:
            raise ValueError(f"codes have {codes.shape[1]} columns; this tokenizer's tuples have {self.width_}")
        keys = self._keys(codes)
        position = np.searchsorted(self._sorted_keys, keys)
        position = np.minimum(position, len(self._sorted_keys) - 1)
        found = self._sorted_keys[position] == keys
        return np.where(found, self._order[position], -1)

    def encode_new(self, vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """Codes of entities added after training, through the trained encoder (inductive).

        With a disambiguation level, a new tuple equal to existing ones (trained, or
        earlier in this call) gets the next free rank; otherwise such a collision
        is warned about.  Ranks are free against the trained entities and within
        one call, not across calls: encode all new entities together.
        """
        self._check_fitted()
        x = as_vectors(vectors, self.in_dim_)  # (n, in_dim)
        if self.model_ is None:
            base = realm_codes(x, self.codebooks_).numpy()
        else:
            base = self.model_.encode(x).numpy()
        base = base.astype(np.int64)
        levels = self.base_codes_.shape[1]
        existing = self._keys(self.base_codes_)
        new_keys = self._keys(base)
        if self.width_ == levels:
            taken = int(np.isin(new_keys, existing).sum())
            repeated = len(new_keys) - len(np.unique(new_keys))  # all but one of each tuple the new ones share
            if taken or repeated:
                warnings.warn(f"{taken} new entit(ies) share a code tuple with a trained entity and {repeated} "
                              "with another new one; refit to add a disambiguation level", CollisionWarning,
                              stacklevel=2)
            return base
        # Next free rank: existing group size, plus the rank among the new ones of the same tuple.
        uniq, counts = np.unique(existing, return_counts=True)
        at = np.clip(np.searchsorted(uniq, new_keys), 0, max(len(uniq) - 1, 0))
        start = np.where(uniq[at] == new_keys, counts[at], 0) if len(uniq) else np.zeros(len(base), dtype=np.int64)
        rank = start + rank_in_group(np.unique(new_keys, return_inverse=True)[1].reshape(-1))
        known = int(self.codes_[:, -1].max())  # vocabulary() holds the ranks 0..known
        if len(rank) and rank.max() > known:
            warnings.warn(f"{int((rank > known).sum())} new entit(ies) need a disambiguation rank above {known}, "
                          f"the vocabulary's last (up to {int(rank.max())}): a model extended with vocabulary() "
                          "has no token for them and its tokenizer splits them into pieces; add these tokens to "
                          "it, or refit with the new entities", VocabularyWarning, stacklevel=2)
        return np.concatenate([base, rank[:, None]], axis=1)

    def vectors_of(self, codes: np.ndarray) -> np.ndarray:
        """(n, width) codes -> (n, code_dim) sum of codewords (the disambiguation column has none)."""
        self._check_fitted()
        codes = torch.as_tensor(np.asarray(codes)[:, : self.base_codes_.shape[1]], dtype=torch.long)
        books = self.codebooks_  # (books, K, dim); one book serves every level when shared (flat)
        per_level = [books[0 if len(books) == 1 else level] for level in range(codes.shape[1])]
        return sum_codewords(codes, per_level, books.shape[-1]).numpy()

    # --- tokens -----------------------------------------------------------------
    def token_strings(self, codes: np.ndarray) -> list[str]:
        """(n, width) codes -> one string of level-namespaced tokens per entity."""
        self._check_fitted()
        codes = np.asarray(codes)
        if len(codes) == 0:
            return []
        if codes.min() < 0:
            raise ValueError(f"codes must be >= 0; found {int(codes.min())}")
        columns = []
        for level in range(codes.shape[1]):  # each level's tokens formatted once, then looked up
            table = [f"<{level_namespace(level)}_{c}>" for c in range(int(codes[:, level].max()) + 1)]
            columns.append(list(map(table.__getitem__, codes[:, level].tolist())))
        return list(map("".join, zip(*columns)))

    def vocabulary(self) -> list[str]:
        """Every token the codes can use: levels x K, then the disambiguation ranks."""
        self._check_fitted()
        tokens = [f"<{level_namespace(l)}_{c}>" for l in range(self.base_codes_.shape[1])
                  for c in range(self.codebook_size_)]
        if self.width_ > self.base_codes_.shape[1]:
            name = level_namespace(self.base_codes_.shape[1])
            tokens += [f"<{name}_{c}>" for c in range(int(self.codes_[:, -1].max()) + 1)]
        return tokens

    # --- a Hugging Face model ------------------------------------------------------
    def extend(self, hf_model: Any, hf_tokenizer: Any, *, init: str = "codebook",
               names: list[str] | None = None, boundary: bool = True, seed: int = 0) -> np.ndarray:
        """Add every code token (and ``<ent>``, ``</ent>``) to a transformers model and tokenizer.

        Parameters
        ----------
        hf_model, hf_tokenizer : any causal LM and its tokenizer (resized in place).
        init : ``codebook`` (ReaLM: codewords projected to the model width), ``mean``, or
            ``names`` (each code token starts as the mean name embedding of the entities that
            use it; needs ``names``). See :mod:`kgtok.quantize.hf`.
        names : (N,) entity names, row i = entity i; only ``init="names"`` reads them.
        boundary : also add the entity boundary tokens ``<ent>`` and ``</ent>``.
        seed : the generator of the initialisation's noise and projection.

        Returns
        -------
        (N, width) int64 token ids: row i spells entity i's code tuple, as
        ``token_strings(encode([i]))`` does in text.
        """
        from kgtok.quantize.hf import BOUNDARY_TOKENS, extend_vocabulary

        self._check_fitted()
        if names is not None and len(names) != len(self.codes_):
            raise ValueError(f"names has {len(names)} entries; this tokenizer has {len(self.codes_)} entities")
        vocabulary = self.vocabulary()
        tokens = vocabulary + (list(BOUNDARY_TOKENS) if boundary else [])
        levels, books = self.base_codes_.shape[1], self.codebooks_.numpy()  # (books, K, dim)
        codewords: list[np.ndarray | None] = [None] * len(tokens)
        for i, (level, code) in enumerate(self._token_codes()):
            if level < levels:  # the disambiguation rank has no codeword
                codewords[i] = books[0 if len(books) == 1 else level][code]
        token_entities = None
        if init == "names":
            token_entities = self._token_entities() + [None] * (len(tokens) - len(vocabulary))
        ids = extend_vocabulary(hf_model, hf_tokenizer, tokens, init=init, codewords=codewords,
                                token_entities=token_entities, entity_names=names, seed=seed)
        lookup = np.asarray(ids[: len(vocabulary)], dtype=np.int64)
        return lookup[self._token_index(self.codes_)]

    def _token_codes(self) -> list[tuple[int, int]]:
        """(level, code) of each token of :meth:`vocabulary`, in its order."""
        levels = self.base_codes_.shape[1]
        pairs = [(level, code) for level in range(levels) for code in range(self.codebook_size_)]
        if self.width_ > levels:
            pairs += [(levels, rank) for rank in range(int(self.codes_[:, -1].max()) + 1)]
        return pairs

    def _token_index(self, codes: np.ndarray) -> np.ndarray:
        """(n, width) codes -> (n, width) positions of their tokens in :meth:`vocabulary`."""
        offsets = np.arange(codes.shape[1]) * self.codebook_size_  # (width,) each level's first token
        return np.asarray(codes, dtype=np.int64) + offsets

    def _token_entities(self) -> list[np.ndarray]:
        """Per token of :meth:`vocabulary`, the entities whose code at its level is its code."""
        index = self._token_index(self.codes_).ravel()  # (N * width,)
        entity = np.repeat(np.arange(len(self.codes_)), self.codes_.shape[1])
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(len(self._token_codes()) + 1))
        return [entity[order[bounds[t]: bounds[t + 1]]] for t in range(len(bounds) - 1)]

    # --- persistence ----------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the tokenizer to a directory in the layout of the module docstring (``format_version`` 1)."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION, "kgtok_version": __version__,
            "num_entities": int(len(self.codes_)), "levels": self.levels_, "codebook_size": self.codebook_size_,
            "width": self.width_, "in_dim": self.in_dim_, "collision_rate_before": self.collision_rate_before_,
            "encoder": self.model_ is not None, "config": config_to_dict(self.config_),
            "record": dataclasses.asdict(self.record_),
        }
        np.save(path / "codes.npy", self.codes_)
        np.save(path / "base_codes.npy", self.base_codes_)
        np.save(path / "codebooks.npy", self.codebooks_.numpy())
        (path / "vocab.txt").write_text("".join(t + "\n" for t in self.vocabulary()), encoding="utf-8")
        (path / "entity_tokens.txt").write_text("".join(t + "\n" for t in self.token_strings(self.codes_)),
                                                encoding="utf-8")
        if self.model_ is not None:
            torch.save(self.model_.state_dict(), path / "model.pt")
        elif (path / "model.pt").exists():  # an earlier save's encoder would be read as this one's
            (path / "model.pt").unlink()
        # The config last: a save into a new directory that is cut short leaves no tokenizer.json.
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EntityTokenizer:
        """Read a directory written by :meth:`save_pretrained` (or by ``save`` before format versions), or
        the ``tokenizer/`` folder of the stage-4 artifact ``path``.

        A file that cannot be parsed, or a ``format_version`` this kgtok does
        not know, is named in a ValueError.
        """
        path = Path(path)
        if not (path / CONFIG_FILE).exists() and (path / "tokenizer" / CONFIG_FILE).exists():
            path = path / "tokenizer"  # a stage-4 artifact folder: its tokenizer is in tokenizer/
        tokenizer, meta = _read(path / CONFIG_FILE, cls._from_meta)
        tokenizer.codes_ = _read(path / "codes.npy", np.load)
        tokenizer.base_codes_ = _read(path / "base_codes.npy", np.load)
        tokenizer.codebooks_ = torch.from_numpy(_read(path / "codebooks.npy", np.load))
        tokenizer.model_ = None
        if (path / "model.pt").exists():
            tokenizer.model_ = _read(path / "model.pt", tokenizer._load_model)
        expected = (meta["num_entities"], meta["width"]) if "width" in meta else None  # None: format 0
        if expected is not None and tokenizer.codes_.shape != expected:
            raise ValueError(f"{path / 'codes.npy'}: shape {tokenizer.codes_.shape}; {path / CONFIG_FILE} "
                             f"says {expected} (num_entities, width): the files are from different saves")
        tokenizer._build_index()
        return tokenizer

    save = save_pretrained
    load = from_pretrained

    @classmethod
    def _from_meta(cls, file: Path) -> tuple[EntityTokenizer, dict[str, Any]]:
        meta = json.loads(file.read_text(encoding="utf-8"))
        version = meta.get("format_version", 0)  # 0: written by save() before the layout had a version
        if version not in (0, FORMAT_VERSION):
            raise FormatVersionError(
                f"{file}: format_version {version!r} is not one this kgtok ({__version__}) reads "
                f"(it reads {FORMAT_VERSION}, and files without the field); it was written by kgtok "
                f"{meta.get('kgtok_version', '?')}: upgrade kgtok, or save the tokenizer again with this one")
        config = saved_config(QuantizeConfig, meta["config"])
        tokenizer = cls(config=config)
        tokenizer.config_ = config
        tokenizer.levels_, tokenizer.codebook_size_ = meta["levels"], meta["codebook_size"]
        tokenizer.in_dim_, tokenizer.collision_rate_before_ = meta["in_dim"], meta["collision_rate_before"]
        tokenizer.record_ = TrainingRecord(**meta["record"])
        return tokenizer, meta

    def _load_model(self, file: Path) -> RQVAE:
        model = RQVAE(self.in_dim_, self.config_, self.levels_, self.codebook_size_)
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        return model.eval()


def as_vectors(vectors: np.ndarray | torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """(n, dim) finite vectors as a float32 tensor, or a ValueError that says what is wrong."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (n, {dim or 'dim'}); got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"vectors have {array.shape[1]} dims; the tokenizer was fitted on {dim}")
    x = torch.as_tensor(array, dtype=torch.float32)
    bad = torch.nonzero(~torch.isfinite(x).all(dim=1)).squeeze(1)  # rows with NaN or ±inf (also after float32)
    if len(bad):
        raise ValueError(f"vectors must be finite: {len(bad)} row(s) hold NaN or inf, the first row {int(bad[0])}")
    return x


def _read(file: Path, read: Callable[[Path], Any]) -> Any:
    """``read(file)``; a parse error becomes a ValueError naming the file (a missing file stays an OSError)."""
    try:
        return read(file)
    except (OSError, FormatVersionError):
        raise
    except Exception as e:
        raise ValueError(f"{file}: not a readable part of a saved EntityTokenizer ({type(e).__name__}: {e}); "
                         "write it again with EntityTokenizer.save") from e
