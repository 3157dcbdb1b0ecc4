"""Every GPU figure in one run: what bench/gpu.sh runs (see there).

  python bench/gpu_bench.py --out=DIR [--smoke] [--deadline=530]

Entries run in order of importance, each as its own process under its own
timeout (the remaining time before the deadline caps it), sharing one
persistent JAX compilation cache; each entry's result is appended to
DIR/gpu_bench.jsonl as it ends, and DIR/gpu_bench.json is rewritten after
every entry with the top-level "figures" (a number each, or null with a
"why" entry naming the reason). --smoke runs tiny batches and step counts
(the CPU rehearsal); the figures then describe nothing but the plumbing.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIGURE_KEYS = (
    'train_img_s_b32_float32', 'train_img_s_b32_bfloat16', 'train_img_s_best',
    'train_best_batch', 'torch_img_s_b32_float32', 'torch_img_s_b32_amp',
    'ratio_jax_torch_float32', 'ratio_jax_bf16_torch_amp', 'eval_seconds_4952',
    'peak_memory_mib_b32_float32', 'peak_memory_mib_b32_bfloat16',
    'train_step_parity_ok', 'deterministic_resume_ok',
    'host_train_img_s_per_core')

# The tf.data train pipeline on the CPU machine (BENCHMARKS.md, "Input
# pipeline"): it cannot run on the GPU machine (no TensorFlow).
HOST_PIPELINE = os.path.join(ROOT, 'bench', 'host_pipeline.json')

_PARITY = '''
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from configs import ssd300_voc
from tests import train_step_parity
from tests.reference_data import load_fixture
config = ssd300_voc.get_config()
config.model.backbone.pretrained = ""
result = train_step_parity.check(train_step_parity.reference_config(config),
                                 load_fixture("train_step.npz"))
result["device"] = jax.devices()[0].device_kind
print(json.dumps(result))
'''


def versions():
  """Python, jax, flax, optax, orbax, torch versions and the devices."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  found = {'python': platform.python_version()}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint',
                  'numpy', 'torch', 'ml-collections'):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  try:
    out = subprocess.run(
        [sys.executable, '-c', 'import jax; d = jax.devices(); '
         'print(len(d), d[0].platform, d[0].device_kind)'],
        capture_output=True, text=True, timeout=120, cwd=ROOT).stdout.split()
    found['devices'] = ' '.join(out)
  except (subprocess.TimeoutExpired, OSError) as e:
    found['devices'] = f'unknown ({e})'
  try:
    found['nvidia_smi'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
         '--format=csv,noheader'], capture_output=True, text=True,
        timeout=30).stdout.strip() or None
  except (OSError, subprocess.TimeoutExpired):
    found['nvidia_smi'] = None
  return found


class Runner:
  """Runs entries before a deadline and keeps their results."""

  def __init__(self, out, deadline_s, log):
    self.out = out
    self.stop_at = time.monotonic() + deadline_s
    self.log = log
    self.results = {}
    self.jsonl = os.path.join(out, 'gpu_bench.jsonl')
    open(self.jsonl, 'w').close()

  def remaining(self):
    return self.stop_at - time.monotonic()

  def run(self, name, argv, timeout):
    """Runs `argv`; its last stdout line, parsed as JSON, is the result."""
    budget = min(timeout, self.remaining())
    record = {'name': name, 'command': ' '.join(argv)}
    if budget < 20:
      record['error'] = 'skipped: not enough time left before the deadline'
    else:
      start = time.monotonic()
      try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=budget)
        self.log.write(f'== {name} ({time.monotonic() - start:.1f} s): '
                       f'{record["command"]}\n{done.stdout}{done.stderr}\n')
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and lines[-1].startswith('{'):
          record['result'] = json.loads(lines[-1])
        else:
          tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
          record['error'] = f'exit {done.returncode}: {tail[-300:]}'
      except subprocess.TimeoutExpired:
        record['error'] = f'timed out after {budget:.0f} s'
      record['seconds'] = round(time.monotonic() - start, 1)
    self.log.flush()
    self.results[name] = record
    with open(self.jsonl, 'a') as f:
      f.write(json.dumps(record) + '\n')
    status = ('ok' if 'result' in record else record['error'])
    print(f'{name}: {status} ({record.get("seconds", 0)} s)', flush=True)
    return record.get('result')


