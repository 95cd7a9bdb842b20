"""Time and peak memory of stages 0-4 on synthetic KGs of 10k, 100k and 1M entities.

    python bench/scale.py                       # 10k, 100k and 1M (hours on 2 cores: a quiet machine)
    python bench/scale.py --sizes 10000         # the quick smoke (minutes)
    python bench/scale.py --sizes 300 --result /tmp/x.json --work /tmp/w   # what the test runs

Every stage runs as its own ``kgtok`` command under GNU ``/usr/bin/time``
(wall seconds, peak resident set size), one after the other, so the numbers
are the library's and nothing else's. Results merge into
``bench/results/scale_synthetic.json``, keyed by entity count, with the
log-log slope of seconds and of peak memory against the entity count per
stage (1 = linear) and a markdown table beside it.

Settings, the same at every size, chosen to make 1M entities feasible on one
machine (the defaults of each stage are made for quality at WN18RR's size):

* synthetic: the default generator (about 6 triples per entity), valid and
  test held to about 2,000 triples each, so that ranking them (every query
  against every entity) grows linearly with N, as training does;
* stage 0 (data): ``kgtok data info``: load, validate, count;
* stage 1 (embed): DistMult, 32 dims, 256 sampled negatives shared by the
  whole batch (``shared_negatives``, self-adversarial; 64 per positive drawn
  per example cost a cache miss per row and grew faster than n log n,
  bench/results/scale_sparse_step.md), one epoch, one validation on 1,000
  queries, candidates exported for test only, scoring 64 queries at a time (bounded memory);
* stage 2 (text): ``mode=joint`` (one text per entity); skipped at 1M
  entities: about a million sentence-encoder passes, some 30 minutes on two
  cores, and stage 3 here reads the graph vectors only at every size;
* stage 3 (hierarchy): the kmeans builder at every size (agglomerative is
  O(N²) memory), 4 levels, from the stage-1 vectors;
* stage 4 (quantize): GS-Quant 4 levels (codebook N/8 capped at 1024), two
  epochs, evaluated after each, GSE's L1 against 1,024 drawn centres where a
  level has more (the default draws 8,192: at 100k entities 1,024 gave codes
  with no measurable difference in purity against the hierarchy or the types,
  in 87 s instead of 129 s, bench/results/quantizer_l1_negatives.md; at 1M the
  two deepest levels cost half of each step at 8,192); ``collisions_after`` is the collision rate
  after disambiguation (0 by construction: a check), ``collisions_before``
  the share of entities sharing their code tuple before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, machine  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
SPLIT_TRIPLES = 2000  # valid and test triples each, at every size
TEXT_MAX_ENTITIES = 200_000  # stage 2 is skipped above this (see the module docstring)
STAGES = ("synthetic", "data", "embed", "text", "hierarchy", "quantize")


def kgtok(*args: str) -> list[str]:
    return [sys.executable, "-m", "kgtok.cli", *args]


def stage_commands(n: int, root: Path, threads: int, skip_text: bool = False) -> dict[str, list[str] | None]:
    """The command of each stage at ``n`` entities (None: skipped at this size)."""
    kg, t = root / "kg", f"threads={threads}"
    fraction = min(0.05, SPLIT_TRIPLES / (n * 6.0))  # the default generator makes about 6 triples per entity
    steps = math.ceil(2 * (n * 6.0) / 1000)  # about one epoch of batches of 1,000
    return {
        "synthetic": kgtok("data", "synthetic", str(kg), f"num_entities={n}", f"valid_fraction={fraction:.6f}",
                           f"test_fraction={fraction:.6f}"),
        "data": kgtok("data", "info", str(kg)),
        "embed": kgtok("embed", "--data", str(kg), "--out", str(root / "embed"), "--no-progress", "model=distmult",
                       "dim=32", "loss=nssa", "shared_negatives=true", "num_negatives=256", "batch_size=1000",
                       f"max_steps={steps}", f"eval_every={steps}", "eval_max_queries=1000", "eval_batch_size=64",
                       "export_splits=[test]", "top_k=10", t),
        "text": (kgtok("text", "--data", str(kg), "--out", str(root / "text"), "--no-progress", "mode=joint", t)
                 if n <= TEXT_MAX_ENTITIES and not skip_text else None),
        "hierarchy": kgtok("hierarchy", "--data", str(kg), "--embeddings", str(root / "embed"), "--out",
                           str(root / "hierarchy"), "builder=kmeans", "levels=4", t),
        "quantize": kgtok("quantize", "--data", str(kg), "--hierarchy", str(root / "hierarchy"), "--out",
                          str(root / "quantize"), "--no-progress", "variant=gsquant", "levels=4", "epochs=2",
                          "eval_every=1", "gse.l1_negatives=1024", t),
    }


def timed_run(argv: list[str], env: dict[str, str], log: Path) -> dict[str, float | None]:
    """Wall seconds and peak RSS (MB) of one command, from GNU time; the command's output goes to ``log``."""
    gnu_time = "/usr/bin/time" if Path("/usr/bin/time").exists() else None  # the shell's `time` has no %M
    with tempfile.NamedTemporaryFile("r", suffix=".time") as record, open(log, "a") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        start = time.perf_counter()
        prefix = [gnu_time, "-f", "%e %M", "-o", record.name] if gnu_time else []
        done = subprocess.run(prefix + argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}); see {log}")
        fields = record.read().split() if gnu_time else []
    peak = float(fields[-1]) / 1024 if len(fields) >= 2 else None  # GNU time's %M is in KB
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1) if peak is not None else None}


