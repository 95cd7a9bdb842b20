# Sourced by the GPU scripts (gpu_check.sh, gpu_smollm2.sh): getting what a lent GPU machine lacks onto it.
#
# Each call to that machine carries at most 64 MiB, and the machine has torch, transformers, peft, accelerate
# and sentence-transformers but not our data, the packaged models (the sentence encoder, 88 MB; SmolLM2's
# GGUF, 94 MB) or faiss. So, here: lay out a staging folder as the repo root should look there, and
# carry_pack splits its tar into .gpu-carry/parts/part-NN of 58 MiB. There: one call per part, in order,
# each running `<script> ... --part part-NN --of N`; carry_part appends the part to .gpu-carry/acc.tar (an ignored
# path, which the machine keeps between calls while it is warm) and, once the tar is whole, unpacks it at
# the repo root, installs .gpu-carry/in/wheels/*.whl into /tmp/gpu-carry-site and puts src/, that and
# .gpu-carry/in/site on PYTHONPATH (kgtok runs from src/, uninstalled).
# Expects $root (the repo root) and $python (python3 there: the image's interpreter with torch).

carry_dir="$root/.gpu-carry"

# carry_wheels DEST SPEC...: wheels for the GPU machine's Python (3.12 there, as seen in 2026-11;
# $GPU_PYTHON_VERSION to change), x86-64, without their dependencies.
carry_wheels() {
  local dest="$1"; shift
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}

# carry_pack STAGE SCRIPT: the parts of STAGE's tar, and the calls to make (SCRIPT: the script they run).
carry_pack() {
  local stage="$1" script="$2"
  rm -rf "$carry_dir/parts"; mkdir -p "$carry_dir/parts"
  tar -C "$stage" -cf - . | split -b 58M -d - "$carry_dir/parts/part-"
  local parts=("$carry_dir"/parts/part-*)
  echo "${#parts[@]} parts in $carry_dir/parts ($(du -sh "$carry_dir/parts" | cut -f1)); on the GPU machine," \
    "one call each, in order:"
  for part in "${parts[@]}"; do
    echo "  run(carry=[\".gpu-carry/parts/$(basename "$part")\"], command=\"bash $script --part $(basename "$part")" \
      "--of ${#parts[@]}\")"
  done
}

# carry_part PART [TOTAL]: append PART (of TOTAL parts); 0 once all are there and unpacked (PYTHONPATH set),
# 1 before, 3 on an error (a part missing or sent twice, the machine given back between calls, unpacking or
# installing failed). Without TOTAL, "all there" is "tar reads it", which the zero padding at a tar's end can
# make true a part early. Called as `carry_part ... || ...`, where bash ignores set -e: every step checks itself.
carry_part() {
  local part="$1" total="${2:-}" number previous count
  mkdir -p "$carry_dir"
  if [[ "$part" == part-00 ]]; then  # the first part starts afresh
    rm -f "$carry_dir/acc.tar" "$carry_dir/acc.parts"
  else
    number=$((10#${part#part-}))
    previous="$(printf 'part-%02d' $((number - 1)))"
    if [[ ! -f "$carry_dir/acc.tar" ]]; then
      echo "carry: no acc.tar for $part (the machine was given back between calls?): send every part again," \
        "from part-00, back to back" >&2
      return 3
    fi
    if [[ "$(tail -n 1 "$carry_dir/acc.parts" 2>/dev/null)" != "$previous" ]]; then
      echo "carry: $part after $(tail -n 1 "$carry_dir/acc.parts" 2>/dev/null || echo nothing), not after" \
        "$previous: send the parts in order, each once (from part-00 to start again)" >&2
      return 3
    fi
  fi
  cat "$carry_dir/parts/$part" >> "$carry_dir/acc.tar" || { echo "carry: cannot append $part" >&2; return 3; }
  echo "$part" >> "$carry_dir/acc.parts"
  count=$(wc -l < "$carry_dir/acc.parts")
  if [[ -n "$total" ]] && (( count < total )); then
    echo "$part appended ($count of $total); call again with the next part"
    return 1
  fi
  if ! tar -tf "$carry_dir/acc.tar" > /dev/null 2>&1; then
    [[ -n "$total" ]] && { echo "carry: all $total parts appended, but acc.tar is not a whole tar" >&2; return 3; }
    echo "$part appended; not whole yet: call again with the next part"
    return 1
  fi
  tar -C "$root" -xf "$carry_dir/acc.tar" || { echo "carry: unpacking acc.tar failed" >&2; return 3; }
  if compgen -G "$carry_dir/in/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-carry-site \
      "$carry_dir"/in/wheels/*.whl || { echo "carry: installing the carried wheels failed" >&2; return 3; }
  fi
  export PYTHONPATH="$root/src:/tmp/gpu-carry-site:$carry_dir/in/site${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" ||
    { echo "carry: $python cannot import torch" >&2; return 3; }
}

# carried PART [TOTAL]: carry_part, then go on only once the tar is whole: exit 0 while parts are missing (the call
# did what it should), the error's status otherwise.
carried() {
  local status=0
  carry_part "$@" || status=$?
  [[ $status == 0 ]] && return 0
  [[ $status == 1 ]] && exit 0
  exit "$status"
}
