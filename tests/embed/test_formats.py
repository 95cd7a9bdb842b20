"""PyTorch-BigGraph and DGL-KE outputs, written here in their layouts, import as stage-1 artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kgtok.cli import cli
from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import load_model
from kgtok.embed.formats import read_dglke, read_pbg
from kgtok.embed.importer import ImportConfig, import_foreign


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def kg(tmp_path_factory):
    return load_kg(write_synthetic(SyntheticConfig(num_entities=200, seed=4), tmp_path_factory.mktemp("kg") / "kg"))


def complex_vectors(kg, dim=6, seed=0):
    """Random ComplEx entity rows [re | im] (N, 2 dim) and relation rows (R, 2 dim)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(kg.num_entities, 2 * dim)).astype(np.float32),
            rng.normal(size=(kg.num_relations, 2 * dim)).astype(np.float32))


def write_pbg(kg, root, entities, real, imag, *, parts=2, version=3):
    """A PBG training's checkpoint_path and entity_path, as PBG writes them (two partitions, dynamic relations)."""
    h5py = pytest.importorskip("h5py")
    checkpoint, entity_path = root / "model", root / "data"
    checkpoint.mkdir(parents=True)
    entity_path.mkdir(parents=True)
    order = np.random.default_rng(1).permutation(kg.num_entities)  # PBG's own row order
    for part, rows in enumerate(np.array_split(order, parts)):
        with h5py.File(checkpoint / f"embeddings_all_{part}.v{version}.h5", "w") as f:
            f.attrs["format_version"] = 1
            f.create_dataset("embeddings", data=entities[rows])
        (entity_path / f"entity_names_all_{part}.json").write_text(json.dumps([kg.entity_names[i] for i in rows]))
        (entity_path / f"entity_count_all_{part}.txt").write_text(f"{len(rows)}\n")
    relation_order = np.random.default_rng(2).permutation(kg.num_relations)
    with h5py.File(checkpoint / f"model.v{version}.h5", "w") as f:
        f.attrs["format_version"] = 1
        group = f.create_group("model")
        group.create_dataset("relations/0/operator/rhs/real", data=real[relation_order])
        group.create_dataset("relations/0/operator/rhs/imag", data=imag[relation_order])
        group.create_dataset("relations/0/operator/lhs/real", data=np.zeros_like(real))
        group.create_dataset("relations/0/operator/lhs/imag", data=np.zeros_like(imag))
    (entity_path / "dynamic_rel_names.json").write_text(json.dumps([kg.relation_names[i] for i in relation_order]))
    (checkpoint / "config.json").write_text(json.dumps({
        "entity_path": str(entity_path), "checkpoint_path": str(checkpoint), "dynamic_relations": True,
        "comparator": "dot", "relations": [{"name": "all_edges", "lhs": "all", "rhs": "all",
                                            "operator": "complex_diagonal"}]}))
    (checkpoint / "checkpoint_version.txt").write_text(f"{version}\n")
    return checkpoint, entity_path


def pbg_dot_scores(lhs, rhs, real, imag):
    """PBG's score dot(h, op_r(t)), op_r(t) = r * t (complex product on the tail side), rows [re | im]."""
    dim = real.shape[1]
    re, im = rhs[:, :dim], rhs[:, dim:]
    return (lhs * np.concatenate([re * real - im * imag, re * imag + im * real], axis=1)).sum(1)


