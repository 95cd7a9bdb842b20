"""Stage 4: gradients through every level, GSE/GSR, unique codes, tokenizer round trips, variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kgtok.quantize import EntityTokenizer, GSEConfig, QuantizeConfig, run_quantize
from kgtok.quantize.model import RQVAE, Hierarchy, gse_losses
from kgtok.quantize.tokenizer import (
    CollisionWarning,
    NotFittedError,
    VocabularyWarning,
    disambiguate,
    level_namespace,
)


def clustered(n: int = 240, dim: int = 16, seed: int = 0, clusters: int = 4):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % clusters
    centres = rng.normal(size=(clusters, dim)) * 2
    x = centres[labels] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def hierarchy_arrays(x: np.ndarray, labels: np.ndarray, levels: int = 2) -> dict:
    """A 2-level tree: the planted clusters, then each split in two by the sign of one coordinate."""
    fine = np.unique(labels * 2 + (x[:, 0] > 0), return_inverse=True)[1].reshape(-1)  # dense, none empty
    paths = np.stack([labels, fine], 1)[:, :levels]
    centroids, neighbours = [], []
    for level in range(levels):
        k = paths[:, level].max() + 1
        c = np.stack([x[paths[:, level] == i].mean(0) for i in range(k)])
        centroids.append((c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32))
        neighbours.append(np.array([[j for j in range(k) if j != i][:3] for i in range(k)]))
    return {"paths": paths, "centroids": centroids, "neighbours": neighbours, "fused_vectors": x}


def small_config(**overrides) -> QuantizeConfig:
    base = dict(levels=3, codebook_size=8, code_dim=8, encoder_hidden=(16,), epochs=6, eval_every=2, threads=1)
    return QuantizeConfig(**(base | overrides))


def check_gse_level_gradients(level: int) -> None:
    """Level ``level``'s GSE loss moves the encoder through every residual r_0..r_l, and codebooks 0..l only.

    The GSE operand is p_l = Σ_{j<=l} (v_j + r_j - sg(r_j)). With r_{l+1} = r_l - sg(v_l),
    ∂r_j/∂z = I for every j, so the gradient at the encoder output z is exactly (l + 1) times
    the gradient at p_l. The reference's r_{l+1} = r_l - ṽ_l leaves only r_0's path: once.
    """
    x, labels = clustered()
    config = small_config()
    model = RQVAE(x.shape[1], config, levels=3, codebook_size=8)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        model.quantizer.kmeans_init(model.encoder(xt), seed=0)
    tree = Hierarchy.from_arrays(hierarchy_arrays(x, labels), levels=3)
    z = model.encoder(xt[:64])  # (64, code_dim)
    out = model.quantizer(z)
    centre_codes = [model.encoder(c).detach() for c in tree.centroids]  # only the operand's paths count here
    _, l1, l2 = gse_losses(out.prefixes, centre_codes, tree.clusters[:64], tree.neighbours,
                           lambda1=0.8, lambda2=0.4, temperature=0.1)
    loss = l1[level] + l2[level]
    at_z, at_prefix = torch.autograd.grad(loss, [z, out.prefixes[level]], retain_graph=True)
    assert at_prefix.abs().sum() > 0
    torch.testing.assert_close(at_z, (level + 1) * at_prefix, rtol=1e-5, atol=1e-7)
    loss.backward()
    encoder_grad = sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None)
    assert encoder_grad > 0
    book_grad = [0.0 if book.weight.grad is None else book.weight.grad.abs().sum()
                 for book in model.quantizer.codebooks]  # (levels,)
    assert all(book_grad[j] > 0 for j in range(level + 1))  # codebooks up to this level move
    assert all(book_grad[j] == 0 for j in range(level + 1, 3))  # deeper ones do not


def reference_update(residual: torch.Tensor, codeword: torch.Tensor) -> torch.Tensor:
    """The public reference's r_{l+1} = r_l - ṽ_l, ṽ_l = r_l + sg(v_l - r_l): same value, no gradient."""
    return residual - (residual + (codeword - residual).detach())


@pytest.mark.parametrize("level", [0, 1, 2])
def test_every_gse_level_moves_encoder_and_codebooks(level):
    """The reference defect: r_{l+1} = r_l - ṽ_l cut the gradient; here each level's GSE reaches the encoder."""
    check_gse_level_gradients(level)


@pytest.mark.parametrize("level", [1, 2])
def test_gse_gradient_check_fails_under_the_reference_update(level, monkeypatch):
    """Guard for the test above: with the reference's residual update swapped in, its check fails."""
    import kgtok.quantize.quantizer as quantizer

    monkeypatch.setattr(quantizer, "next_residual", reference_update)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_gse_level_gradients(level)