def figures_of(results, smoke):
  """The "figures" object and the reasons for the nulls."""
  figures, why = {}, {}

  def result(name):
    return (results.get(name) or {}).get('result')

  def reason(name):
    record = results.get(name)
    return record.get('error', 'no result') if record else 'not run'

  def take(key, name, field):
    value = (result(name) or {}).get(field)
    figures[key] = value
    if value is None:
      why[key] = f'{name}: {reason(name)}'

  take('train_img_s_b32_float32', 'train_b32_float32', 'images_per_sec')
  take('train_img_s_b32_bfloat16', 'train_b32_bfloat16', 'images_per_sec')
  take('peak_memory_mib_b32_float32', 'train_b32_float32', 'peak_memory_mib')
  take('peak_memory_mib_b32_bfloat16', 'train_b32_bfloat16',
       'peak_memory_mib')
  for key, name in (('peak_memory_mib_b32_float32', 'train_b32_float32'),
                    ('peak_memory_mib_b32_bfloat16', 'train_b32_bfloat16')):
    if figures[key] is None and result(name):
      compiled = result(name).get('compiled_memory_mib') or {}
      figures[key] = compiled.get('total')
      why[key] = ('the runtime reports no peak (CPU): the compiled step\'s '
                  'memory analysis instead')
  take('torch_img_s_b32_float32', 'torch_b32_float32', 'images_per_sec')
  take('torch_img_s_b32_amp', 'torch_b32_amp', 'images_per_sec')
  take('eval_seconds_4952', 'eval_4952', 'seconds')

  rates = {}
  for name, record in results.items():
    if name.startswith('train_b') and record.get('result'):
      rates[name] = record['result']
  if rates:
    best = max(rates, key=lambda n: rates[n]['images_per_sec'])
    figures['train_img_s_best'] = rates[best]['images_per_sec']
    figures['train_best_batch'] = rates[best]['batch_size']
    why['train_img_s_best'] = f'best of {sorted(rates)}: {best}'
  else:
    figures['train_img_s_best'] = figures['train_best_batch'] = None
    why['train_img_s_best'] = why['train_best_batch'] = 'no train entry ran'

  for key, jax_key, torch_key in (
      ('ratio_jax_torch_float32', 'train_img_s_b32_float32',
       'torch_img_s_b32_float32'),
      ('ratio_jax_bf16_torch_amp', 'train_img_s_b32_bfloat16',
       'torch_img_s_b32_amp')):
    if figures.get(jax_key) and figures.get(torch_key):
      figures[key] = figures[jax_key] / figures[torch_key]
    else:
      figures[key] = None
      why[key] = f'needs {jax_key} and {torch_key}'

  parity = result('train_step_parity')
  figures['train_step_parity_ok'] = None if parity is None else parity['ok']
  if parity is None:
    why['train_step_parity_ok'] = f'train_step_parity: {reason("train_step_parity")}'

  first, second = result('deterministic_a'), result('deterministic_b')
  if first and second:
    figures['deterministic_resume_ok'] = (
        first['fingerprint'] == second['fingerprint'] and
        first['losses'] == second['losses'])
  else:
    figures['deterministic_resume_ok'] = None
    why['deterministic_resume_ok'] = (
        f'deterministic_a: {reason("deterministic_a")}; deterministic_b: '
        f'{reason("deterministic_b")}')

  try:
    with open(HOST_PIPELINE) as f:
      host = json.load(f)
    figures['host_train_img_s_per_core'] = host['train_img_s_per_core']
    why['host_train_img_s_per_core'] = (
        f'measured on {host["machine"]} ({host["date"]}), not on this '
        'machine (no TensorFlow here)')
  except (OSError, KeyError, ValueError) as e:
    figures['host_train_img_s_per_core'] = None
    why['host_train_img_s_per_core'] = f'{HOST_PIPELINE}: {e}'
  if smoke:
    why['smoke'] = 'SMOKE run: tiny batches and steps, no real figure'
  return figures, why


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='bench_out')
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--deadline', type=float, default=530,
                      help='seconds: no entry runs past this')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  py = sys.executable
  smoke = args.smoke
  # The smoke run uses the small demo model: the plumbing, not SSD300.
  config = ['--config=configs/shapes_demo.py' if smoke
            else '--config=configs/ssd300_voc.py']
  batch = 2 if smoke else 32
  big_batch = 4 if smoke else 128
  steps, warmup = (2, 1) if smoke else (50, 5)

  def train(name, batch_size, dtype, timeout, *extra):
    return (name, [py, 'train.py', *config, '--benchmark',
                   f'--benchmark_steps={steps}',
                   f'--benchmark_warmup={warmup}',
                   f'--config.solver.batch_size={batch_size}',
                   f'--config.model.dtype={dtype}', '--config.log_step=25',
                   *extra], timeout)

  def torch(name, *extra):
    return (name, [py, 'bench/torch_step.py', f'--batch_size={batch}',
                   f'--steps={steps * 2 if not smoke else 1}', '--repeats=2',
                   *extra], 150)

  eval_images = 8 if smoke else 4952
  entries = [
      train('train_b32_float32', batch, 'float32', 180),
      train('train_b32_bfloat16', batch, 'bfloat16', 180),
      torch('torch_b32_float32'),
      torch('torch_b32_amp', '--amp'),
      ('eval_4952', [py, 'eval.py', *config, '--benchmark',
                     f'--benchmark_images={eval_images}',
                     f'--benchmark_batch_size={4 if smoke else 64}',
                     '--config.test.nms_on_device=True'], 150),
      ('train_step_parity', [py, '-c', _PARITY], 150),
      train('deterministic_a', batch, 'float32', 120,
            '--config.deterministic=True', '--benchmark_steps=5'),
      train('deterministic_b', batch, 'float32', 90,
            '--config.deterministic=True', '--benchmark_steps=5'),
      train(f'train_b{big_batch}_bfloat16', big_batch, 'bfloat16', 150),
  ]
  if smoke:  # CPU autocast is very slow and says nothing about AMP on GPU
    entries = [e for e in entries if e[0] != 'torch_b32_amp']

  found = versions()
  print('versions: ' + json.dumps(found), flush=True)
  json_path = os.path.join(args.out, 'gpu_bench.json')
  with open(os.path.join(args.out, 'gpu_bench.log'), 'w') as log:
    runner = Runner(args.out, args.deadline, log)
    if smoke:
      runner.results['torch_b32_amp'] = {
          'name': 'torch_b32_amp',
          'error': 'skipped in SMOKE: CPU autocast says nothing about AMP on '
                   'a GPU'}
    for name, argv, timeout in entries:
      runner.run(name, argv, timeout)
      figures, why = figures_of(runner.results, smoke)
      with open(json_path, 'w') as f:
        json.dump({'figures': figures, 'why': why, 'versions': found,
                   'smoke': smoke, 'entries': runner.results}, f, indent=1)
  for key in FIGURE_KEYS:
    value = figures.get(key)
    print(f'{key:32s} {value if value is not None else "null: " + why[key]}')
  print(f'Wrote {json_path}')


if __name__ == '__main__':
  main()
