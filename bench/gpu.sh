#!/usr/bin/env bash
# One command for a GPU machine that has JAX (CUDA), flax, optax, orbax and
# PyTorch but no TensorFlow, ml-collections, clu or network:
#
#   bash bench/gpu.sh [OUT_DIR]        (OUT_DIR defaults to $OUT or bench_out)
#
# It installs the wheels in .whl/ if present (ml-collections; prepare them on a
# machine with PyPI access with `bash bench/gpu.sh --fetch-wheels`), then runs,
# each as its own process so that one failure does not stop the rest:
#   JAX train step, batch 32 and 128, float32 and bfloat16
#   PyTorch train step (the reference), batch 32, float32 and AMP (float16)
#   JAX eval forward, batch 64, float32 and bfloat16
# and writes all results into OUT_DIR/gpu_bench.json (plus the raw log).
# SMOKE=1 runs tiny batches and step counts (to check the script on a CPU
# machine; PYTHON=... picks the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any \
    -d .whl "ml-collections==1.1.0"
  exit $?
fi

out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/ssd_jax_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/ssd_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
steps=${STEPS:-30}
if [[ "${SMOKE:-0}" == "1" ]]; then steps=1; fi
log="$out/gpu_bench.log"
: >"$log"
results="$out/gpu_bench.jsonl"
: >"$results"

run() {  # run NAME CMD...: appends the command's last JSON line to $results
  local name=$1; shift
  echo "== $name: $*" | tee -a "$log"
  local line
  line=$("$@" 2>>"$log" | tee -a "$log" | tail -n 1)
  if [[ "$line" == \{* ]]; then
    echo "{\"name\": \"$name\", \"result\": $line}" >>"$results"
  else
    echo "{\"name\": \"$name\", \"error\": \"failed, see gpu_bench.log\"}" >>"$results"
  fi
}

small_batch=32; big_batch=128; eval_batch=64
if [[ "${SMOKE:-0}" == "1" ]]; then small_batch=2; big_batch=4; eval_batch=2; fi
for dtype in float32 bfloat16; do
  for batch in $small_batch $big_batch; do
    run "jax_train_b${batch}_${dtype}" "$py" bench/train_step.py \
      --config=configs/ssd300_voc.py --batch_size=$batch --steps=$steps \
      --repeats=2 --config.model.dtype=$dtype
  done
done
run "torch_train_b${small_batch}_float32" "$py" bench/torch_step.py \
  --batch_size=$small_batch --steps=$steps --repeats=2
if [[ "${SMOKE:-0}" != "1" ]]; then  # CPU autocast (bfloat16) is very slow
  run "torch_train_b${small_batch}_amp" "$py" bench/torch_step.py \
    --batch_size=$small_batch --steps=$steps --repeats=2 --amp
fi
for dtype in float32 bfloat16; do
  run "jax_eval_forward_b${eval_batch}_${dtype}" "$py" bench/predict_step.py \
    --config=configs/ssd300_voc.py --batch_size=$eval_batch --steps=$steps \
    --config.model.dtype=$dtype
done

"$py" - "$results" "$out/gpu_bench.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump(rows, open(sys.argv[2], 'w'), indent=1)
for row in rows:
  r = row.get('result')
  print(f"{row['name']:32s}", f"{r['images_per_sec']:9.1f} img/s" if r else row['error'])
EOF
