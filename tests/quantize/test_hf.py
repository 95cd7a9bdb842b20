"""The EntityTokenizer outside kgtok's pipeline: save_pretrained layout, extending any HF model, the docs' example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kgtok.llm.backbone import TinyBackboneConfig, build_tiny
from kgtok.quantize import EntityTokenizer, QuantizeConfig
from kgtok.quantize.hf import BOUNDARY_TOKENS, extend_vocabulary
from kgtok.quantize.tokenizer import FORMAT_VERSION, FormatVersionError, NotFittedError, level_namespace

ROOT = Path(__file__).resolve().parents[2]
TINY = TinyBackboneConfig(vocab_size=400, hidden_size=32, layers=1, heads=2, intermediate_size=64)
NAMES = [f"{colour} {animal}" for colour in ("red", "green", "blue", "grey", "gold", "pink")
         for animal in ("fox", "owl", "cat", "eel", "yak", "ant", "bee", "elk", "hen", "ram")]


def vectors(n: int = len(NAMES), dim: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def realm(levels: int = 2, codebook_size: int = 8) -> EntityTokenizer:
    config = QuantizeConfig(variant="realm", levels=levels, codebook_size=codebook_size, threads=1)
    return EntityTokenizer(config=config).fit(vectors(), progress=False)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return build_tiny(NAMES * 3, tmp_path_factory.mktemp("hf") / "tiny", TINY)


def load_backbone(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


# --- save_pretrained / from_pretrained ------------------------------------------------


@pytest.mark.parametrize("variant", ["realm", "rq"])
def test_save_pretrained_layout_round_trips(tmp_path, variant):
    config = QuantizeConfig(variant=variant, levels=2, codebook_size=8, code_dim=8, encoder_hidden=(16,), epochs=2,
                            eval_every=1, threads=1)
    tok = EntityTokenizer(config=config).fit(vectors(), progress=False, log=lambda *_: None)
    saved = tok.save_pretrained(tmp_path / "tok")
    meta = json.loads((saved / "tokenizer.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert (meta["num_entities"], meta["width"]) == tok.codes_.shape
    assert meta["encoder"] == (variant == "rq") == (saved / "model.pt").exists()
    assert (saved / "vocab.txt").read_text().splitlines() == tok.vocabulary()
    assert (saved / "entity_tokens.txt").read_text().splitlines() == tok.token_strings(tok.codes_)
    loaded = EntityTokenizer.from_pretrained(saved)
    np.testing.assert_array_equal(loaded.codes_, tok.codes_)
    np.testing.assert_array_equal(loaded.encode_new(vectors()[:5]), tok.encode_new(vectors()[:5]))
    assert EntityTokenizer.save is EntityTokenizer.save_pretrained
    np.testing.assert_array_equal(EntityTokenizer.load(saved).codes_, tok.codes_)
    tok.save_pretrained(tmp_path / "codes" / "tokenizer")  # as a stage-4 artifact holds it: its folder will do
    np.testing.assert_array_equal(EntityTokenizer.from_pretrained(tmp_path / "codes").codes_, tok.codes_)


def test_from_pretrained_refuses_an_unknown_format_version(tmp_path):
    saved = realm().save_pretrained(tmp_path / "tok")
    meta = json.loads((saved / "tokenizer.json").read_text())
    (saved / "tokenizer.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(FormatVersionError, match=r"tokenizer\.json: format_version 99 .* reads 1"):
        EntityTokenizer.from_pretrained(saved)


def test_from_pretrained_reads_the_layout_written_before_format_versions(tmp_path):
    tok = realm()
    saved = tok.save_pretrained(tmp_path / "tok")
    meta = json.loads((saved / "tokenizer.json").read_text())
    old = {k: meta[k] for k in ("config", "levels", "codebook_size", "in_dim", "collision_rate_before", "record")}
    (saved / "tokenizer.json").write_text(json.dumps(old))
    (saved / "vocab.txt").unlink()
    (saved / "entity_tokens.txt").unlink()
    np.testing.assert_array_equal(EntityTokenizer.from_pretrained(saved).codes_, tok.codes_)


def test_from_pretrained_names_files_from_different_saves(tmp_path):
    saved = realm().save_pretrained(tmp_path / "tok")
    np.save(saved / "codes.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"codes\.npy: shape \(3, 2\)"):
        EntityTokenizer.from_pretrained(saved)


# --- extend -------------------------------------------------------------------------


def test_extend_adds_one_id_per_code_token_and_spells_every_entity(backbone):
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    before = len(hf_tok)
    ids = tok.extend(model, hf_tok)
    assert ids.shape == tok.codes_.shape and ids.dtype == np.int64
    assert len(hf_tok) == before + len(tok.vocabulary()) + len(BOUNDARY_TOKENS)
    assert model.get_input_embeddings().weight.shape[0] == len(hf_tok)
    for entity in (0, 7, len(NAMES) - 1):
        text = f"{BOUNDARY_TOKENS[0]}{tok.token_strings(tok.encode([entity]))[0]}{BOUNDARY_TOKENS[1]}"
        encoded = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert encoded == [hf_tok.convert_tokens_to_ids(BOUNDARY_TOKENS[0]), *ids[entity],
                           hf_tok.convert_tokens_to_ids(BOUNDARY_TOKENS[1])]
    with torch.no_grad():  # the extended model runs on code tokens
        logits = model(torch.as_tensor(ids[:4])).logits
    assert logits.shape == (4, tok.width_, len(hf_tok))


def test_extend_keeps_a_padded_embedding_matrix(backbone):
    """A model whose matrix has more rows than its tokenizer (as many LMs pad) was shrunk to the tokenizer."""
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    model.resize_token_embeddings(len(hf_tok) + 64)
    padded = model.get_input_embeddings().weight.shape[0]
    ids = tok.extend(model, hf_tok)
    assert len(hf_tok) < padded == model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    assert ids.max() < len(hf_tok)


def test_codebook_and_mean_rows_are_stage_5s(backbone):
    """The init maths moved here give stage 5's rows exactly (same draws, same order)."""
    from kgtok.llm.vocab import extend_vocabulary as stage5_extend

    tok = realm()
    tokens = tok.vocabulary() + list(BOUNDARY_TOKENS)
    for init in ("codebook", "mean"):
        ours, ours_tok = load_backbone(backbone)
        theirs, theirs_tok = load_backbone(backbone)
        ids = tok.extend(ours, ours_tok, init=init, seed=3)
        stage5_extend(theirs, theirs_tok, tokens, init=init, codebooks=tok.codebooks_.numpy(), seed=3)
        assert ours_tok.get_vocab() == theirs_tok.get_vocab()
        torch.testing.assert_close(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight)
        assert ids.max() < len(ours_tok)