def test_pbg_checkpoint_imports_with_its_scores(kg, tmp_path):
    dim = 6
    entities, _ = complex_vectors(kg, dim)
    rng = np.random.default_rng(3)
    real, imag = rng.normal(size=(2, kg.num_relations, dim)).astype(np.float32)
    checkpoint, entity_path = write_pbg(kg, tmp_path, entities, real, imag)
    foreign = read_pbg(checkpoint, entity_path)
    assert foreign.model == "complex" and len(foreign.entity_names) == kg.num_entities
    dest = import_foreign(kg, foreign, tmp_path / "imported", progress=False, log=quiet,
                          config=ImportConfig(model="complex", top_k=5, export_splits=("test",), threads=1))
    np.testing.assert_allclose(np.load(dest / "entity_embeddings.npy"), entities)
    model, _ = load_model(dest)
    triples = kg.test[:20]
    h, r, t = (triples[:, i].numpy() for i in range(3))
    ours = model.score_triples(torch.as_tensor(triples)).detach().numpy()
    np.testing.assert_allclose(ours, pbg_dot_scores(entities[h], entities[t], real[r], imag[r]), rtol=1e-5, atol=1e-5)
    metrics = json.loads((dest / "metrics.json").read_text())
    assert 0 < metrics["test"]["both"]["mrr"] <= 1
    with pytest.raises(ValueError, match="score as model=complex, not model=distmult"):
        import_foreign(kg, foreign, tmp_path / "wrong", config=ImportConfig(model="distmult"), log=quiet)


def test_pbg_errors_name_the_missing_file(kg, tmp_path):
    pytest.importorskip("h5py")
    entities, _ = complex_vectors(kg)
    checkpoint, entity_path = write_pbg(kg, tmp_path, entities, *np.ones((2, kg.num_relations, 6), np.float32))
    (entity_path / "entity_names_all_1.json").unlink()
    with pytest.raises(FileNotFoundError, match="entity_names_all_1.json"):
        read_pbg(checkpoint, entity_path)
    with pytest.raises(FileNotFoundError, match="entity type 'user'"):
        read_pbg(checkpoint, entity_path, entity_type="user")


def write_pbg_static(kg, root, entities, operators, *, operator="complex_diagonal", global_embedding=None,
                     config_extra=None):
    """A PBG checkpoint with one operator per relation (no dynamic relations), one partition, and optionally
    the entity type's global embedding; ``config_extra`` None writes no config.json (PBG's defaults apply)."""
    h5py = pytest.importorskip("h5py")
    checkpoint, entity_path = root / "model", root / "data"
    checkpoint.mkdir(parents=True)
    entity_path.mkdir(parents=True)
    with h5py.File(checkpoint / "embeddings_all_0.v1.h5", "w") as f:
        f.create_dataset("embeddings", data=entities)
    (entity_path / "entity_names_all_0.json").write_text(json.dumps(kg.entity_names))
    with h5py.File(checkpoint / "model.v1.h5", "w") as f:
        group = f.create_group("model")
        for r in range(kg.num_relations):
            for name, values in operators.items():
                group.create_dataset(f"relations/{r}/operator/rhs/{name}", data=values[r])
        if global_embedding is not None:
            group.create_dataset("entities/all/global_embedding", data=global_embedding)
    if config_extra is not None:
        (checkpoint / "config.json").write_text(json.dumps({
            "dynamic_relations": False, "relations": [{"name": n, "lhs": "all", "rhs": "all", "operator": operator}
                                                      for n in kg.relation_names], **config_extra}))
    (checkpoint / "checkpoint_version.txt").write_text("1\n")
    return checkpoint, entity_path


def test_pbg_global_embedding_is_added_before_scoring(kg, tmp_path):
    """PBG adds its type's global embedding (global_emb, on by default) to every entity before the operator."""
    dim = 6
    entities, _ = complex_vectors(kg, dim)
    rng = np.random.default_rng(7)
    real, imag = rng.normal(size=(2, kg.num_relations, dim)).astype(np.float32)
    shift = (3 * rng.normal(size=2 * dim)).astype(np.float32)
    checkpoint, entity_path = write_pbg_static(kg, tmp_path, entities, {"real": real, "imag": imag},
                                               global_embedding=shift, config_extra={"comparator": "dot"})
    foreign = read_pbg(checkpoint, entity_path)
    assert foreign.model == "complex"
    dest = import_foreign(kg, foreign, tmp_path / "imported", progress=False, log=quiet,
                          config=ImportConfig(model="complex", top_k=5, export_splits=("test",), threads=1))
    model, _ = load_model(dest)
    triples = kg.test[:20]
    h, r, t = (triples[:, i].numpy() for i in range(3))
    expected = pbg_dot_scores(entities[h] + shift, entities[t] + shift, real[r], imag[r])
    np.testing.assert_allclose(model.score_triples(torch.as_tensor(triples)).detach().numpy(), expected,
                               rtol=1e-4, atol=1e-4)


