"""Device plumbing of stages 1, 3 and 4 run on the CPU, and the quantizer's training in two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kgtok.runtime import resolve_device


def quiet(*_):
    pass


def test_device_setting_resolves_to_the_cpu_here():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device=cuda but torch sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize("cls", ["EmbedConfig", "HierarchyConfig", "QuantizeConfig"])
def test_device_is_a_config_field_that_counts(cls):
    """Not a machine field: GPU sums differ from the CPU's in the last bits, so the cache must tell them apart."""
    import kgtok.embed
    import kgtok.hierarchy
    import kgtok.quantize
    from kgtok.config import MACHINE, fields_with_effect

    config = next(getattr(m, cls) for m in (kgtok.embed, kgtok.hierarchy, kgtok.quantize) if hasattr(m, cls))
    assert config().device == "auto"
    assert "device" not in fields_with_effect(config, MACHINE)
    with pytest.raises(ValueError):
        from kgtok.config import load_config

        load_config(config, None, ["device=gpu"])


def blobs(n_per=150, k=6, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    x = np.repeat(centres, n_per, 0) + 0.15 * rng.normal(size=(k * n_per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(k), n_per)


def test_torch_kmeans_finds_the_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    from kgtok.hierarchy.build import torch_kmeans

    x, truth = blobs()
    labels = torch_kmeans(x, 6, iterations=20, seed=0, device="cpu", batch=128)  # several blocks of rows
    assert adjusted_rand_score(truth, labels) > 0.95
    np.testing.assert_array_equal(labels, torch_kmeans(x, 6, iterations=20, seed=0, device="cpu"))  # seeded
    assert len(np.unique(torch_kmeans(x[:5], 5, seed=1))) == 5  # as many clusters as points: none empty


def test_hierarchy_takes_the_gpu_path_when_the_device_is_a_gpu(monkeypatch):
    """With a GPU (faked) the kmeans builder calls the torch k-means; here it computes on the CPU."""
    import kgtok.runtime
    from kgtok.hierarchy import HierarchyConfig
    from kgtok.hierarchy import build

    calls = []
    real = build.torch_kmeans

    def on_cpu(x, k, **kwargs):
        calls.append(kwargs["device"])
        return real(x, k, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(kgtok.runtime, "resolve_device", lambda device: SimpleNamespace(type="cuda"))
    monkeypatch.setattr(build, "torch_kmeans", on_cpu)
    x, truth = blobs(n_per=60)
    tree = build.SemanticHierarchy(HierarchyConfig(levels=2, builder="kmeans", clusters_per_level=(6, 24),
                                                   device="cuda")).fit(x)
    assert calls and all(d.type == "cuda" for d in calls)
    assert tree.counts_ == [6, 24]
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, tree.paths_[:, 0]) > 0.95


def test_quantizer_on_an_explicit_cpu_device_gives_the_auto_codes():
    from kgtok.quantize import EntityTokenizer, QuantizeConfig

    x, truth = blobs(n_per=40)
    base = dict(variant="rq", levels=2, codebook_size=8, code_dim=8, encoder_hidden=(16,), epochs=2, eval_every=1,
                threads=1)
    auto = EntityTokenizer(config=QuantizeConfig(**base)).fit(x, progress=False, log=quiet)
    cpu = EntityTokenizer(config=QuantizeConfig(**base, device="cpu")).fit(x, progress=False, log=quiet)
    np.testing.assert_array_equal(auto.codes_, cpu.codes_)
    assert next(cpu.model_.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_quantize_under_accelerate_two_cpu_processes(tmp_path):
    """Two CPU processes (gloo) train one model data-parallel; the codes match one process's, within rounding."""
    from kgtok.artifacts import artifact_dir
    from kgtok.data import load_kg
    from kgtok.data.synthetic import SyntheticConfig, write_synthetic
    from kgtok.hierarchy import HierarchyConfig, run_hierarchy
    from kgtok.quantize import QuantizeConfig, run_quantize

    kg_dir = write_synthetic(SyntheticConfig(num_entities=300, seed=4), tmp_path / "kg")
    kg = load_kg(kg_dir)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(kg.num_entities, 4))[kg.entity_types[:, 1] % 4] + 0.3 * rng.normal(
        size=(kg.num_entities, 4))
    embed = tmp_path / "embed"
    with artifact_dir(embed, stage="embed", config={}) as writer:  # a stage-1 artifact made by hand
        np.save(writer.path / "entity_embeddings.npy", np.concatenate([vectors, rng.normal(size=(len(vectors), 12))], 1))
        (writer.path / "entities.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(kg.entity_names)))
    hierarchy = run_hierarchy(HierarchyConfig(levels=3, threads=1), kg, tmp_path / "h", embeddings=embed, log=quiet)
    settings = ["levels=3", "codebook_size=16", "code_dim=16", "encoder_hidden=[32]", "epochs=4", "eval_every=2",
                "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "kgtok.cli", "quantize", "--data", str(kg_dir), "--hierarchy", str(hierarchy),
               "--out", str(tmp_path / "q2"), "--no-progress", *settings]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "q2" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["collision_rate_after"] == 0.0
    assert not list(tmp_path.glob(".q2.rank*"))  # the second process's private copy is gone
    config = QuantizeConfig(levels=3, codebook_size=16, code_dim=16, encoder_hidden=(32,), epochs=4, eval_every=2,
                            threads=1)
    one = run_quantize(config, kg, tmp_path / "q1", hierarchy=hierarchy, progress=False, log=quiet)
    two_codes, one_codes = np.load(tmp_path / "q2" / "codes.npy"), np.load(one / "codes.npy")
    assert (two_codes[:, :3] == one_codes[:, :3]).all(axis=1).mean() > 0.9


@pytest.mark.parametrize("local_rank, expected", [(None, [0]), ("3", [3]), ("5", [1])])
def test_a_stage_keeps_the_random_state_of_its_own_gpu_only(monkeypatch, local_rank, expected):
    """Reading a GPU's random state opens a CUDA context there: under DDP, every process on every GPU."""
    from contextlib import contextmanager

    from kgtok.runtime import preserved_global_rng

    forked = []

    @contextmanager
    def fork_rng(devices):
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with preserved_global_rng():
        pass
    assert forked == [expected]
