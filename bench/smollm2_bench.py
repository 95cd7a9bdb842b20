"""Issue 15's benchmark: on three graphs, the retriever and the LM with no IDs, random IDs, ReaLM's codes,
GS-Quant's codes and GS-Quant's codes with each switch of items 1-3; then the summary.

    python bench/smollm2_bench.py                          # a GPU machine: the three graphs at once, 500 queries
    python bench/smollm2_bench.py --graphs umls --max-queries 100 --parallel 1    # a part of it
    python bench/smollm2_bench.py --dry-run                # anywhere: a 300-entity synthetic KG, tiny LM (a minute)

Per graph, one ``bench/llm_compare.py`` run (its stages 0-4 once, then every variant's instructions,
fine-tuning and evaluation; each stage resumes), then ``bench/llm_summary.py`` over the graphs: each row's
best ranker chosen on LM-valid, codes against no IDs and random IDs, the LM against its retriever, GS-Quant
against ReaLM, with paired 95% CIs and p-values, in ``bench/results/llm_<backbone>_summary.json``.  The
graphs: UMLS; the WN18RR 6k-entity subset and the FB15k-237 3k-entity subset (``kgtok data subset``, seed 0,
made here when missing).  The GS-Quant run reported as "codes" is the one of ``codes`` and ``codes_<switch>``
best on LM-valid.  Every row with IDs also runs the generative ranker (``--generative-beams``: beam search
over every entity's answer, a retriever of its own), reported beside the others.  Logs:
``<runs>/llm_<graph>_<tag>.log``.

On a lent GPU machine (docs/stage5-llm.md, "Issue 15's benchmark on a GPU"): stages 0-4 run here first
(``--upstream-only``), their run folders and the model travel, and the command runs there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets"

# Each switch of issue 15 items 1-3 alone, and all three: a variant each (llm_compare's --variant syntax).
SWITCHES = {
    "codes_names": ["finetune.embedding_init=names"],
    "codes_align": ["instruct.align_tasks=[codes_to_name,name_to_codes]"],
    "codes_lr": ["finetune.new_token_lr_multiplier=10"],
}
SWITCHES["codes_all"] = [item for items in SWITCHES.values() for item in items]
VARIANTS = ("no_codes", "random_ids", "realm_codes", "codes", *SWITCHES)
# Not run by default: codes written before names (instruct.ids_first), and random IDs written the same way as its
# control (the summary compares the two when codes_first is the GS-Quant run chosen on LM-valid).
OPTIONAL = {"codes_first": ["instruct.ids_first=true"], "random_ids_first": ["instruct.ids_first=true"]}
OWN = {**SWITCHES, **OPTIONAL}

# Stages 0-4 per graph, as the earlier runs of these graphs (bench/results/llm_umls*.json, llm_wn18rr_subset6k*),
# and a graph's own stage-5 settings. The WN18RR 6k subset has 204 validation triples: at the default share its
# LM-valid was 40 queries, 24 of them with the gold outside the list (session 29), too few to choose a fusion
# weight or a row on; half of them gives about 200 (UMLS 130, FB15k-237 3k 242 at the default).
GRAPHS = {
    "umls": {"source": "umls", "entities": 0,
             "run": ["run.quantize.codebook_size=16", "run.quantize.levels=3", "run.hierarchy.levels=3"]},
    "wn18rr_6k": {"source": "wn18rr", "entities": 6000, "run": ["run.embed.regularizer_weight=0.1"],
                  "stage5": ["instruct.lm_valid_fraction=0.5"]},
    "fb15k237_3k": {"source": "fb15k237", "entities": 3000, "run": []},
}
# Stage 5 on every graph: short prompts (3 facts, 15 description words), training queries as examples too, LM-train's
# lists calibrated (the gold first as often as in test's lists; chosen on LM-valid: docs/stage5-llm.md).
STAGE5 = ["instruct.template=dift", "instruct.neighbours=3", "instruct.description_words=15",
          "instruct.train_from_train_queries=true", "instruct.train_queries=3000", "instruct.list_order=calibrated",
          "finetune.r=16", "finetune.epochs=2", "finetune.batch_size=8", "finetune.logging_steps=10",
          "evaluate.batch_size=8", "evaluate.score=constrained"]
# Measured, not part of the recipe: LM-valid every 100 steps, so each variant's curve shows whether the code
# tokens' loss has stopped falling (issue 15 item 3).
CURVE = ["finetune.eval_steps=100"]
DRY_RUN = ["run.synthetic.num_entities=300", "run.embed.dim=16", "run.embed.max_steps=40", "run.embed.eval_every=20",
           "run.text.mode=joint", "run.quantize.epochs=2", "run.quantize.codebook_size=16", "instruct.top_k=5",
           "instruct.train_queries=200", "finetune.max_steps=2", "finetune.tiny.vocab_size=400",
           "finetune.tiny.hidden_size=32", "finetune.tiny.layers=1", "finetune.tiny.heads=2"]


def subset(source: Path, dest: Path, entities: int) -> None:
    """The graph's snowball subset (``kgtok data subset``, seed 0)."""
    done = subprocess.run([sys.executable, "-m", "kgtok", "data", "subset", str(source), str(dest), "--entities",
                           str(entities)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kgtok data subset {source} -> {dest} failed:\n{done.stderr[-2000:]}")


def compare_command(graph: str, data: Path | None, run_dir: Path, args: argparse.Namespace,
                    overrides: list[str]) -> list[str]:
    switches = [f"--variant={name}:{item}" for name, items in OWN.items() if name in args.variants for item in items]
    if args.generative_beams:  # every row with IDs: no IDs have no entity trie (names are not unique)
        switches += [f"--variant={name}:evaluate.generative_beams={args.generative_beams}"
                     for name in args.variants if name != "no_codes"]
    return [sys.executable, str(HERE / "llm_compare.py"), "--dataset", graph, *(["--data", str(data)] if data else []),
            "--run-dir", str(run_dir), "--backbone", args.backbone, "--tag", args.tag, "--threads", str(args.threads),
            "--variants", ",".join(args.variants), "--max-queries", str(args.max_queries), *switches,
            *(["--upstream-only"] if args.upstream_only else []),
            *(["--skip-upstream"] if args.skip_upstream else []), "--jobs", str(args.jobs),
            *(["--note", args.note] if args.note else []), *overrides]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--tag", default="smollm2_bench", help="names the results: llm_<graph>_<tag>.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join([*VARIANTS, *OPTIONAL])}")
    parser.add_argument("--max-queries", type=int, default=500, help="test queries per graph (0: all)")
    parser.add_argument("--data-root", type=Path, default=DATA, help="folder of umls/, wn18rr/, fb15k237/")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"), help="subsets, run folders and logs")
    parser.add_argument("--parallel", type=int, default=0, help="graphs at once (0: all on a GPU, else 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process on the CPU")
    parser.add_argument("--jobs", type=int, default=0,
                        help="variants of a graph at once, a process each (0: 4 on a GPU, else 1)")
    parser.add_argument("--generative-beams", type=int, default=10,
                        help="the generative ranker's beam (issue 15 item 4) on every row with IDs; 0: off")
    parser.add_argument("--dry-run", action="store_true", help="a synthetic KG and the tiny LM, every part run")
    parser.add_argument("--upstream-only", action="store_true",
                        help="stages 0-4 of every graph only (the CPU part, before carrying the runs to a GPU)")
    parser.add_argument("--skip-upstream", action="store_true",
                        help="stage 5 from the runs' stage-1 and stage-4 artifacts as they are (carried runs)")
    parser.add_argument("--note", default="")
    parser.add_argument("overrides", nargs="*", help="run./instruct./finetune./evaluate./realm.key=value for all")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS and v not in OPTIONAL]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (of {', '.join([*VARIANTS, *OPTIONAL])})")
    import torch

    gpu = torch.cuda.is_available()
    args.jobs = args.jobs or (4 if gpu else 1)
    commands: dict[str, list[str]] = {}  # graph -> its llm_compare command
    if args.dry_run:
        args.backbone, args.tag, args.max_queries = "tiny", args.tag if args.tag != "smollm2_bench" else "dry", 8
        commands["synthetic"] = compare_command("synthetic", None, args.runs / "run-synthetic-dry", args,
                                            [*DRY_RUN, *args.overrides])
    else:
        for graph in args.graphs:
            spec = GRAPHS[graph]
            source = args.data_root / spec["source"]
            data = args.runs / graph.replace("_", "-") if spec["entities"] else source
            if not (data / "train.txt").exists():  # a subset is made from its source once
                if not (source / "train.txt").exists():
                    raise SystemExit(f"{graph}: no {source}/train.txt (give --data-root)")
                subset(source, data, spec["entities"])
            commands[graph] = compare_command(graph, data, args.runs / f"run-{graph}", args,
                                          [*spec["run"], *STAGE5, *spec.get("stage5", []), *CURVE, *args.overrides])
    parallel = args.parallel or (len(commands) if gpu else 1)
    if args.backbone == "smollm2-135m" and not args.upstream_only:
        from kgtok.llm.backbone import convert_smollm2

        convert_smollm2()  # once, before the processes that read it
    args.runs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    failed = []
    pending = list(commands.items())
    while pending or running:
        while pending and len(running) < parallel:
            graph, cmd = pending.pop(0)
            log = args.runs / f"llm_{graph}_{args.tag}.log"
            print(f"{graph}: {' '.join(cmd[1:])}\n  log: {log}", flush=True)
            with log.open("w") as handle:
                running.append((graph, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}), log))
        graph, process, log = running.pop(0)
        if process.wait():
            failed.append(f"{graph} (exit {process.returncode}; {log}):\n" + log.read_text()[-2000:])
        else:
            print(f"{graph}: done", flush=True)
    if failed:
        raise SystemExit("failed: " + "\n".join(failed))
    if args.upstream_only:
        return
    summary = [sys.executable, str(HERE / "llm_summary.py"), "--backbone", args.backbone,
               *[f"{graph}=llm_{graph}_{args.tag}" for graph in commands]]
    sys.exit(subprocess.run(summary).returncode)


if __name__ == "__main__":
    main()
