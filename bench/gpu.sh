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
#   train.py end to end (bench/trainer.py: SSD300 on a generated VOC-format
#     shapes set, input pipeline included, 150 steps of 32): images/s,
#     data-wait fraction, peak device memory. It needs TensorFlow (the input
#     pipeline) and clu: carry them in .whl/trainer/ (`bash bench/gpu.sh
#     --fetch-wheels --trainer`, hundreds of MB); without them it is recorded as
#     skipped, with the reason.
# and writes all results into OUT_DIR/gpu_bench.json (plus the raw log).
# SMOKE=1 runs tiny batches and step counts (to check the script on a CPU
# machine; PYTHON=... picks the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any \
    -d .whl "ml-collections==1.1.0" || exit 1
  if [[ "${2:-}" == "--trainer" ]]; then
    # With dependencies; at install time the ones the GPU machine already has
    # (jax, numpy, ...) are left alone.
    python3 -m pip download --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any \
      -d .whl/trainer "tensorflow-cpu==2.21.0" "clu==0.0.12" || exit 1
  fi
  exit 0
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
install_missing() {  # install_missing DIR: DIR's wheels not installed already
  "$py" - "$1" <<'EOF'
import glob, importlib.metadata, os, subprocess, sys
missing = []
for wheel in sorted(glob.glob(os.path.join(sys.argv[1], '*.whl'))):
  try:
    importlib.metadata.version(os.path.basename(wheel).split('-')[0])
  except importlib.metadata.PackageNotFoundError:
    missing.append(wheel)
if missing:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index',
                  '--no-deps', '--no-compile', '--no-cache-dir', '--target',
                  '/tmp/ssd_jax_site', *missing], check=True)
EOF
}
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

if [[ -d .whl/trainer ]]; then
  export PYTHONPATH="/tmp/ssd_jax_site${PYTHONPATH:+:$PYTHONPATH}"
  install_missing .whl/trainer >>"$log" 2>&1 ||
    echo "trainer wheels: install failed" | tee -a "$log"
fi
if "$py" -c "import tensorflow, clu, ml_collections" 2>>"$log"; then
  if [[ "${SMOKE:-0}" == "1" ]]; then
    trainer_args=(--steps=3 --log_step=1 --batch_size=2 --image_size=120
                  --num_train=8 --num_test=2 --data="$out/shapes_smoke")
  else
    trainer_args=(--steps=150 --log_step=25 --batch_size=32 --image_size=400
                  --num_train=1024 --num_test=32 --data="$out/shapes")
  fi
  run "jax_trainer_end_to_end_float32" "$py" bench/trainer.py \
    "${trainer_args[@]}" --workdir="$out/trainer_workdir"
else
  echo "== jax_trainer_end_to_end_float32: skipped (no tensorflow/clu)" |
    tee -a "$log"
  echo '{"name": "jax_trainer_end_to_end_float32", "error": "skipped: train.py needs tensorflow-cpu and clu; carry them in .whl/trainer (bash bench/gpu.sh --fetch-wheels --trainer)"}' >>"$results"
fi

"$py" - "$results" "$out/gpu_bench.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump(rows, open(sys.argv[2], 'w'), indent=1)
for row in rows:
  r = row.get('result')
  extra = ''
  if r and 'data_wait_fraction' in r:
    extra = (f"  data wait {r['data_wait_fraction']:.3f}, peak "
             f"{r['peak_memory_mib']} MiB")
  print(f"{row['name']:32s}",
        f"{r['images_per_sec']:9.1f} img/s{extra}" if r else row['error'])
EOF