def measure(n: int, work: Path, threads: int, skip_text: bool = False, only: dict | None = None,
            extra: dict[str, list[str]] | None = None) -> dict:
    """Run every stage at ``n`` entities in ``work``; the record of one size.

    ``only``: the record of an earlier run at this size whose work folder is kept (``--keep``): its
    stages' artifacts are reused and only the stages in ``extra`` run again (their numbers replace the
    old ones; ``extra`` maps a stage to key=value settings added to its command)."""
    root = work / f"n{n}"
    if only is None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    env = {**os.environ, "KGTOK_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": str(threads)}
    record: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "stages": {}}
    if only is not None:
        record["stages"] = {k: {**v, "from_run": only["machine"]["date"]} for k, v in only["stages"].items()}
    for name, argv in stage_commands(n, root, threads, skip_text).items():
        if only is not None and name not in (extra or {}):
            continue
        if argv is not None and extra:
            argv = argv + extra.get(name, [])
        if argv is None:
            record["stages"][name] = {"skipped": "--skip-text (stage 3 reads graph vectors only at every size)"
                                      if skip_text and n <= TEXT_MAX_ENTITIES else
                                      f"more than {TEXT_MAX_ENTITIES:,} entities: about a million "
                                      f"sentence-encoder passes (~30 min on 2 cores); stage 3 reads "
                                      f"graph vectors only at every size"}
            continue
        print(f"scale: {n:,} entities: {name} ...", flush=True)
        stage = timed_run(argv, env, root / "commands.log")
        stage["command"] = " ".join(a if a != sys.executable else "python" for a in argv)
        record["stages"][name] = stage
    metrics = json.loads((root / "quantize" / "metrics.json").read_text())
    quantize = record["stages"]["quantize"]
    quantize["collisions_after"] = metrics["collision_rate_after"]
    quantize["collisions_before"] = metrics["collision_rate_before"]
    quantize["utilization"] = metrics["utilization"]
    embed = json.loads((root / "embed" / "manifest.json").read_text())["metrics"]
    record["stages"]["embed"]["test_mrr"] = embed["test_mrr"]
    info = json.loads((root / "kg" / "synthetic.json").read_text())
    record["kg"] = {"entities": n, "triples": sum(
        sum(1 for _ in open(root / "kg" / f"{s}.txt")) for s in ("train", "valid", "test")), "config": info}
    record["load_after"] = [round(x, 2) for x in os.getloadavg()]
    # The bench's own threads raise the load to about ``threads``; more than that is someone else's work.
    record["shared_machine"] = max(record["load_before"][0], record["load_after"][0]) > threads + 0.5
    return record


def slopes(data: dict) -> dict[str, dict[str, float]]:
    """Per stage, the least-squares slope of log(seconds) and log(peak RSS) against log(entities)."""
    out = {}
    sizes = sorted(int(k) for k in data if k.isdigit())
    for stage in STAGES:
        points = [(n, data[str(n)]["stages"].get(stage, {})) for n in sizes]
        points = [(n, s) for n, s in points if "seconds" in s]
        if len(points) < 2:
            continue
        x = np.log([n for n, _ in points])
        out[stage] = {
            key: round(float(np.polyfit(x, np.log([max(s[key], 1e-3) for _, s in points]), 1)[0]), 3)
            for key in ("seconds", "peak_rss_mb") if all(s.get(key) for _, s in points)
        }
        out[stage]["sizes"] = [n for n, _ in points]
    return out