def test_reference_residual_update_would_cut_the_gradient():
    """The reference code's update leaves level >= 1 without encoder gradient."""
    x, _ = clustered()
    config = small_config()
    model = RQVAE(x.shape[1], config, levels=3, codebook_size=8)
    z = model.encoder(torch.as_tensor(x[:32]))
    residual = z
    for level in range(2):
        _, v = model.quantizer.codebooks[level](residual)
        residual = reference_update(residual, v)  # the reference: r_{l+1} = r_l - ṽ_l
    # The level-2 residual's gradient with respect to the encoder is exactly zero (r - r cancels).
    grads = torch.autograd.grad((residual * torch.randn_like(residual)).sum(), list(model.encoder.parameters()),
                                allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_fit_and_tiny_backbone_leave_the_callers_random_stream_alone(tmp_path):
    """Both seed torch's global generator to initialise their modules (same weights for the same seed) and
    restore the caller's state after: they reseeded it before (a user's later torch.rand changed)."""
    from kgtok.llm.backbone import TinyBackboneConfig, build_tiny

    x, labels = clustered(n=64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = EntityTokenizer(config=small_config(variant="rq", epochs=2)).fit(x, progress=False)
    build_tiny(["red fox", "blue jay"] * 3, tmp_path / "tiny", TinyBackboneConfig(vocab_size=300, hidden_size=16,
               layers=1, heads=2, intermediate_size=32))
    torch.testing.assert_close(torch.rand(3), expected)
    torch.manual_seed(7)  # another caller state: the same codes
    second = EntityTokenizer(config=small_config(variant="rq", epochs=2)).fit(x, progress=False)
    np.testing.assert_array_equal(first.encode(np.arange(64)), second.encode(np.arange(64)))


def test_gsr_trains_and_checkpoint_is_the_highest_entropy():
    x, labels = clustered(n=320)
    tokenizer = EntityTokenizer(config=small_config(epochs=12)).fit(x, hierarchy_arrays(x, labels), progress=False)
    history = tokenizer.record_.history
    assert "loss_gsr" in history[0] and "loss_gse" in history[0]
    assert history[-1]["loss_gsr"] < history[0]["loss_gsr"]  # the causal decoder learns
    evaluated = [h for h in history if "heldout_entropy" in h]
    best = max(evaluated, key=lambda h: h["heldout_entropy"])
    assert tokenizer.record_.best_epoch == best["epoch"]


def test_training_stops_once_entropy_stops_rising():
    x, labels = clustered(n=320)
    arrays = hierarchy_arrays(x, labels)
    full = EntityTokenizer(config=small_config(variant="rq", epochs=30, eval_every=1, patience=0)).fit(
        x, arrays, progress=False)
    stopped = EntityTokenizer(config=small_config(variant="rq", epochs=30, eval_every=1, patience=2)).fit(
        x, arrays, progress=False)
    entropies = [h["heldout_entropy"] for h in full.record_.history]
    # the first epoch after which two evaluations in a row did not beat the best so far
    best, bad, expected_stop = -1.0, 0, 30
    for epoch, value in enumerate(entropies, start=1):
        best, bad = (value, 0) if value > best else (best, bad + 1)
        if bad >= 2:
            expected_stop = epoch
            break
    assert expected_stop < 30, "the fixture should plateau within 30 epochs"
    assert stopped.record_.stopped_epoch == expected_stop
    assert len(stopped.record_.history) == expected_stop
    # same seed, same steps: the early-stopped run kept the same checkpoint as the full run up to there
    assert stopped.record_.best_epoch == max(range(expected_stop), key=lambda i: entropies[i]) + 1
    np.testing.assert_array_equal(stopped.base_codes_, full_prefix_codes(x, arrays, stopped.record_.best_epoch))


def test_killed_training_resumes_to_the_same_codes(tmp_path, monkeypatch):
    import kgtok.quantize.train as train

    x, labels = clustered(n=320)
    arrays = hierarchy_arrays(x, labels)
    config = small_config(epochs=8, eval_every=2, patience=0)
    reference = EntityTokenizer(config=config).fit(x, arrays, progress=False)
    checkpoint = tmp_path / "work" / "train.pt"

    calls = {"n": 0}
    usage = train.code_usage

    def dies_at_the_third_evaluation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill: after epoch 4's checkpoint, during epoch 6's evaluation
        return usage(*args, **kwargs)

    monkeypatch.setattr(train, "code_usage", dies_at_the_third_evaluation)
    with pytest.raises(KeyboardInterrupt):
        EntityTokenizer(config=config).fit(x, arrays, progress=False, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 4
    monkeypatch.setattr(train, "code_usage", usage)
    logs: list[str] = []
    resumed = EntityTokenizer(config=config).fit(x, arrays, progress=False, checkpoint=checkpoint, log=logs.append)
    assert any("resumed after epoch 4" in line for line in logs)
    np.testing.assert_array_equal(resumed.base_codes_, reference.base_codes_)
    assert [h["epoch"] for h in resumed.record_.history] == list(range(1, 9))
    assert resumed.record_.best_epoch == reference.record_.best_epoch
    # nor does another tree (GSE and GSR train against it) with the same vectors and config
    logs.clear()
    other_tree = hierarchy_arrays(x, np.random.default_rng(5).permutation(labels))
    EntityTokenizer(config=config).fit(x, other_tree, progress=False, checkpoint=checkpoint, log=logs.append)
    assert any("starting afresh" in line for line in logs)
    # another config does not pick up the checkpoint
    logs.clear()
    EntityTokenizer(config=small_config(epochs=2, seed=1)).fit(x, arrays, progress=False, checkpoint=checkpoint,
                                                               log=logs.append)
    assert any("starting afresh" in line for line in logs)


def full_prefix_codes(x, arrays, epochs):
    """Codes of a run trained exactly ``epochs`` epochs without stopping (its best is its last or earlier)."""
    run = EntityTokenizer(config=small_config(variant="rq", epochs=epochs, eval_every=1, patience=0)).fit(
        x, arrays, progress=False)
    return run.base_codes_


def test_variant_switches():
    x, labels = clustered()
    rq = EntityTokenizer(config=small_config(variant="rq")).fit(x, None, progress=False)
    assert "loss_gse" not in rq.record_.history[0] and "loss_gsr" not in rq.record_.history[0]
    no_l1 = small_config(gse=GSEConfig(l1=False))
    assert no_l1.uses_gse and not no_l1.gse.l1
    flat = EntityTokenizer(config=small_config(variant="flat", levels=5)).fit(x, None, progress=False)
    assert flat.codebooks_.shape == (1, 8, 8) and flat.base_codes_.shape == (len(x), 5)
    with pytest.raises(ValueError, match="needs a hierarchy"):
        EntityTokenizer(config=small_config()).fit(x, None, progress=False)


def test_codes_are_unique_and_decode_exactly():
    x, labels = clustered(n=300)
    tokenizer = EntityTokenizer(config=small_config(variant="rq", levels=2, codebook_size=4, epochs=2)).fit(
        x, None, progress=False)
    assert tokenizer.collision_rate_before_ > 0.5  # 16 tuples for 300 entities
    assert tokenizer.width_ == 3
    assert len(np.unique(tokenizer.codes_, axis=0)) == len(x)
    ids = np.arange(len(x))
    np.testing.assert_array_equal(tokenizer.decode(tokenizer.encode(ids)), ids)
    assert tokenizer.decode(np.array([[3, 3, 999]]))[0] == -1
    with pytest.raises(ValueError, match="columns"):
        tokenizer.decode(np.zeros((1, 2), dtype=int))


def test_disambiguate_matches_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(200, 2))
    fixed, rate = disambiguate(codes)
    seen: dict = {}
    expected_rank = []
    for row in map(tuple, codes):
        expected_rank.append(seen.get(row, 0))
        seen[row] = seen.get(row, 0) + 1
    assert fixed[:, -1].tolist() == expected_rank  # rank in entity-id order within each tuple
    counts = {k: v for k, v in seen.items()}
    assert rate == pytest.approx(np.mean([counts[tuple(r)] > 1 for r in codes]))
    unique = np.arange(10).reshape(5, 2)
    same, zero = disambiguate(unique)
    assert same is unique and zero == 0.0


def test_save_load_encode_new_and_tokens(tmp_path):
    x, labels = clustered(n=300)
    tokenizer = EntityTokenizer(config=small_config(variant="rq", levels=2, codebook_size=4, epochs=2)).fit(
        x, None, progress=False)
    tokenizer.save(tmp_path / "tok")
    loaded = EntityTokenizer.load(tmp_path / "tok")
    np.testing.assert_array_equal(loaded.codes_, tokenizer.codes_)
    np.testing.assert_array_equal(loaded.decode(tokenizer.codes_[:20]), np.arange(20))
    # Inductive: existing vectors get their tuple again, with the next free disambiguation rank.
    new = loaded.encode_new(x[:3])
    np.testing.assert_array_equal(new[:, :2], tokenizer.base_codes_[:3])
    group_sizes = [(tokenizer.base_codes_ == tokenizer.base_codes_[i]).all(1).sum() for i in range(3)]
    same_tuple_before = [sum((tokenizer.base_codes_[j] == tokenizer.base_codes_[i]).all() for j in range(i)) for i in range(3)]
    assert new[:, 2].tolist() == [g + s for g, s in zip(group_sizes, same_tuple_before)]
    assert all(loaded.decode(new) == -1)  # new tuples are not registered
    with pytest.raises(ValueError, match="dims"):
        loaded.encode_new(x[:3, :5])
    strings = loaded.token_strings(loaded.codes_[:2])
    assert strings[0].startswith(f"<a_{loaded.codes_[0, 0]}><b_{loaded.codes_[0, 1]}><c_")
    vocabulary = loaded.vocabulary()
    assert len(vocabulary) == 2 * 4 + int(loaded.codes_[:, 2].max()) + 1 and len(set(vocabulary)) == len(vocabulary)
    assert [level_namespace(i) for i in (0, 1, 25, 26, 27)] == ["a", "b", "z", "aa", "ab"]
    with pytest.raises(NotFittedError):
        EntityTokenizer().encode([0])


def test_realm_residual_kmeans_gets_closer_with_more_stages():
    x, _ = clustered(n=400, dim=24)
    errors = []
    for stages in (2, 8):
        config = QuantizeConfig(variant="realm", levels=stages, codebook_size=16, realm_assignment="nearest")
        tokenizer = EntityTokenizer(config=config).fit(x, None, progress=False)
        rebuilt = tokenizer.vectors_of(tokenizer.codes_)
        errors.append(float(((rebuilt - x) ** 2).sum(1).mean()))
        if stages == 2:  # 16^2 tuples for 400 entities: collisions, so a disambiguation level
            assert tokenizer.width_ == 3
            again = tokenizer.encode_new(x[:10])
        else:  # no collisions, no extra level: known vectors reuse known tuples, with a warning
            assert tokenizer.width_ == stages
            with pytest.warns(CollisionWarning, match="10 new entit"):
                again = tokenizer.encode_new(x[:10])
            twins = np.repeat(x[:1] + 10.0, 2, axis=0)  # two new entities with one vector: one tuple
            with pytest.warns(CollisionWarning, match="and 1 with another new one"):
                tokenizer.encode_new(twins)
        np.testing.assert_array_equal(again[:, :stages], tokenizer.base_codes_[:10])
    assert errors[1] < 0.5 * errors[0]


def test_encode_new_warns_when_a_rank_has_no_token_in_the_vocabulary():
    """encode_new gave the largest group's next member rank = its size, a token vocabulary() (and so an
    extended model) does not have: the model's tokenizer split it into pieces, without a word."""
    import warnings

    x, _ = clustered(n=400, dim=24)
    config = QuantizeConfig(variant="realm", levels=2, codebook_size=16, realm_assignment="nearest", threads=1)
    tokenizer = EntityTokenizer(config=config).fit(x, None, progress=False)
    assert tokenizer.width_ == 3
    keys = tokenizer.base_codes_[:, 0] * 16 + tokenizer.base_codes_[:, 1]
    _, group, size = np.unique(keys, return_inverse=True, return_counts=True)
    largest, smallest = int(np.argmax(size[group])), int(np.argmin(size[group]))
    top = int(tokenizer.codes_[:, -1].max())
    assert size.max() == top + 1  # ranks 0..top: the largest group's next rank has no token
    with pytest.warns(VocabularyWarning, match=f"1 new entit\\(ies\\) need a disambiguation rank above {top}"):
        new = tokenizer.encode_new(x[[largest]])
    assert new[0, -1] == top + 1 and f"<c_{top + 1}>" not in tokenizer.vocabulary()
    if size.min() <= top:  # a smaller group's next rank is in the vocabulary: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", VocabularyWarning)
            assert tokenizer.encode_new(x[[smallest]])[0, -1] == size.min()


def test_fit_names_a_hierarchy_given_as_a_path():
    x, _ = clustered(n=50, dim=8)
    with pytest.raises(TypeError, match="hierarchy: expected the stage-3 arrays .*load_hierarchy"):
        EntityTokenizer(config=QuantizeConfig(levels=2, codebook_size=4, threads=1)).fit(x, "runs/x/hierarchy")


def test_distinct_codes_differ_within_each_group_and_move_only_clashing_rows():
    from kgtok.quantize.kmeans import nearest
    from kgtok.quantize.quantizer import distinct_codes

    rng = np.random.default_rng(0)
    residual = torch.as_tensor(rng.normal(size=(300, 4)), dtype=torch.float32)
    centroids = torch.as_tensor(rng.normal(size=(6, 4)), dtype=torch.float32)
    groups = torch.as_tensor(np.r_[rng.integers(0, 60, 290), np.full(10, 99)])  # group 99: 10 rows > K = 6
    code = distinct_codes(residual, centroids, groups)
    closest = nearest(residual, centroids)
    distances = torch.cdist(residual, centroids).pow(2)
    for group in torch.unique(groups).tolist():
        rows = torch.nonzero(groups == group).squeeze(1)
        if len(rows) <= 6:
            assert len(torch.unique(code[rows])) == len(rows)  # distinct within the group
            pairs = {(int(c)) for c in closest[rows]}
            for row in rows.tolist():
                alone = int((closest[rows] == closest[row]).sum()) == 1
                if alone:
                    assert code[row] == closest[row]  # a row without a clash keeps its nearest code
            # Of rows that clashed on a code, the nearest keeps it.
            for c in pairs:
                holders = rows[closest[rows] == c]
                if len(holders) > 1:
                    best = holders[distances[holders, c].argmin()]
                    assert code[best] == c
        else:
            np.testing.assert_array_equal(code[rows], closest[rows])  # too big: left to disambiguation


def test_realm_distinct_assignment_removes_collisions_the_nearest_codes_leave():
    x, _ = clustered(n=400, dim=24)
    rates, errors = {}, {}
    for assignment in ("nearest", "distinct"):
        config = QuantizeConfig(variant="realm", levels=3, codebook_size=16, realm_assignment=assignment, threads=1)
        tokenizer = EntityTokenizer(config=config).fit(x, None, progress=False)
        rates[assignment] = tokenizer.collision_rate_before_
        errors[assignment] = float(((tokenizer.vectors_of(tokenizer.codes_) - x) ** 2).sum(1).mean())
        if assignment == "distinct":  # same codebooks and first level; new vectors get their nearest codes
            with pytest.warns(CollisionWarning):  # the training vectors again: their tuples are taken
                again = tokenizer.encode_new(x)
            np.testing.assert_array_equal(again[:, 0], tokenizer.base_codes_[:, 0])
    assert rates["nearest"] > 0.05 and rates["distinct"] == 0.0
    assert errors["distinct"] < 1.05 * errors["nearest"]  # codes moved to near neighbours only


def test_kmeans_initialisation_spreads_the_codes():
    x, _ = clustered(n=600, dim=16, clusters=12)
    used = []
    for init in (False, True):
        config = small_config(variant="rq", levels=1, codebook_size=16, epochs=1, kmeans_init=init,
                              dead_code_restart=False, lr=1e-6)
        tokenizer = EntityTokenizer(config=config).fit(x, None, progress=False)
        used.append(len(np.unique(tokenizer.base_codes_[:, 0])))
    assert used[1] >= 12 and used[1] > used[0]


def test_stage_artifact_on_synthetic_kg(tmp_path):
    from kgtok.artifacts import artifact_dir
    from kgtok.data import load_kg
    from kgtok.data.synthetic import SyntheticConfig, write_synthetic
    from kgtok.hierarchy import HierarchyConfig, run_hierarchy

    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=300, seed=4), tmp_path / "kg"))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(kg.num_entities, 4))[kg.entity_types[:, 1] % 4] + 0.3 * rng.normal(size=(kg.num_entities, 4))
    embed = tmp_path / "embed"
    with artifact_dir(embed, stage="embed", config={}) as writer:  # a stage-1 artifact made by hand
        np.save(writer.path / "entity_embeddings.npy",
                np.concatenate([vectors, rng.normal(size=(kg.num_entities, 12))], 1))
        (writer.path / "entities.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(kg.entity_names)))
    quiet = lambda *_: None  # noqa: E731
    hierarchy = run_hierarchy(HierarchyConfig(levels=3, threads=1), kg, tmp_path / "h", embeddings=embed, log=quiet)
    dest = run_quantize(small_config(codebook_size=16, code_dim=16), kg, tmp_path / "q", hierarchy=hierarchy,
                        progress=False, log=quiet)
    metrics = json.loads((dest / "metrics.json").read_text())
    codes = np.load(dest / "codes.npy")
    assert codes.shape[0] == kg.num_entities and len(np.unique(codes, axis=0)) == kg.num_entities
    assert metrics["collision_rate_after"] == 0.0
    assert not (tmp_path / "q.work").exists()  # the resumable training state goes once the artifact is written
    assert 1 <= metrics["best_epoch"] <= metrics["stopped_epoch"] and metrics["best_seconds"] > 0
    for key in ("entropy", "utilization", "perplexity"):
        assert len(metrics[key]) == 3
    assert 0 < metrics["reconstruction_cosine"] <= 1
    assert "nmi_hierarchy_level_1" in metrics and "nmi_types_level_1" in metrics
    # L1's drawn-centre default is in the cache record: an artifact from before it is not reused for it
    assert "quantize/l1_negatives" in (dest / "manifest.json").read_text()
    lines = (dest / "tokens.txt").read_text().splitlines()
    assert len(lines) == kg.num_entities and lines[0].split("\t")[2].startswith("<a_")
    loaded = EntityTokenizer.load(dest / "tokenizer")
    np.testing.assert_array_equal(loaded.codes_, codes)
    with pytest.raises(ValueError, match="quantize needs --embeddings .*variant realm"):
        run_quantize(QuantizeConfig(variant="realm"), kg, tmp_path / "r", hierarchy=hierarchy, log=quiet)


@pytest.mark.parametrize("variant", ["rq", "flat"])
def test_state_saved_with_one_stacked_codebook_still_loads(variant):
    """model.pt files written before the per-level Codebooks hold one (books, K, dim) tensor per quantizer."""
    x, _ = clustered()
    xt = torch.as_tensor(x)
    config = small_config(variant=variant)
    model = RQVAE(x.shape[1], config, levels=3, codebook_size=8)
    with torch.no_grad():
        model.quantizer.kmeans_init(model.encoder(xt), seed=0)
    model.quantizer.mark_used(model.encode(xt), step=7)
    books = model.quantizer.distinct_codebooks()
    assert len(books) == (1 if variant == "flat" else 3)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.codebooks.")}
    old["quantizer.codebooks"] = torch.stack([book.weight.detach() for book in books])  # (books, K, dim)
    old["quantizer.last_used"] = torch.stack([book.last_used for book in books])  # (books, K)
    old["quantizer.initialised"] = torch.tensor(True)
    torch.manual_seed(1)
    loaded = RQVAE(x.shape[1], config, levels=3, codebook_size=8)
    loaded.load_state_dict(old)  # strict: every key placed
    np.testing.assert_array_equal(loaded.encode(xt).numpy(), model.encode(xt).numpy())
    assert torch.equal(loaded.quantizer.stacked_codebooks(), model.quantizer.stacked_codebooks())
    pairs = zip(loaded.quantizer.codebooks, model.quantizer.codebooks)
    assert all(torch.equal(a.last_used, b.last_used) for a, b in pairs)
    if variant == "flat":  # one Codebook instance serves every level
        assert all(book is loaded.quantizer.codebooks[0] for book in loaded.quantizer.codebooks)


def test_tokenizer_checks_its_arguments_at_construction():
    with pytest.raises(ValueError, match="variant='bogus'"):
        EntityTokenizer(variant="bogus")
    with pytest.raises(ValueError, match="levels=0"):
        EntityTokenizer(levels=0)
    with pytest.raises(ValueError, match="codebook_size=1.5"):
        EntityTokenizer(codebook_size=1.5)
    with pytest.raises(ValueError, match="QuantizeConfig"):
        EntityTokenizer(config={"levels": 3})
    with pytest.raises(ValueError, match="variant='bogus'"):
        QuantizeConfig(variant="bogus")
    tokenizer = EntityTokenizer(levels=4, codebook_size=1024, variant="flat")
    assert (tokenizer.levels, tokenizer.codebook_size, tokenizer.variant) == (4, 1024, "flat")


def small_tokenizer(n: int = 300) -> tuple[EntityTokenizer, np.ndarray]:
    x, _ = clustered(n=n)
    config = small_config(variant="rq", levels=2, codebook_size=4, epochs=2)
    return EntityTokenizer(config=config).fit(x, None, progress=False), x


def test_encode_takes_only_known_integer_ids():
    tokenizer, x = small_tokenizer()
    for bad in ([-1], [1.7], [len(x)], [True], ["3"]):
        with pytest.raises(ValueError, match="entity ids"):
            tokenizer.encode(bad)
    np.testing.assert_array_equal(tokenizer.encode(np.array([0, 5], dtype=np.int32)), tokenizer.codes_[[0, 5]])
    assert tokenizer.encode([]).shape == (0, tokenizer.width_)


def test_encode_new_refuses_non_finite_and_misshapen_vectors():
    tokenizer, x = small_tokenizer()
    for value in (np.nan, np.inf):
        bad = x[:3].copy()
        bad[1, 2] = value
        with pytest.raises(ValueError, match="finite"):
            tokenizer.encode_new(bad)
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        tokenizer.encode_new(x[0])
    with pytest.raises(ValueError, match="dims"):
        tokenizer.encode_new(x[:3, :5])
    assert tokenizer.encode_new(x[:3]).shape == (3, tokenizer.width_)


def test_failed_fit_leaves_the_tokenizer_as_it_was():
    tokenizer, x = small_tokenizer()
    before = dict(vars(tokenizer))
    nan = x.copy()
    nan[4, 0] = np.nan
    for bad, message in ((np.empty((0, 16), dtype=np.float32), "at least 2"), (x[:, 0], r"\(n, dim\)"),
                         (nan, "finite")):
        with pytest.raises(ValueError, match=message):
            tokenizer.fit(bad, None, progress=False)
        assert vars(tokenizer).keys() == before.keys()
        assert all(vars(tokenizer)[k] is v for k, v in before.items())
    fresh = EntityTokenizer(config=small_config())
    with pytest.raises(ValueError, match="needs a hierarchy"):
        fresh.fit(x, None, progress=False)
    with pytest.raises(ValueError, match="300 entities"):
        fresh.fit(x, hierarchy_arrays(x[:200], np.arange(200) % 4), progress=False)
    assert not any(name.endswith("_") for name in vars(fresh))
    with pytest.raises(NotFittedError):
        fresh.encode([0])


def test_load_names_the_file_on_a_parse_error(tmp_path):
    tokenizer, _ = small_tokenizer()
    saved = tokenizer.save(tmp_path / "tok")
    meta = saved / "tokenizer.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ValueError, match="tokenizer.json"):
        EntityTokenizer.load(saved)
    meta.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "levels"}))
    with pytest.raises(ValueError, match="tokenizer.json.*levels"):
        EntityTokenizer.load(saved)
    meta.write_text(text)
    (saved / "codes.npy").write_bytes((saved / "codes.npy").read_bytes()[:40])
    with pytest.raises(ValueError, match="codes.npy"):
        EntityTokenizer.load(saved)


