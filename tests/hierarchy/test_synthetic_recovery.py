"""Stages 1-3 on the synthetic KG: the fused tree recovers the true taxonomy (issue target NMI >= 0.8)."""

from __future__ import annotations

import json

import pytest

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, run_embed
from kgtok.hierarchy import HierarchyConfig, run_hierarchy
from kgtok.text import TextConfig, run_text


@pytest.mark.slow
def test_fused_hierarchy_recovers_true_types(tmp_path):
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=800, seed=0), tmp_path / "kg"))
    quiet = lambda *_: None  # noqa: E731
    embed = run_embed(EmbedConfig(dim=32, max_steps=300, eval_every=100, threads=1, export_splits=("test",)),
                      kg, tmp_path / "embed", progress=False, log=quiet)
    text = run_text(TextConfig(threads=1, cache_dir=str(tmp_path / "cache")), kg, tmp_path / "text",
                    progress=False, log=quiet)
    dest = run_hierarchy(HierarchyConfig(threads=1), kg, tmp_path / "hierarchy", embeddings=embed, text=text, log=quiet)
    metrics = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert metrics["builder"] == "agglomerative" and metrics["rho"] == 0.5
    assert metrics["nmi_level_1"] >= 0.8  # level 1 vs the 4 true top types
    assert metrics["nmi_level_2"] >= 0.85  # level 2 vs the 16 true subtypes
