"""Readers of the outputs of the engines that train KG embeddings past one machine.

Stage 1 for a graph that does not fit here is PyTorch-BigGraph's or DGL-KE's
job; these readers turn their outputs into the arrays ``kgtok embed-import``
writes as a stage-1 artifact (:func:`kgtok.embed.importer.import_foreign`).

PyTorch-BigGraph (PBG), a training's two folders:

    checkpoint_path/checkpoint_version.txt         the committed version N
    checkpoint_path/embeddings_<type>_<part>.vN.h5  dataset "embeddings": (rows of the part, D)
    checkpoint_path/model.vN.h5                    group "model": relations/<i>/operator/<side>/<param>
    checkpoint_path/config.json                    relations (name, operator), comparator, bias, dynamic_relations
    entity_path/entity_names_<type>_<part>.json    JSON list: the raw name of each row of the part
    entity_path/dynamic_rel_names.json             JSON list: relation names (dynamic relations)

PBG scores ``comparator(h, op_r(t))``: its operator acts on the right-hand
(tail) side. ``complex_diagonal`` with the ``dot`` comparator is
Re(conj(h) r t) = Re(h conj(r) conj(t)), ComplEx with the relation conjugated:
kgtok's relation row is ``[real | -imag]``. ``diagonal`` with ``dot`` is
DistMult. The global embedding of the entity type (``global_emb``, on by
default; ``model/entities/<type>/global_embedding``) is added to every row,
as PBG adds it before scoring. Other operators and comparators (PBG's default
is ``cos``), and ``bias``, have no kgtok scoring function:
their entity vectors import, without ranking. Only the right-hand operators
are read (with dynamic relations PBG also learns left-hand ones, used for
its head-side negatives; kgtok ranks heads with the same right-hand ones).

DGL-KE (``dglke_train --save_path S --data_path D --dataset X --model_name M``):

    S/X_M_entity.npy     (N, D) entity vectors, row i = entity id i (ComplEx/RotatE: [re | im])
    S/X_M_relation.npy   (R, D_r) relation vectors (RotatE: raw phases, as the RotatE code)
    S/config.json        the training's arguments (``gamma`` is read: kgtok's ``margin``)
    D/entities.tsv       id<TAB>name, the row order of the entity matrix
    D/relations.tsv      id<TAB>name

DGL-KE's ComplEx, DistMult, RotatE and TransE_l1 score as kgtok's ``complex``,
``distmult``, ``rotate`` and ``transe`` (``margin`` = DGL-KE's ``gamma``, read
from config.json unless given; RotatE's phases are scaled by it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from kgtok.embed.importer import ForeignEmbeddings, read_order

# DGL-KE model names -> kgtok models with the same scoring function (None: vectors only)
DGLKE_MODELS: dict[str, str | None] = {
    "ComplEx": "complex", "DistMult": "distmult", "RotatE": "rotate", "TransE_l1": "transe",
    "TransE_l2": None, "TransE": None, "RESCAL": None, "TransR": None, "SimplE": None,
}


# ----------------------------------------------------------------------------
# PyTorch-BigGraph
# ----------------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading PyTorch-BigGraph checkpoints needs h5py: pip install 'kgtok[pbg]' "
                          "(or pip install h5py)") from e
    return h5py


def pbg_version(checkpoint: Path) -> int:
    """The committed checkpoint version (``checkpoint_version.txt``), else the highest model.vN.h5."""
    version_file = checkpoint / "checkpoint_version.txt"
    if version_file.exists() and version_file.read_text(encoding="utf-8").strip():
        return int(version_file.read_text(encoding="utf-8").strip())
    versions = [int(m.group(1)) for p in checkpoint.glob("embeddings_*.v*.h5")
                if (m := re.search(r"\.v(\d+)\.h5$", p.name))]
    if not versions:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint_version.txt and no embeddings_<type>_<part>.v<N>.h5: "
                                "not a PyTorch-BigGraph checkpoint folder")
    return max(versions)


def read_pbg(checkpoint: str | Path, entity_path: str | Path, *, entity_type: str = "all",
             version: int | None = None) -> ForeignEmbeddings:
    """Entity vectors of one entity type (all partitions, in partition order) and the relation parameters.

    Parameters
    ----------
    checkpoint : PBG's ``checkpoint_path``.
    entity_path : PBG's ``entity_path`` (the importer's output: entity names per partition).
    entity_type : the entity type to read (PBG's examples use ``all``).
    version : checkpoint version; None: the committed one.
    """
    h5py = _h5py()
    checkpoint, entity_path = Path(checkpoint), Path(entity_path)
    version = pbg_version(checkpoint) if version is None else version
    parts = sorted((int(m.group(1)), p) for p in checkpoint.glob(f"embeddings_{entity_type}_*.v{version}.h5")
                   if (m := re.fullmatch(rf"embeddings_{re.escape(entity_type)}_(\d+)\.v{version}\.h5", p.name)))
    if not parts:
        raise FileNotFoundError(f"{checkpoint}: no embeddings_{entity_type}_<part>.v{version}.h5 (entity type "
                                f"{entity_type!r}, version {version})")
    if [i for i, _ in parts] != list(range(len(parts))):
        raise FileNotFoundError(f"{checkpoint}: partitions {[i for i, _ in parts]} of entity type {entity_type!r}; "
                                f"expected 0..{len(parts) - 1}")
    vectors, names, files = [], [], {}
    for part, path in parts:
        names_file = entity_path / f"entity_names_{entity_type}_{part}.json"
        if not names_file.exists():
            raise FileNotFoundError(f"{names_file}: missing (the entity names of partition {part}, written by "
                                    "PBG's importer into entity_path)")
        with h5py.File(path, "r") as f:
            if "embeddings" not in f:
                raise ValueError(f"{path}: no dataset 'embeddings' (not a PBG entity partition file)")
            block = np.asarray(f["embeddings"][...], dtype=np.float32)  # (rows, D)
        part_names = [str(n) for n in json.loads(names_file.read_text(encoding="utf-8"))]
        if len(part_names) != len(block):
            raise ValueError(f"{names_file}: {len(part_names)} names but {path} holds {len(block)} rows")
        vectors.append(block)
        names.extend(part_names)
        files[f"pbg/{path.name}"] = path
        files[f"pbg/{names_file.name}"] = names_file
    out = ForeignEmbeddings(entity_vectors=np.concatenate(vectors), entity_names=names, files=files,
                            source=f"PyTorch-BigGraph checkpoint {checkpoint}")
    model_file = checkpoint / f"model.v{version}.h5"
    if model_file.exists():
        files[f"pbg/{model_file.name}"] = model_file
        with h5py.File(model_file, "r") as f:  # global_emb (PBG's default): a vector PBG adds to every row
            key = f"model/entities/{entity_type}/global_embedding"
            if key in f:
                out.entity_vectors += np.asarray(f[key][...], dtype=np.float32)
        out.model, out.relation_vectors, out.relation_names = _pbg_relations(checkpoint, entity_path, model_file)
    return out


def _pbg_relations(checkpoint: Path, entity_path: Path, model_file: Path
                   ) -> tuple[str | None, np.ndarray | None, list[str] | None]:
    """(kgtok model, relation rows in its layout, relation names) from PBG's right-hand operators."""
    h5py = _h5py()
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    params: dict[int, dict[str, np.ndarray]] = {}
    with h5py.File(model_file, "r") as f:
        if "model" not in f:
            return None, None, None

        def visit(name: str, item: object) -> None:
            m = re.fullmatch(r"relations/(\d+)/operator/rhs/(\w+)", name)
            if m and isinstance(item, h5py.Dataset):
                params.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(item[...], dtype=np.float32)

        f["model"].visititems(visit)
    if not params:
        return None, None, None
    dynamic = bool(config.get("dynamic_relations", len(params) == 1 and np.ndim(next(iter(params[0].values()))) == 2))
    if dynamic:
        names_file = entity_path / "dynamic_rel_names.json"
        names = [str(n) for n in json.loads(names_file.read_text(encoding="utf-8"))] if names_file.exists() else None
        table = params[0]  # every parameter (R, width)
    else:  # one operator per configured relation: stack them
        names = [str(r["name"]) for r in config.get("relations", [])] or None
        keys = set.intersection(*(set(p) for p in params.values()))
        table = {k: np.stack([params[i][k] for i in sorted(params)]) for k in keys}
    # PBG's defaults where config.json lacks a key: comparator cos, no bias (the first coordinate a bias term).
    dot = config.get("comparator", "cos") == "dot" and not config.get("bias", False)
    diagonal = table.get("diagonal", table.get("diagonals"))  # the dynamic operator's parameter is "diagonals"
    if set(table) == {"real", "imag"} and dot:
        relations = np.concatenate([table["real"], -table["imag"]], axis=1)  # conj(r): see the module docstring
        model: str | None = "complex"
    elif len(table) == 1 and diagonal is not None and dot:
        relations, model = diagonal, "distmult"
    else:  # translation, linear, affine, cos, a bias: no kgtok scoring function
        relations, model = np.concatenate([table[k].reshape(len(table[k]), -1) for k in sorted(table)], axis=1), None
    if names is not None and len(names) != len(relations):
        raise ValueError(f"{model_file}: {len(relations)} relation operators but {len(names)} relation names")
    return model, relations.astype(np.float32), names


# ----------------------------------------------------------------------------
# DGL-KE
# ----------------------------------------------------------------------------


def read_dglke(save_path: str | Path, data_path: str | Path, *, dataset: str | None = None,
               model_name: str | None = None) -> ForeignEmbeddings:
    """DGL-KE's saved vectors (``<dataset>_<model>_entity.npy``, ``..._relation.npy``) and the dataset's
    ``entities.tsv``/``relations.tsv`` (id<TAB>name). ``dataset``/``model_name`` pick one save when the
    folder holds several."""
    save_path, data_path = Path(save_path), Path(data_path)
    pattern = f"{dataset or '*'}_{model_name or '*'}_entity.npy"
    found = sorted(save_path.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{save_path}: {len(found)} files match {pattern} (expected one DGL-KE save); "
                                "give dataset= and model_name= to pick one" if found else
                                f"{save_path}: no {pattern} (a DGL-KE --save_path holds <dataset>_<model>_entity.npy)")
    entity_file = found[0]
    stem = entity_file.name[: -len("_entity.npy")]
    model = next((m for m in sorted(DGLKE_MODELS, key=len, reverse=True) if stem.endswith("_" + m)), None)
    entity_order = data_path / "entities.tsv"
    if not entity_order.exists():
        raise FileNotFoundError(f"{entity_order}: missing (DGL-KE's id<TAB>name entity list of --data_path)")
    out = ForeignEmbeddings(entity_vectors=np.load(entity_file).astype(np.float32),
                            entity_names=read_order(entity_order), source=f"DGL-KE save {entity_file}",
                            files={f"dglke/{entity_file.name}": entity_file, "dglke/entities.tsv": entity_order},
                            model=DGLKE_MODELS.get(model) if model else None)
    settings = save_path / "config.json"  # DGL-KE's save_model writes its arguments there
    if settings.exists():
        try:
            gamma = json.loads(settings.read_text()).get("gamma")
            out.margin = None if gamma is None else float(gamma)
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{settings}: not DGL-KE's JSON object of training arguments with a numeric gamma "
                             f"({e})") from e
        out.files["dglke/config.json"] = settings
    relation_file = save_path / f"{stem}_relation.npy"
    relation_order = data_path / "relations.tsv"
    if relation_file.exists() and relation_order.exists():
        out.relation_vectors = np.load(relation_file).astype(np.float32)
        out.relation_names = read_order(relation_order)
        out.files.update({f"dglke/{relation_file.name}": relation_file, "dglke/relations.tsv": relation_order})
    return out