def test_sampled_l1_contrasts_the_own_centre_with_the_drawn_ones():
    """L1 over drawn centres is the full L1 when every centre is drawn (own masked, then counted once as the
    positive); fewer draws give another value; L2 is the same either way; draws depend on (seed, step) only."""
    from kgtok.quantize.model import l1_samples

    x, labels = clustered()
    model = RQVAE(x.shape[1], small_config(), levels=3, codebook_size=8)
    tree = Hierarchy.from_arrays(hierarchy_arrays(x, labels), levels=3)
    out = model.quantizer(model.encoder(torch.as_tensor(x[:64])))
    centre_codes = [model.encoder(c) for c in tree.centroids]
    args = (out.prefixes, centre_codes, tree.clusters[:64], tree.neighbours)
    kw = dict(lambda1=0.8, lambda2=0.4, temperature=0.1)
    _, full_l1, full_l2 = gse_losses(*args, **kw)
    _, all_l1, all_l2 = gse_losses(*args, **kw, samples=[torch.arange(len(c)) for c in centre_codes])
    torch.testing.assert_close(torch.stack(all_l1), torch.stack(full_l1))
    torch.testing.assert_close(torch.stack(all_l2), torch.stack(full_l2))
    deepest = len(centre_codes[-1])
    assert deepest > 2
    some = l1_samples(centre_codes, 2, seed=0, step=5)
    assert [s is None for s in some] == [len(c) <= 2 for c in centre_codes] and len(some[-1]) == 2
    assert torch.equal(some[-1], l1_samples(centre_codes, 2, seed=0, step=5)[-1])  # resumed runs draw alike
    _, few_l1, _ = gse_losses(*args, **kw, samples=some)
    assert not torch.isclose(few_l1[-1], full_l1[-1])
    assert l1_samples(centre_codes, deepest, seed=0, step=5) == [None] * len(centre_codes)