def test_codebook_rows_follow_the_codewords(backbone):
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    tok.extend(model, hf_tok, init="codebook")
    weight = model.get_input_embeddings().weight.detach()
    rows = weight[hf_tok.convert_tokens_to_ids(tok.vocabulary()[: tok.codebook_size_])]  # level 0's tokens
    words = tok.codebooks_[0]  # (K, dim)
    # A fixed linear map: pairwise inner products keep their order (a random projection roughly preserves them).
    gram_rows, gram_words = (rows @ rows.T).flatten(), (words @ words.T).flatten()
    assert torch.corrcoef(torch.stack([gram_rows, gram_words]))[0, 1] > 0.8


def test_names_init_is_the_mean_name_embedding_of_a_codes_entities(backbone):
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    old = model.get_input_embeddings().weight.detach().clone()
    name_rows = torch.stack([old[hf_tok(n, add_special_tokens=False)["input_ids"]].mean(0) for n in NAMES])
    tok.extend(model, hf_tok, init="names", names=NAMES)
    weight = model.get_input_embeddings().weight.detach()
    for level in range(tok.width_):
        for code in np.unique(tok.codes_[:, level])[:3]:
            members = np.flatnonzero(tok.codes_[:, level] == code)
            row = weight[hf_tok.convert_tokens_to_ids(f"<{level_namespace(level)}_{code}>")]
            torch.testing.assert_close(row, name_rows[members].mean(0))
    unused = sorted(set(range(tok.codebook_size_)) - set(tok.codes_[:, 0].tolist()))
    if unused:  # a code no entity uses starts near the mean row
        row = weight[hf_tok.convert_tokens_to_ids(f"<a_{unused[0]}>")]
        assert (row - old.mean(0)).norm() < 0.1 * old.std(0).norm() + 1e-6


def test_extend_checks_its_arguments(backbone):
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    with pytest.raises(ValueError, match="init='names' needs"):
        tok.extend(model, hf_tok, init="names")
    with pytest.raises(ValueError, match="names has 3 entries"):
        tok.extend(model, hf_tok, init="names", names=["a", "b", "c"])
    with pytest.raises(ValueError, match="embedding init 'zeros'"):
        extend_vocabulary(model, hf_tok, ["<x_1>"], init="zeros")
    with pytest.raises(NotFittedError, match="not fitted"):
        EntityTokenizer(levels=2, codebook_size=4, variant="realm").extend(model, hf_tok)


def test_extending_twice_keeps_the_first_rows(backbone):
    tok = realm()
    model, hf_tok = load_backbone(backbone)
    first = tok.extend(model, hf_tok, init="codebook")
    weight = model.get_input_embeddings().weight.detach().clone()
    again = tok.extend(model, hf_tok, init="mean")
    np.testing.assert_array_equal(first, again)
    torch.testing.assert_close(model.get_input_embeddings().weight, weight)


# --- the example of docs/stage4-codes.md ("The tokenizer for any model") ------------


def docs_example() -> str:
    page = (ROOT / "docs" / "stage4-codes.md").read_text(encoding="utf-8")
    block = page.split("<!-- example:any-model -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_docs_tokenizer_example_runs(backbone, tmp_path, monkeypatch):
    code = docs_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    code, replaced = re.subn(r'^BACKBONE = .*$', f"BACKBONE = {str(backbone)!r}", code, flags=re.M)
    assert replaced == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/stage4-codes.md example", "exec"), namespace)
    tok, ids, hf_tok, prompt = namespace["tok"], namespace["ids"], namespace["hf_tok"], namespace["prompt"]
    assert ids.shape == tok.codes_.shape
    encoded = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert any(encoded[i: i + tok.width_] == ids[7].tolist() for i in range(len(encoded)))
