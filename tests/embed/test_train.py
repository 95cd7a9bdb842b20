"""Training learns, resumes exactly after a kill, exports the documented artifact, and picks its precision."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kgtok.config import load_config
from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.embed import EmbedConfig, RankedQueries, load_model, run_embed
from kgtok.embed import train as embed_train
from kgtok.embed.train import subsampling_weights, train_model
from kgtok.runtime import seeded_generator
from kgtok.stage import ResumeWarning, read_manifest

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "kgtok" / "configs"


@pytest.fixture(scope="module")
def kg(tmp_path_factory):
    path = write_synthetic(SyntheticConfig(num_entities=300, seed=1), tmp_path_factory.mktemp("kg") / "synthetic")
    return load_kg(path)


def quiet(*_):
    pass


def small(**overrides) -> EmbedConfig:
    base = dict(dim=16, batch_size=256, max_steps=60, eval_every=20, checkpoint_every=10, threads=1, top_k=5)
    return EmbedConfig(**(base | overrides))


def test_complex_learns_the_synthetic_kg(kg, tmp_path):
    dest = run_embed(small(max_steps=300, eval_every=50, dim=32), kg, tmp_path / "embed", progress=False, log=quiet)
    metrics = json.loads((dest / "metrics.json").read_text())
    # A random scorer has MRR ~ ln(300)/300 ~ 0.02; the planted structure makes it learnable.
    assert metrics["test"]["both"]["mrr"] > 0.25
    assert metrics["test"]["both"]["hits_at_10"] > 0.5
    assert metrics["valid"]["both"]["count"] == 2 * len(kg.valid)
    # The exported model is the best validated one, not the last one.
    best = max(h["valid_mrr"] for h in metrics["history"])
    assert metrics["valid"]["both"]["mrr"] == pytest.approx(best, abs=1e-9)
    assert metrics["best_step"] == max(metrics["history"], key=lambda h: h["valid_mrr"])["step"]


@pytest.mark.parametrize("model", ["complex", "rotate"])
def test_resume_after_kill_gives_the_uninterrupted_result(kg, tmp_path, model):
    config = small(model=model, num_negatives=8) if model == "rotate" else small(model=model)
    full, _ = train_model(kg, config, tmp_path / "full", progress=False, log=quiet)
    with pytest.raises(InterruptedError):
        # Killed at step 35: the last checkpoint is at step 30, so 5 steps are redone.
        train_model(kg, config, tmp_path / "killed", progress=False, stop_after=35, log=quiet)
    assert (tmp_path / "killed" / "last.pt").exists()
    logs: list[str] = []
    resumed, state = train_model(kg, config, tmp_path / "killed", progress=False, log=logs.append)
    assert any("resuming" in line and "step 30" in line for line in logs)
    assert state.step == 60
    assert torch.equal(full.entity, resumed.entity) and torch.equal(full.relation, resumed.relation)


def test_resume_with_a_budget_it_already_passed_or_a_decay_it_reshapes_starts_afresh(kg, tmp_path):
    """Killed at step 35 of 60, resumed with max_steps=20: it trained on to its best of 35 steps and was cached
    as a 20-step result; with a decaying learning rate a new max_steps mixes two schedules."""
    with pytest.raises(InterruptedError):
        train_model(kg, small(), tmp_path / "a", progress=False, stop_after=35, log=quiet)
    logs: list[str] = []
    restarted, state = train_model(kg, small(max_steps=20), tmp_path / "a", progress=False, log=logs.append)
    assert any("not resuming" in line and "max_steps=20 is below it" in line for line in logs)
    fresh, _ = train_model(kg, small(max_steps=20), tmp_path / "fresh", progress=False, log=quiet)
    assert state.step == 20 and torch.equal(restarted.entity, fresh.entity)
    decaying = small(lr_decay_from=0.5)
    with pytest.raises(InterruptedError):
        train_model(kg, decaying, tmp_path / "b", progress=False, stop_after=35, log=quiet)
    logs.clear()
    train_model(kg, dataclasses.replace(decaying, max_steps=80), tmp_path / "b", progress=False, log=logs.append)
    assert any("the learning rate decays over max_steps=80" in line for line in logs)
    logs.clear()
    with pytest.raises(InterruptedError):
        train_model(kg, small(), tmp_path / "c", progress=False, stop_after=35, log=quiet)
    train_model(kg, small(max_steps=80), tmp_path / "c", progress=False, log=logs.append)  # constant lr: resumes
    assert any("resuming" in line and "step 30" in line for line in logs)


def killed_after(monkeypatch, steps: int) -> None:
    """Make stage 1 die (as a kill would) once it has taken ``steps`` training steps in this process."""
    taken = []
    step = embed_train.training_step

    def dying_step(*args, **kwargs):
        if len(taken) == steps:
            raise KeyboardInterrupt
        taken.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(embed_train, "training_step", dying_step)


def test_changed_config_restarts_with_a_warning(kg, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(patch, 25)
        with pytest.raises(KeyboardInterrupt):
            run_embed(small(), kg, tmp_path / "w", progress=False, log=quiet)
    assert (tmp_path / "w.work" / "last.pt").exists() and not (tmp_path / "w").exists()
    with pytest.warns(ResumeWarning, match=r"different config \(lr\); the new config wins"):
        run_embed(small(lr=0.05, max_steps=20), kg, tmp_path / "w", progress=False, log=quiet)
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["metrics"]["steps"] == 20
    # Training longer is a resume, not a restart; the new max_steps wins.
    with monkeypatch.context() as patch:
        killed_after(patch, 30)
        with pytest.raises(KeyboardInterrupt):
            run_embed(small(max_steps=40), kg, tmp_path / "v", progress=False, log=quiet)
    logs: list[str] = []
    with pytest.warns(ResumeWarning, match=r"max_steps: 40 -> 50\); the new values win"):
        run_embed(small(max_steps=50), kg, tmp_path / "v", progress=False, log=logs.append)
    assert any("resuming" in line and "step 30" in line for line in logs)
    assert json.loads((tmp_path / "v" / "manifest.json").read_text())["metrics"]["steps"] == 50
    # Another thread count is neither a change nor a resume note: the finished artifact is reused.
    again = run_embed(small(max_steps=50, threads=2), kg, tmp_path / "v", progress=False, log=logs.append)
    assert again == tmp_path / "v" and not (tmp_path / "v.work").exists()


def test_artifact_layout(kg, tmp_path):
    config = small(export_splits=("valid", "test"))
    dest = run_embed(config, kg, tmp_path / "embed", progress=False, log=quiet)
    assert not (tmp_path / "embed.work").exists()  # checkpoints removed after success
    entities = np.load(dest / "entity_embeddings.npy")
    assert entities.shape == (kg.num_entities, 32) and entities.dtype == np.float32
    assert np.load(dest / "relation_embeddings.npy").shape == (2 * kg.num_relations, 32)  # reciprocal
    names = [line.split("\t")[1] for line in (dest / "entities.tsv").read_text().splitlines()]
    assert names == kg.entity_names
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["stage"] == "embed" and manifest["config"]["dim"] == 16
    test = RankedQueries.load(dest / "candidates" / "test.npz")
    n = len(kg.test)
    assert test.candidates.shape == (2 * n, 5) and test.rank.shape == (2 * n,)
    assert not (dest / "candidates" / "train.npz").exists()
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["test"]["both"]["mrr"] == pytest.approx(float(np.mean(1 / test.rank)))
    # The saved model reproduces the exported ranks.
    model, saved = load_model(dest)
    from kgtok.embed.ranking import rank_triples

    again = rank_triples(model, kg.test, kg.filter_index, reciprocal=saved["reciprocal"],
                         num_base_relations=kg.num_relations, top_k=5)
    np.testing.assert_array_equal(again.candidates, test.candidates)


def test_subsampling_weights_match_rotate_counting():
    triples = torch.tensor([[0, 0, 1], [0, 0, 2], [3, 0, 1], [2, 1, 1]])
    count: Counter = Counter()
    for h, r, t in triples.tolist():
        count[(h, r)] += 1
        count[(t, -r - 1)] += 1
    expected = [1 / np.sqrt((count[(h, r)] + 3) + (count[(t, -r - 1)] + 3)) for h, r, t in triples.tolist()]
    np.testing.assert_allclose(subsampling_weights(triples, 4, 2).numpy(), expected, rtol=1e-6)


def test_config_checks():
    with pytest.raises(ValueError) as err:
        EmbedConfig(dim=0, lr=-1.0, export_splits=("train", "dev"))
    text = str(err.value)
    assert "dim=0" in text and "lr=-1.0" in text and "export_splits" in text
    assert EmbedConfig(model="rotate").resolved_optimizer == "adam"
    assert EmbedConfig().resolved_loss == "1vsall" and EmbedConfig().resolved_reciprocal


def test_shipped_configs_load():
    paths = sorted(CONFIGS.glob("embed_*.yaml"))
    assert paths, "no embed configs shipped"
    for path in paths:
        assert isinstance(load_config(EmbedConfig, path), EmbedConfig)


def test_eval_every_zero_validates_once_per_epoch(kg, tmp_path):
    """The default (0) validates at each epoch's end, so small and large graphs get the same schedule."""
    config = small(eval_every=0, batch_size=100, max_steps=10**6, patience=2)
    _, state = train_model(kg, config, tmp_path, progress=False, log=quiet)
    epoch = -(-2 * len(kg.train) // 100)  # reciprocal relations: a query per side
    assert [h["step"] for h in state.history] == [epoch * (i + 1) for i in range(len(state.history))]
    assert state.bad_evaluations == 2 and state.step < 10**6  # early stopping ended it


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_the_whole_score_matrix(label_smoothing, monkeypatch):
    """Blocks of entities (here of 64, so 300 entities take five, the last short) must give the loss and both
    gradients of F.cross_entropy over the whole (batch, N) scores, repeated targets included."""
    monkeypatch.setattr(embed_train, "_CE_CHUNK_FLOATS", 64 * 7)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    entity = torch.randn(300, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 299, 3, 64, 0, 128, 3])
    grads = []
    for chunked in (True, False):
        if chunked:
            loss = embed_train.ChunkedCrossEntropy.apply(queries, entity, targets, label_smoothing)
        else:
            loss = torch.nn.functional.cross_entropy(queries @ entity.t(), targets, label_smoothing=label_smoothing)
        (2.5 * loss).backward()  # an upstream gradient other than 1
        grads.append((loss.detach(), queries.grad, entity.grad))
        queries.grad = entity.grad = None
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_adagrad_on_cpu_takes_the_plain_steps(kg):
    """The CPU's fused Adagrad (one pass over the table) must move the weights as the plain one does."""
    config = EmbedConfig(dim=8, batch_size=64, threads=1)
    model, optimizer = embed_train.build(config, kg)
    assert optimizer.defaults["fused"]
    plain_model, _ = embed_train.build(config, kg)
    plain = torch.optim.Adagrad(plain_model.parameters(), lr=config.resolved_lr)
    examples = embed_train.training_examples(kg, reciprocal=True)
    for step in range(3):
        batch = examples[step * 64:(step + 1) * 64]
        embed_train.training_step(model, optimizer, batch, config, step)
        embed_train.training_step(plain_model, plain, batch, config, step)
    torch.testing.assert_close(model.entity.detach(), plain_model.entity.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.equal(model.entity.detach(), embed_train.build(config, kg)[0].entity.detach())  # it moved


def test_learning_rate_decays_over_the_last_steps(kg, tmp_path, monkeypatch):
    """lr_decay_from=0.5: the configured rate for the first half, then a half cosine that reaches 0 at max_steps."""
    config = small(lr=0.2, lr_decay_from=0.5, max_steps=20, eval_every=20)
    assert [config.lr_at(s) for s in (0, 9, 10)] == [0.2, 0.2, 0.2]
    assert config.lr_at(15) == pytest.approx(0.1) and config.lr_at(20) == pytest.approx(0.0, abs=1e-12)
    assert small(lr=0.2).lr_at(59) == 0.2  # the default keeps it constant
    seen = []
    step = embed_train.training_step

    def recording(model, optimizer, batch, config, step_number, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return step(model, optimizer, batch, config, step_number, **kwargs)

    monkeypatch.setattr(embed_train, "training_step", recording)
    train_model(kg, config, tmp_path, progress=False, log=quiet)
    assert seen == pytest.approx([config.lr_at(s) for s in range(20)])
    assert seen[10] == 0.2 and seen[11] < 0.2 and seen[-1] < 0.01


def test_default_n3_weight_follows_the_graphs_density(kg, tmp_path):
    """None: 0.2 / (training triples per entity) in [0.005, 0.1] for 1-vs-all; a given weight wins; nssa has none."""
    config = EmbedConfig()
    assert config.n3_weight(2.0) == pytest.approx(0.1) and config.n3_weight(40.0) == pytest.approx(0.005)
    assert config.n3_weight(1.0) == 0.1 and config.n3_weight(1000.0) == 0.005
    assert config.n3_weight(82.0) == 0.005  # Kinship's density: the floor, not 0.0024
    assert EmbedConfig(regularizer_weight=0.3).n3_weight(40.0) == 0.3
    assert EmbedConfig(model="rotate").n3_weight(40.0) == 0.0
    density = len(kg.triples["train"]) / kg.num_entities
    assert config.resolved_for(kg).regularizer_weight == pytest.approx(0.2 / density)
    logs: list[str] = []
    train_model(kg, small(max_steps=2, eval_every=2), tmp_path / "w", progress=False, log=logs.append)
    assert any(f"N3 weight {0.2 / density:.4g}" in line for line in logs)


def test_the_density_rule_is_in_the_cache_record(kg, tmp_path):
    """An artifact made under the former fixed N3 default must not be reused for regularizer_weight: null."""
    from kgtok.embed.stage import default_rules

    assert default_rules(EmbedConfig()) == {"embed/n3_weight": "0.2/density in [0.005, 0.1]"}
    assert default_rules(EmbedConfig(regularizer_weight=0.05)) == {}
    # nssa's default updates switch to rows on big graphs: nor is a dense-trained artifact reused for sparse: null
    assert default_rules(EmbedConfig(model="rotate")) == {"embed/sparse": "from 200000 entities"}
    assert default_rules(EmbedConfig(model="rotate", sparse=False)) == {}
    dest = run_embed(small(max_steps=4, eval_every=2), kg, tmp_path / "e", progress=False, log=quiet)
    record = json.loads((dest / "manifest.json").read_text())
    assert "embed/n3_weight" in json.dumps(record)


def test_sparse_updates_move_only_the_rows_of_the_batch(kg):
    """Row gradients (big graphs with sampled negatives): a step changes the rows its batch and negatives touch,
    through the library's lazy Adam; dense Adam moves every row (its moments decay everywhere)."""
    config = EmbedConfig(model="distmult", dim=8, loss="nssa", num_negatives=4, batch_size=16, threads=1, sparse=True)
    model, optimizer = embed_train.build(config, kg)
    assert model.sparse and isinstance(optimizer, torch.optim.SparseAdam)
    before = model.entity.detach().clone()
    batch = embed_train.training_examples(kg, reciprocal=False)[:16]
    for step in range(2):
        embed_train.training_step(model, optimizer, batch, config, step)
    moved = set(torch.nonzero((model.entity.detach() != before).any(1)).flatten().tolist())
    touched = set(batch[:, [0, 2]].flatten().tolist())
    for step in range(2):  # the negatives of each step, drawn as training_step draws them
        touched |= set(torch.randint(kg.num_entities, (16, 4), generator=seeded_generator(0, 3, step)).flatten().tolist())
    assert moved and moved <= touched and len(moved) < kg.num_entities
    dense = dataclasses.replace(config, sparse=False)
    assert not embed_train.build(dense, kg)[0].sparse
    assert EmbedConfig(model="rotate").sparse_for(199_999) is False and EmbedConfig(model="rotate").sparse_for(200_000)
    assert EmbedConfig().sparse_for(10**7) is False  # 1-vs-all scores the whole table: never sparse
    with pytest.raises(ValueError, match="sparse"):
        EmbedConfig(sparse=True)


@pytest.mark.parametrize("name", ["rotate", "transe", "distmult", "complex"])
def test_shared_negatives_score_as_the_same_ids_per_example(name, kg):
    """One (K,) draw shared by the batch (one product) must give the loss and gradients of the same ids repeated
    per example (compare_each); with row updates a step then moves only the batch's rows and those K."""
    config = EmbedConfig(model=name, dim=8, loss="nssa", num_negatives=5, batch_size=16, threads=1, sparse=True,
                         shared_negatives=True)
    batch = embed_train.training_examples(kg, reciprocal=False)[:16]
    weights = torch.linspace(0.5, 1.5, 16)
    shared = torch.randint(kg.num_entities, (5,), generator=torch.Generator().manual_seed(1))
    grads = []
    for negatives in (shared, shared.expand(16, 5)):
        model, _ = embed_train.build(dataclasses.replace(config, sparse=False), kg)
        loss = embed_train.nssa_loss(model, batch, weights, negatives, corrupt_head=True, temperature=1.0)
        loss.backward()
        grads.append((loss.detach(), model.entity.grad, model.relation.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model, optimizer = embed_train.build(config, kg)
    before = model.entity.detach().clone()
    embed_train.training_step(model, optimizer, batch, config, 0)
    moved = set(torch.nonzero((model.entity.detach() != before).any(1)).flatten().tolist())
    drawn = torch.randint(kg.num_entities, (5,), generator=seeded_generator(0, 3, 0))  # as training_step draws
    assert moved and moved <= set(batch[:, [0, 2]].flatten().tolist()) | set(drawn.tolist())
    with pytest.raises(ValueError, match="shared_negatives"):
        EmbedConfig(shared_negatives=True)  # 1-vs-all draws none


def test_sparse_training_learns_as_dense_training_does(kg, tmp_path):
    """Lazy Adam on row gradients learns this graph about as well as dense Adam (both far above chance, 0.02)."""
    mrr = {}
    for sparse in (False, True):
        config = small(model="distmult", loss="nssa", num_negatives=16, dim=32, max_steps=200, eval_every=50, lr=0.01,
                       sparse=sparse)
        dest = run_embed(config, kg, tmp_path / str(sparse), progress=False, log=quiet)
        mrr[sparse] = json.loads((dest / "metrics.json").read_text())["test"]["both"]["mrr"]
    assert mrr[True] > 0.15 and abs(mrr[True] - mrr[False]) < 0.03


def test_one_vs_all_refuses_reciprocal_false_also_when_the_loss_is_resolved_from_the_model():
    """loss=auto with complex resolves to 1vsall, which scores tails only: reciprocal=false was accepted and head
    queries were never trained (reviewer, Nations: head MRR 0.55 against 0.76)."""
    for model, loss in (("complex", "auto"), ("distmult", "auto"), ("rotate", "1vsall")):
        with pytest.raises(ValueError, match="reciprocal.*not false with 1vsall"):
            EmbedConfig(model=model, loss=loss, reciprocal=False)
    assert EmbedConfig(model="rotate", reciprocal=False).resolved_loss != "1vsall"  # sampled negatives: allowed


# --- precision (EmbedConfig.precision): bf16 products close to fp32, chosen by measurement, kept on resume


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