def test_training_with_sampled_l1_centres():
    """Stage 4 trains with a handful of sampled L1 centres a level: every loss finite, codes distinct."""
    x, labels = clustered()
    config = small_config(gse=GSEConfig(l1_negatives=2))
    tokenizer = EntityTokenizer(config=config).fit(x, hierarchy_arrays(x, labels), progress=False)
    history = tokenizer.record_.history
    assert all(np.isfinite(h["loss_gse"]) for h in history) and history[-1]["loss_gse"] < history[0]["loss_gse"]
    assert len({tuple(c) for c in tokenizer.codes_.tolist()}) == len(x)


def test_packed_tuple_groups_equal_the_row_unique_and_token_strings_format_each_level():
    """Groups of equal code tuples from one packed int64 key equal np.unique over rows (ids and sizes);
    token strings are each level's namespaced token in order."""
    from kgtok.quantize.metrics import collision_rate, tuple_groups

    codes = np.random.default_rng(0).integers(0, 3, size=(500, 4))
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    groups, sizes = tuple_groups(codes)
    assert np.array_equal(groups, inverse.reshape(-1)) and np.array_equal(sizes, counts)
    assert collision_rate(codes) == float((counts[inverse.reshape(-1)] > 1).mean()) > 0
    wide = np.array([[2**40, 3], [2**40, 3], [5, 2**30]])  # too wide to pack: rows compared as tuples
    assert tuple_groups(wide)[0].tolist() == [1, 1, 0]
    x, _ = clustered()
    tokenizer = EntityTokenizer(config=small_config(variant="rq")).fit(x, progress=False)
    first = tokenizer.codes_[0]
    assert tokenizer.token_strings(tokenizer.codes_[:1]) == [
        "".join(f"<{name}_{c}>" for name, c in zip("abcdefgh", first))]