def test_pbg_scoring_is_recognised_only_where_kgtok_has_it(kg, tmp_path):
    """DistMult's operator is "diagonal" (static) or "diagonals" (dynamic); PBG's default comparator (cos, when
    config.json is missing) and a bias coordinate have no kgtok scoring function: vectors only."""
    entities, _ = complex_vectors(kg, 3)
    diagonal = {"diagonal": np.ones((kg.num_relations, 6), np.float32)}
    assert read_pbg(*write_pbg_static(kg, tmp_path / "a", entities, diagonal, operator="diagonal",
                                      config_extra={"comparator": "dot"})).model == "distmult"
    assert read_pbg(*write_pbg_static(kg, tmp_path / "b", entities, diagonal)).model is None
    assert read_pbg(*write_pbg_static(kg, tmp_path / "c", entities, diagonal, operator="diagonal",
                                      config_extra={"comparator": "dot", "bias": True})).model is None
    checkpoint, entity_path = write_pbg(kg, tmp_path / "d", entities, *np.ones((2, kg.num_relations, 3), np.float32))
    h5py = pytest.importorskip("h5py")
    with h5py.File(checkpoint / "model.v3.h5", "a") as f:  # dynamic DistMult: one (R, D) "diagonals" table
        del f["model/relations"]
        f["model"].create_dataset("relations/0/operator/rhs/diagonals", data=np.ones((kg.num_relations, 6)))
    foreign = read_pbg(checkpoint, entity_path)
    assert foreign.model == "distmult" and foreign.relation_vectors.shape == (kg.num_relations, 6)


