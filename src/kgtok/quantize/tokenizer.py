"""EntityTokenizer: entities <-> unique code tuples <-> token strings, scikit-learn style.

    tok = EntityTokenizer(levels=4, codebook_size=1024).fit(fused_vectors, hierarchy)
    tok.encode([0, 5])            # (2, width) codes
    tok.decode(codes)             # entity ids (exact: every tuple is unique)
    tok.token_strings(codes)      # ['<a_17><b_903><c_4><d_250>', ...]
    tok.encode_new(vectors)       # codes of entities added after training (inductive)
    tok.save(path); EntityTokenizer.load(path)

Uniqueness (defect 3 of the reference code): after training, entities sharing
a tuple get one more, final *disambiguation* code (their rank in the group, 0
for the first), as semantic-ID work does; the collision rate before the fix is
kept in ``collision_rate_before_``.  The column exists only when needed.
Each level has its own token namespace (defect 5): ``<a_..>``, ``<b_..>``, ...
"""

from __future__ import annotations

import dataclasses
import json
import string
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kgtok.config import config_from_dict, config_to_dict
from kgtok.quantize.config import QuantizeConfig
from kgtok.quantize.metrics import collision_rate, tuple_groups
from kgtok.quantize.model import RQVAE, Hierarchy
from kgtok.quantize.quantizer import sum_codewords
from kgtok.quantize.train import TrainingRecord, fit_realm, realm_codes, train_rqvae


class CollisionWarning(UserWarning):
    """A new entity's code tuple equals an existing one and no disambiguation level exists."""


class NotFittedError(ValueError, AttributeError):
    """The tokenizer was used before ``fit`` or ``load``."""


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
    rate = collision_rate(codes)
    if rate == 0.0:
        return codes, rate
    rank = rank_in_group(tuple_groups(codes)[0]).astype(codes.dtype)
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

    # --- configuration ----------------------------------------------------------
    def resolved_config(self) -> QuantizeConfig:
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
        config = self.resolved_config()
        x = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        self.config_ = config
        self.levels_ = config.resolved_levels()
        self.codebook_size_ = config.resolved_codebook_size(len(x))
        self.in_dim_ = int(x.shape[1])
        if config.variant == "realm":
            self.codebooks_, base = fit_realm(x, config, self.levels_, self.codebook_size_, progress=progress)
            self.model_ = None
            self.record_ = TrainingRecord()
        else:
            tree = Hierarchy.from_arrays(hierarchy, self.levels_) if hierarchy is not None else None
            self.model_, self.record_ = train_rqvae(x, config, tree, progress=progress, log=log,
                                                    checkpoint=Path(checkpoint) if checkpoint else None)
            self.codebooks_ = self.model_.quantizer.stacked_codebooks()  # (books, K, code_dim)
            base = self.model_.encode(x)
        self.base_codes_ = base.numpy().astype(np.int64)
        self.codes_, self.collision_rate_before_ = disambiguate(self.base_codes_)
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
        """(n,) entity ids -> (n, width) codes."""
        self._check_fitted()
        return self.codes_[np.asarray(entity_ids, dtype=np.int64)]

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

        With a disambiguation level, a new tuple equal to existing ones gets the
        next free rank; otherwise such a collision is warned about.
        """
        self._check_fitted()
        x = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        if x.shape[1] != self.in_dim_:
            raise ValueError(f"vectors have {x.shape[1]} dims; the tokenizer was fitted on {self.in_dim_}")
        if self.model_ is None:
            base = realm_codes(x, self.codebooks_).numpy()
        else:
            base = self.model_.encode(x).numpy()
        base = base.astype(np.int64)
        levels = self.base_codes_.shape[1]
        existing = self._keys(self.base_codes_)
        new_keys = self._keys(base)
        taken = np.isin(new_keys, existing)
        if self.width_ == levels:
            if taken.any():
                warnings.warn(f"{int(taken.sum())} new entit(ies) share a code tuple with a trained entity; "
                              "refit to add a disambiguation level", CollisionWarning, stacklevel=2)
            return base
        # Next free rank: existing group size, plus the rank among the new ones of the same tuple.
        uniq, counts = np.unique(existing, return_counts=True)
        at = np.clip(np.searchsorted(uniq, new_keys), 0, max(len(uniq) - 1, 0))
        start = np.where(uniq[at] == new_keys, counts[at], 0) if len(uniq) else np.zeros(len(base), dtype=np.int64)
        rank = rank_in_group(np.unique(new_keys, return_inverse=True)[1].reshape(-1))
        return np.concatenate([base, (start + rank)[:, None]], axis=1)

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
        names = [level_namespace(level) for level in range(np.asarray(codes).shape[1])]
        return ["".join(f"<{names[l]}_{c}>" for l, c in enumerate(row)) for row in np.asarray(codes).tolist()]

    def vocabulary(self) -> list[str]:
        """Every token the codes can use: levels x K, then the disambiguation ranks."""
        self._check_fitted()
        tokens = [f"<{level_namespace(l)}_{c}>" for l in range(self.base_codes_.shape[1])
                  for c in range(self.codebook_size_)]
        if self.width_ > self.base_codes_.shape[1]:
            name = level_namespace(self.base_codes_.shape[1])
            tokens += [f"<{name}_{c}>" for c in range(int(self.codes_[:, -1].max()) + 1)]
        return tokens

    # --- persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write config, codebooks, codes and encoder weights to a directory."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "config": config_to_dict(self.config_), "levels": self.levels_, "codebook_size": self.codebook_size_,
            "in_dim": self.in_dim_, "collision_rate_before": self.collision_rate_before_,
            "record": dataclasses.asdict(self.record_),
        }
        (path / "tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        np.save(path / "codes.npy", self.codes_)
        np.save(path / "base_codes.npy", self.base_codes_)
        np.save(path / "codebooks.npy", self.codebooks_.numpy())
        if self.model_ is not None:
            torch.save(self.model_.state_dict(), path / "model.pt")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EntityTokenizer:
        path = Path(path)
        meta = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        config = config_from_dict(QuantizeConfig, meta["config"])
        tokenizer = cls(config=config)
        tokenizer.config_ = config
        tokenizer.levels_, tokenizer.codebook_size_ = meta["levels"], meta["codebook_size"]
        tokenizer.in_dim_, tokenizer.collision_rate_before_ = meta["in_dim"], meta["collision_rate_before"]
        tokenizer.record_ = TrainingRecord(**meta["record"])
        tokenizer.codes_ = np.load(path / "codes.npy")
        tokenizer.base_codes_ = np.load(path / "base_codes.npy")
        tokenizer.codebooks_ = torch.from_numpy(np.load(path / "codebooks.npy"))
        tokenizer.model_ = None
        if (path / "model.pt").exists():
            model = RQVAE(tokenizer.in_dim_, config, tokenizer.levels_, tokenizer.codebook_size_)
            model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
            model.eval()
            tokenizer.model_ = model
        tokenizer._build_index()
        return tokenizer