def test_the_l1_draw_default_is_a_cache_rule_only_where_it_applies():
    from kgtok.quantize.stage import default_rules

    assert default_rules(QuantizeConfig()) == {"quantize/l1_negatives": "8192 drawn"}
    assert default_rules(QuantizeConfig(gse=GSEConfig(l1_negatives=1024))) == {}
    assert default_rules(QuantizeConfig(variant="rq")) == {} == default_rules(QuantizeConfig(gse=GSEConfig(l1=False)))



def test_vq_loss_is_a_mean_over_the_dimensions_or_methods_squared_norms():
    """L_Q per level: d(sg(r), v) + β d(r, sg(v)) with d the squared distance's mean over the code dimensions
    (kgtok's default) or, with vq_loss=sum, its sum (METHOD.md's norm), averaged over levels and the batch."""
    from kgtok.quantize.quantizer import ResidualQuantizer

    for vq_sum, scale in ((False, 1 / 5), (True, 1.0)):
        torch.manual_seed(0)
        out = ResidualQuantizer(levels=3, codebook_size=4, dim=5, beta=0.25, vq_sum=vq_sum)(torch.randn(7, 5))
        squared = (out.codewords - out.residuals).pow(2).sum(2).mean(0)  # (levels,) over the batch
        torch.testing.assert_close(out.vq_loss, scale * (1.25 * squared).mean())
    assert RQVAE(16, QuantizeConfig(vq_loss="sum", code_dim=8), levels=2, codebook_size=4).quantizer.vq_scale == 8


