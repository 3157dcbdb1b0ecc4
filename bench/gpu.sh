#!/usr/bin/env bash
# Every GPU figure in one call, on a machine with JAX (CUDA), flax, optax,
# orbax and PyTorch but no TensorFlow, clu, ml-collections or network:
#
#   bash bench/gpu.sh [OUT_DIR]        (OUT_DIR defaults to $OUT or bench_out)
#   SMOKE=1 bash bench/gpu.sh          (tiny runs: the CPU rehearsal)
#
# 1. Installs the tracked wheels of bench/wheels (ml-collections, tqdm) only
#    where the import fails (no network needed).
# 2. Prints the versions of python, jax, flax, optax, orbax, torch and the GPU.
# 3. Runs bench/gpu_bench.py: in order of importance, each entry its own
#    process under its own timeout, one persistent compilation cache for all,
#      train.py --benchmark, SSD300 batch 32, float32 and bfloat16
#      bench/torch_step.py (the reference's model, cudnn.benchmark on),
#        batch 32, float32 and AMP
#      eval.py --benchmark: 4,952 images, NMS on the device
#      the reference's three SGD iterations (tests/fixtures/train_step.npz)
#      two deterministic runs (config.deterministic) compared bit for bit
#      train.py --benchmark at batch 128, bfloat16
#    appending each result to OUT_DIR/gpu_bench.jsonl as it ends and writing
#    OUT_DIR/gpu_bench.json ({"figures": ..., "why": ...}) after each entry.
# Estimated on an H200: about 6 minutes (train entries ~60 s each, torch
# ~30 s, eval ~40 s, parity ~60 s, the deterministic pair ~70 s, batch 128
# ~70 s); no entry starts past 530 s and the whole run stops at 540 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5

site=/tmp/ssd_jax_site
for wheel in bench/wheels/*.whl; do
  package=$(basename "$wheel" | cut -d- -f1)
  if ! "$py" -c "import $package" 2>/dev/null; then
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile \
        --target "$site" "$wheel" 2>/dev/null; then
      # No pip: a pure-Python wheel imports from its zip as it is.
      export PYTHONPATH="$PWD/$wheel:$PYTHONPATH"
    fi
  fi
done
[[ -d "$site" ]] && export PYTHONPATH="$site:$PYTHONPATH"

smoke=()
[[ "${SMOKE:-0}" == "1" ]] && smoke=(--smoke)
timeout -k 5 540 "$py" bench/gpu_bench.py --out="$out" --deadline=530 \
  "${smoke[@]}"
status=$?
[[ $status -eq 124 ]] && echo "gpu.sh: stopped at the 540 s limit; $out/gpu_bench.json holds the entries that ended"
exit $status
