# Sourced by the GPU scripts (gpu_check.sh, gpu_smollm2.sh): getting what a lent GPU machine lacks onto it.
#
# Each call to that machine carries at most 64 MiB, and the machine has torch, transformers, peft, accelerate
# and sentence-transformers but not our data, the packaged models (the sentence encoder, 88 MB; SmolLM2's
# GGUF, 94 MB) or faiss. So, here: lay out a staging folder as the repo root should look there, and
# carry_pack splits its tar into .gpu-carry/parts/part-NN of 58 MiB. There: one call per part, in order,
# each running `<script> ... --part part-NN`; carry_part appends the part to .gpu-carry/acc.tar (an ignored
# path, which the machine keeps between calls while it is warm) and, once the tar is whole, unpacks it at
# the repo root, installs .gpu-carry/in/wheels/*.whl into /tmp/gpu-carry-site and puts src/, that and
# .gpu-carry/in/site on PYTHONPATH (kgtok runs from src/, uninstalled).
# Expects $root (the repo root) and $python.

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
    echo "  run(carry=[\".gpu-carry/parts/$(basename "$part")\"], command=\"bash $script --part $(basename "$part")\")"
  done
}

# carry_part PART: append PART; 0 once the tar is whole and unpacked (PYTHONPATH set), 1 before.
carry_part() {
  local part="$1"
  mkdir -p "$carry_dir"
  [[ "$part" == part-00 ]] && rm -f "$carry_dir/acc.tar"  # the first part starts afresh
  cat "$carry_dir/parts/$part" >> "$carry_dir/acc.tar"
  if ! tar -tf "$carry_dir/acc.tar" > /dev/null 2>&1; then
    echo "$part appended; not whole yet: call again with the next part"
    return 1
  fi
  tar -C "$root" -xf "$carry_dir/acc.tar"
  if compgen -G "$carry_dir/in/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-carry-site \
      "$carry_dir"/in/wheels/*.whl
  fi
  export PYTHONPATH="$root/src:/tmp/gpu-carry-site:$carry_dir/in/site${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}