def test_gse_total_weighs_each_level_as_the_method_says():
    """λ1^(l+1)/m on L1 (shallow levels weigh more), λ2^(m-l)/m on L2 (deep levels more): a swap or an
    off-by-one of the exponents passed every other test (every caller reads the total only)."""
    torch.manual_seed(0)
    m = 3
    prefixes = [torch.randn(5, 4) for _ in range(m)]
    centres = [torch.randn(k, 4) for k in (3, 5, 7)]
    clusters = torch.stack([torch.randint(0, k, (5,)) for k in (3, 5, 7)], 1)
    neighbours = [torch.tensor([[j for j in range(k) if j != i][:2] for i in range(k)]) for k in (3, 5, 7)]
    total, l1, l2 = gse_losses(prefixes, centres, clusters, neighbours, lambda1=0.8, lambda2=0.4, temperature=0.1)
    torch.testing.assert_close(total, sum(0.8 ** (l + 1) / m * l1[l] + 0.4 ** (m - l) / m * l2[l] for l in range(m)))


def test_gse_l2_ignores_the_padding_of_a_short_neighbour_list():
    """-1 pads a cluster's neighbour list; read as cluster 0 it would push the entity from its own centre."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    p, c = torch.randn(1, 4), torch.randn(3, 4)
    _, _, l2 = gse_losses([p], [c], torch.tensor([[0]]), [torch.tensor([[1, -1], [0, -1], [0, 1]])],
                          lambda1=1.0, lambda2=1.0, temperature=0.1, use_l1=False)
    logits = F.normalize(c[[0, 1]], dim=1) @ F.normalize(p, dim=1)[0] / 0.1  # own centre against neighbour 1
    torch.testing.assert_close(l2[0], F.cross_entropy(logits[None], torch.tensor([0])))


def test_gsr_loss_is_the_methods_sum_of_squared_errors():
    """||o_0 - s||² + λs||o_1 - h_0||² + λh Σ_{i>=2} ||o_i - h_{i-1}||², batch means: a swapped λ, a shifted
    output or the wrong target passed every other test (they only see the loss fall)."""
    from kgtok.quantize.model import gsr_loss

    torch.manual_seed(0)
    o, s, a = torch.randn(2, 4, 3), torch.randn(2, 3), torch.randn(2, 3, 3)

    def sq(x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum(1).mean()

    want = sq(o[:, 0] - s) + 0.5 * sq(o[:, 1] - a[:, 0]) + 0.25 * (sq(o[:, 2] - a[:, 1]) + sq(o[:, 3] - a[:, 2]))
    torch.testing.assert_close(gsr_loss(o, s, a, 0.5, 0.25), want)


def test_gsr_decoder_is_causal_over_its_queries():
    """o_i reads q_0..q_i and every code vector, never a later query: without the causal mask o_0 changed with q_1
    (the queries come after all codes, so only the queries can tell a causal decoder from a full one)."""
    from kgtok.quantize.model import GSRDecoder

    torch.manual_seed(0)
    decoder = GSRDecoder(levels=3, dim=8, out_dim=5, layers=2, heads=2).eval()
    codes = torch.randn(4, 3, 8)
    with torch.no_grad():
        before = decoder(codes)
        decoder.queries[2:] += torch.randn(2, 8)  # q_2, q_3
        after = decoder(codes)
    torch.testing.assert_close(after[:, :2], before[:, :2])  # o_0, o_1 do not see q_2, q_3
    assert (after[:, 2:] - before[:, 2:]).abs().min() > 1e-4
    with torch.no_grad():  # and every output reads the last code vector
        changed = decoder(torch.cat([codes[:, :2], torch.randn(4, 1, 8)], 1))
    assert (changed - after).abs().amax(-1).min() > 1e-4


def test_the_decoder_input_passes_the_encoder_the_reconstruction_gradient():
    """Value Σ v_l, gradient m x I to z (each r_l carries z's; docs/stage4-codes.md): without the straight-through
    surrogate the encoder got no reconstruction gradient at all. L_Q: its codebook term moves v, its commitment
    term (β) moves z."""
    from kgtok.quantize.quantizer import ResidualQuantizer

    torch.manual_seed(0)
    quantizer = ResidualQuantizer(levels=3, codebook_size=4, dim=5)
    z = torch.randn(7, 5, requires_grad=True)
    upstream = torch.randn(7, 5)
    (quantizer(z).quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, 3 * upstream)
    single = ResidualQuantizer(levels=1, codebook_size=4, dim=5, beta=0.25)
    z = torch.randn(7, 5, requires_grad=True)
    out = single(z)
    out.vq_loss.backward()
    r, v = out.residuals[:, 0], out.codewords[:, 0]
    torch.testing.assert_close(z.grad, 0.25 * 2 / (7 * 5) * (r - v))  # commitment only reaches z
    book = single.codebooks[0].weight.grad  # codebook term only reaches the codewords
    torch.testing.assert_close(book.sum(0), (2 / (7 * 5) * (v - r)).sum(0))


def test_quantizer_logs_plain_lines_where_no_bar_is_drawn(monkeypatch):
    """Without a terminal (progress off) a long quantizer run was silent for minutes: a heartbeat line now."""
    from kgtok.quantize import train
    from kgtok.runtime import Heartbeat

    monkeypatch.setattr(train, "Heartbeat", lambda log: Heartbeat(log, every=0.0))
    x, _ = clustered(n=64)
    said: list[str] = []
    EntityTokenizer(config=small_config(variant="rq", epochs=3)).fit(x, progress=False, log=said.append)
    assert [line.split(",")[0] for line in said if line.startswith("quantize: epoch")] == [
        "quantize: epoch 1 of 3", "quantize: epoch 2 of 3", "quantize: epoch 3 of 3"]
    quiet = Heartbeat(said.append, every=3600.0)
    quiet(lambda: "never built")
    assert "never built" not in said