def table(data: dict) -> str:
    sizes = sorted(int(k) for k in data if k.isdigit())
    lines = ["| stage | " + " | ".join(f"{n:,}: s / MB" for n in sizes) + " | slope s | slope MB |",
             "| --- |" + " --- |" * (len(sizes) + 2)]
    for stage in STAGES:
        cells = []
        for n in sizes:
            s = data[str(n)]["stages"].get(stage, {})
            cells.append("skipped" if "skipped" in s else f"{s['seconds']:.1f} / {s['peak_rss_mb']}" if s else "")
        slope = data.get("slopes", {}).get(stage, {})
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {slope.get('seconds', '')} | "
                     f"{slope.get('peak_rss_mb', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kgtok-scale")
    parser.add_argument("--result", type=Path, default=RESULTS / "scale_synthetic.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folders (KGs and artifacts)")
    parser.add_argument("--skip-text", action="store_true",
                        help="skip stage 2 at every size (it is the slowest stage and stage 3 does not read it here)")
    parser.add_argument("--replot", action="store_true", help="only rewrite the table and plot from the JSON")
    parser.add_argument("--rerun", nargs="+", default=None, metavar="STAGE[:key=value,...]",
                        help="with a work folder kept by --keep: run only these stages again, with these added "
                             "settings, reusing the others' artifacts and numbers (e.g. quantize:gse.l1_negatives=1024)")
    args = parser.parse_args()
    data = json.loads(args.result.read_text()) if args.result.exists() else {}
    extra = ({spec.partition(":")[0]: [kv for kv in spec.partition(":")[2].split(",") if kv] for spec in args.rerun}
             if args.rerun else None)
    for n in [] if args.replot else args.sizes:
        record = measure(n, args.work, args.threads, args.skip_text, only=data[str(n)] if extra else None,
                         extra=extra)
        record.update(command=command(), threads=args.threads, machine=machine())
        data[str(n)] = record
        data["slopes"] = slopes(data)
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(data, indent=2) + "\n")  # after every size: a long run keeps its numbers
        if not args.keep:
            shutil.rmtree(args.work / f"n{n}", ignore_errors=True)
    write_markdown(data, args.result.with_suffix(".md"))
    write_plot(data, args.result.with_suffix(".svg"))
    print(table(data))


def write_plot(data: dict, path: Path) -> None:
    """Seconds per stage against entities, log-log, with n and n log n drawn through the smallest size's
    largest time (a stage growing faster than the dashed line is worse than n log n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(k) for k in data if k.isdigit())
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for stage in STAGES:
        points = [(n, data[str(n)]["stages"].get(stage, {}).get("seconds")) for n in sizes]
        points = [(n, t) for n, t in points if t]
        if len(points) >= 2:
            axes.plot(*zip(*points), marker="o", label=stage)
    if sizes:
        x = np.array(sizes, dtype=float)
        top = max((s.get("seconds") or 0) for s in data[str(sizes[0])]["stages"].values())
        axes.plot(x, top * x / x[0], "k:", lw=1, label="n")
        axes.plot(x, top * x * np.log(x) / (x[0] * np.log(x[0])), "k--", lw=1, label="n log n")
    axes.set(xscale="log", yscale="log", xlabel="entities", ylabel="seconds",
             title="kgtok stages 0-4 on synthetic KGs (bench/scale.py)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None})
    plt.close(figure)


def write_markdown(data: dict, path: Path) -> None:
    """The table, and per size the command, the CPU and whether the machine was shared (load average > threads + 0.5)."""
    runs = "".join(
        f"- {int(n):,} entities: `{r['command']}`; {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"{r['threads']} threads; load average {r['load_before'][0]} before, {r['load_after'][0]} after: "
        f"{'shared with other jobs' if r['shared_machine'] else 'quiet'}; {r['machine']['date']}\n"
        for n, r in sorted(((k, v) for k, v in data.items() if k.isdigit()), key=lambda kv: int(kv[0])))
    path.write_text(f"# scale_synthetic\n\nSeconds and peak RSS (MB) per stage, each stage a `kgtok` command under "
                    f"GNU time; slopes of log-log fits against the entity count (1 = linear). Settings: "
                    f"`bench/scale.py`'s docstring; each stage's command is in the JSON.\n\n{table(data)}\n\n"
                    f"Runs:\n\n{runs}")


if __name__ == "__main__":
    main()
