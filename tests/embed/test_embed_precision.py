"""Stage 1's precision: bf16 products close to fp32, chosen by measurement (auto), kept by a resumed run."""

from __future__ import annotations

import pytest
import torch

from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, run_embed
from kgtok.embed import train as embed_train
from kgtok.embed.train import train_model
from kgtok.stage import read_manifest


@pytest.fixture(scope="module")
def kg(tmp_path_factory):
    path = write_synthetic(SyntheticConfig(num_entities=300, seed=1), tmp_path_factory.mktemp("kg") / "synthetic")
    return load_kg(path)


def quiet(*_):
    pass


def small(**overrides) -> EmbedConfig:
    base = dict(dim=16, batch_size=256, max_steps=60, eval_every=20, checkpoint_every=10, threads=1, top_k=5)
    return EmbedConfig(**(base | overrides))


def loss_and_grads(queries, entity, loss_of):
    queries, entity = queries.clone().requires_grad_(), entity.clone().requires_grad_()
    loss = loss_of(queries, entity)
    (2.5 * loss).backward()
    return loss.detach(), queries.grad, entity.grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("blocked", [True, False])
def test_bf16_loss_and_gradients_are_fp32_within_bf16_rounding(label_smoothing, blocked, monkeypatch):
    """The bf16 arm (blocks of 64 entities, or the whole score matrix) rounds the products, so it differs from
    fp32, but by bf16's rounding only; the gradients reach the fp32 weights in fp32."""
    monkeypatch.setattr(embed_train, "_CE_CHUNK_FLOATS", 64 * 7)
    monkeypatch.setattr(embed_train, "_WHOLE_MAX_BYTES", 0 if blocked else 1 << 40)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 24, generator=generator)
    entity = torch.randn(300, 24, generator=generator) * 0.5
    targets = torch.tensor([3, 299, 3, 64, 0, 128, 3])

    class Bilinear:  # what one_vs_all_loss needs of a model
        num_entities = 300

        def __init__(self, rows):
            self.entity = rows

        def one_vs_all_terms(self, batch):
            return self.rows_of_queries, ()

        def compare(self, q, c):
            return q @ c.t()

    def loss_of(dtype):
        def run(q, e):
            model = Bilinear(e)
            model.rows_of_queries = q
            return embed_train.one_vs_all_loss(model, torch.stack([targets, targets, targets], 1),
                                               label_smoothing, dtype)[0]
        return run

    want = loss_and_grads(queries, entity, lambda q, e: torch.nn.functional.cross_entropy(
        q @ e.t(), targets, label_smoothing=label_smoothing))
    fp32 = loss_and_grads(queries, entity, loss_of(torch.float32))
    bf16 = loss_and_grads(queries, entity, loss_of(torch.bfloat16))
    for got, expected in zip(fp32, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(bf16, want):
        assert got.dtype == torch.float32
        assert not torch.equal(got, expected)  # the products were rounded: bf16 ran
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_auto_takes_bf16_only_where_a_step_measured_faster(kg, tmp_path, monkeypatch):
    seen = []
    real_loss = embed_train.one_vs_all_loss
    monkeypatch.setattr(embed_train, "one_vs_all_loss", lambda *a: seen.append(a[3]) or real_loss(*a))
    for timings, want in (({"fp32": 30.0, "bf16": 10.0}, "bf16"), ({"fp32": 10.0, "bf16": 9.0}, "fp32")):
        monkeypatch.setattr(embed_train, "step_timings", lambda *a, t=timings: t)
        monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path / f"cache-{want}"))  # measured anew, not read back
        seen.clear()
        logs = []
        _, state = train_model(kg, small(max_steps=5), tmp_path / want, progress=False, log=logs.append)
        assert (state.precision, state.precision_ms) == (want, timings)
        assert set(seen) == {embed_train.DTYPES[want]} and len(seen) == 5
        assert any(f"embed: {want} (" in line for line in logs)


def test_explicit_fp32_and_nssa_train_in_fp32_without_measuring(kg, tmp_path, monkeypatch):
    def never(*_):
        raise AssertionError("measured")

    monkeypatch.setattr(embed_train, "step_timings", never)
    for name, config in (("fp32", small(precision="fp32")), ("rotate", small(model="rotate", num_negatives=8))):
        _, state = train_model(kg, config, tmp_path / name, progress=False, log=quiet)
        assert (state.precision, state.precision_ms) == ("fp32", {})


def test_bf16_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="precision='bf16'"):
        EmbedConfig(model="rotate", precision="bf16")
    with pytest.raises(ValueError, match="precision='bf16'"):
        EmbedConfig(model="complex", loss="nssa", reciprocal=False, precision="bf16")
    with pytest.raises(ValueError, match="precision='fp16'"):
        EmbedConfig(precision="fp16")
    assert EmbedConfig(model="distmult", precision="bf16").precision == "bf16"


def test_a_resumed_run_keeps_the_precision_it_began_in(kg, tmp_path, monkeypatch):
    """Begun in bf16 and killed, it resumes in bf16 though auto would now measure fp32, and ends where an
    uninterrupted bf16 run ends."""
    config = small()
    monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(embed_train, "step_timings", lambda *a: {"fp32": 30.0, "bf16": 10.0})
    full, _ = train_model(kg, config, tmp_path / "full", progress=False, log=quiet)
    with pytest.raises(InterruptedError):
        train_model(kg, config, tmp_path / "killed", progress=False, stop_after=35, log=quiet)
    monkeypatch.setattr(embed_train, "step_timings", lambda *a: {"fp32": 10.0, "bf16": 30.0})
    monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path / "another-cache"))  # auto would now measure fp32
    resumed, state = train_model(kg, config, tmp_path / "killed", progress=False, log=quiet)
    assert state.precision == "bf16" and state.step == 60
    assert torch.equal(full.entity, resumed.entity)
    fp32, _ = train_model(kg, small(precision="fp32"), tmp_path / "fp32", progress=False, log=quiet)
    assert not torch.equal(fp32.entity, resumed.entity)  # bf16 trained another model


def test_step_timings_leave_the_weights_and_gradients_as_they_were(kg):
    config = small().resolved_for(kg)
    model, _ = embed_train.build(config, kg)
    before = model.entity.detach().clone()
    batch = embed_train.training_examples(kg, True)[:64]
    timings = embed_train.step_timings(model, batch, config)
    assert set(timings) == {"fp32", "bf16"} and min(timings.values()) > 0
    assert torch.equal(model.entity.detach(), before) and model.entity.grad is None


def test_the_artifact_records_the_precision_it_trained_in(kg, tmp_path):
    dest = run_embed(small(max_steps=300, eval_every=50, dim=32, precision="bf16"), kg, tmp_path / "embed",
                     progress=False, log=quiet)
    metrics = read_manifest(dest)["metrics"]
    assert metrics["precision"] == "bf16" and "precision_step_ms" not in metrics
    assert metrics["test_mrr"] > 0.25  # learns as fp32 does (test_train's threshold for this graph)