def write_dglke(kg, root, entities, relations, model_name="ComplEx", dataset="mykg"):
    """DGL-KE's --save_path (<dataset>_<model>_entity.npy, _relation.npy) and --data_path (entities.tsv, ...)."""
    save, data = root / "ckpts" / f"{model_name}_{dataset}_0", root / "data"
    save.mkdir(parents=True)
    data.mkdir(parents=True)
    order = np.random.default_rng(5).permutation(kg.num_entities)  # DGL-KE's ids are its own
    np.save(save / f"{dataset}_{model_name}_entity.npy", entities[order])
    np.save(save / f"{dataset}_{model_name}_relation.npy", relations)
    (data / "entities.tsv").write_text("".join(f"{i}\t{kg.entity_names[e]}\n" for i, e in enumerate(order)))
    (data / "relations.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(kg.relation_names)))
    return save, data


def test_dglke_save_imports_and_ranks_like_the_vectors(kg, tmp_path):
    entities, relations = complex_vectors(kg, seed=7)
    save, data = write_dglke(kg, tmp_path, entities, relations)
    foreign = read_dglke(save, data)
    assert foreign.model == "complex"
    dest = import_foreign(kg, foreign, tmp_path / "imported", progress=False, log=quiet,
                          config=ImportConfig(model="complex", top_k=5, export_splits=("test",), threads=1))
    np.testing.assert_allclose(np.load(dest / "entity_embeddings.npy"), entities)
    np.testing.assert_allclose(np.load(dest / "relation_embeddings.npy"), relations)
    assert (dest / "candidates" / "test.npz").exists()


def dglke_rotate_scores(head, tail, relation, gamma, dim):
    """DGL-KE's RotatEScore: γ - Σ |h ∘ e^{iθ} - t|, θ = r / ((γ + 2) / dim / π), rows [re | im]."""
    theta = relation / ((gamma + 2.0) / dim / np.pi)
    hr, hi, tr, ti = head[:, :dim], head[:, dim:], tail[:, :dim], tail[:, dim:]
    re, im = hr * np.cos(theta) - hi * np.sin(theta) - tr, hr * np.sin(theta) + hi * np.cos(theta) - ti
    return gamma - np.sqrt(re ** 2 + im ** 2).sum(1)


def test_dglke_rotate_is_scored_with_the_gamma_of_its_config(kg, tmp_path):
    dim, gamma = 6, 3.0
    entities, _ = complex_vectors(kg, dim, seed=9)
    relations = np.random.default_rng(10).uniform(-1, 1, size=(kg.num_relations, dim)).astype(np.float32)
    save, data = write_dglke(kg, tmp_path, entities, relations, model_name="RotatE")
    (save / "config.json").write_text(json.dumps({"model_name": "RotatE", "gamma": gamma, "hidden_dim": dim}))
    foreign = read_dglke(save, data)
    assert foreign.model == "rotate" and foreign.margin == gamma
    config = ImportConfig(model="rotate", top_k=5, export_splits=("test",), threads=1)
    dest = import_foreign(kg, foreign, tmp_path / "imported", progress=False, log=quiet, config=config)
    model, _ = load_model(dest)
    triples = kg.test[:20]
    h, r, t = (triples[:, i].numpy() for i in range(3))
    ours = model.score_triples(torch.as_tensor(triples)).detach().numpy()
    np.testing.assert_allclose(ours, dglke_rotate_scores(entities[h], entities[t], relations[r], gamma, dim),
                               rtol=1e-4, atol=1e-4)
    said = []  # a margin given by the user wins, with a warning naming both
    import_foreign(kg, foreign, tmp_path / "given", progress=False, log=said.append,
                   config=ImportConfig(model="rotate", margin=9.0, top_k=5, export_splits=("test",), threads=1))
    assert any("margin=9.0 as given" in line and "gamma=3.0" in line for line in said)
    assert load_model(tmp_path / "given")[0].margin == 9.0
    (save / "config.json").write_text(json.dumps({"gamma": [3.0]}))  # was a TypeError traceback
    with pytest.raises(ValueError, match=r"config.json: not DGL-KE's JSON object of training arguments with a numeric"):
        read_dglke(save, data)


def test_a_different_margin_is_warned_about_only_where_it_changes_ranks(kg, tmp_path):
    """γ scales RotatE's phases; for DistMult (and ComplEx, TransE) it offsets scores at most: no warning."""
    entities, relations = complex_vectors(kg, seed=11)
    save, data = write_dglke(kg, tmp_path, entities, relations, model_name="DistMult")
    (save / "config.json").write_text(json.dumps({"gamma": 12.0}))
    said = []
    import_foreign(kg, read_dglke(save, data), tmp_path / "d", progress=False, log=said.append,
                   config=ImportConfig(model="distmult", margin=9.0, top_k=5, export_splits=("test",), threads=1))
    assert not any("as given" in line for line in said)


def test_embed_import_command_reads_both_formats(kg, tmp_path):
    entities, relations = complex_vectors(kg, seed=8)
    save, data = write_dglke(kg, tmp_path, entities, relations, model_name="DistMult")
    runner = CliRunner()
    done = runner.invoke(cli, ["embed-import", "--data", str(kg.source), "--format", "dglke", "--checkpoint",
                               str(save), "--entity-path", str(data), "--out", str(tmp_path / "dgl"), "threads=1"])
    assert done.exit_code == 0, done.output
    np.testing.assert_allclose(np.load(tmp_path / "dgl" / "entity_embeddings.npy"), entities)
    done = runner.invoke(cli, ["embed-import", "--data", str(kg.source), "--format", "pbg", "--out",
                               str(tmp_path / "x")])
    assert done.exit_code == 2 and "--format pbg needs --checkpoint and --entity-path" in done.output
    pytest.importorskip("h5py")
    ones = np.ones((kg.num_relations, 6), np.float32)
    checkpoint, entity_path = write_pbg(kg, tmp_path / "pbg", entities, ones, ones)
    done = runner.invoke(cli, ["embed-import", "--data", str(kg.source), "--format", "pbg", "--checkpoint",
                               str(checkpoint), "--entity-path", str(entity_path), "--out", str(tmp_path / "pbg-out"),
                               "threads=1"])
    assert done.exit_code == 0, done.output
    np.testing.assert_allclose(np.load(tmp_path / "pbg-out" / "entity_embeddings.npy"), entities)
    assert np.load(tmp_path / "pbg-out" / "relation_embeddings.npy").shape == (kg.num_relations, 12)
