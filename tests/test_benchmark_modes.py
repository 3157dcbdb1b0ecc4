"""The benchmark modes run where TensorFlow, TFDS and clu do not import
(the GPU machine), and print their figures."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a main with the TensorFlow-side packages made unimportable.
_BLOCKED_RUN = '''
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
  sys.modules[name] = None  # `import name` now raises ImportError
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def run_without_tensorflow(script, *args):
  """(stdout, the last line parsed as JSON) of `python script args`."""
  result = subprocess.run(
      [sys.executable, '-c', _BLOCKED_RUN, script, *args], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


def test_blocking_works():
  code = _BLOCKED_RUN.split("script, sys.argv")[0] + "import tensorflow\n"
  failed = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
  assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def test_eval_benchmark():
  out, figures = run_without_tensorflow(
      'eval.py', '--config=configs/shapes_demo.py', '--benchmark',
      '--benchmark_images=40', '--benchmark_batch_size=16')
  assert 'eval benchmark on cpu: 40 synthetic images at batch 16' in out
  assert figures['num_images'] == 40 and figures['nms'] == 'host'
  assert figures['seconds'] > 0 and figures['images_per_sec'] > 0
  _, device = run_without_tensorflow(
      'eval.py', '--config=configs/shapes_demo.py', '--benchmark',
      '--benchmark_images=40', '--benchmark_batch_size=16',
      '--config.test.nms_on_device=True')
  assert device['nms'] == 'device' and device['num_images'] == 40


def test_train_benchmark_runs_the_real_step_and_is_deterministic():
  flags = ['--config=configs/shapes_demo.py', '--benchmark',
           '--benchmark_steps=3', '--benchmark_warmup=1',
           '--config.solver.batch_size=4', '--config.log_step=2']
  out, figures = run_without_tensorflow('train.py', *flags)
  assert 'SSD.benchmark INFO: iter: 000002, lr:' in out
  assert 'Benchmark: ' in out and 'images/s, step p50' in out
  assert figures['batch_size'] == 4 and figures['steps'] == 3
  assert figures['images_per_sec'] > 0 and figures['compile_seconds'] > 0
  assert set(figures['step_ms']) == {'p50', 'p90', 'p99', 'mean'}
  assert figures['compiled_memory_mib']['total'] > 0
  assert len(figures['losses']) == 4
  # The same run in this process: bit-identical losses and parameters.
  from configs import shapes_demo  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import benchmark  # pylint: disable=g-import-not-at-top
  config = shapes_demo.get_config()
  config.solver.batch_size = 4
  config.log_step = 2
  again = benchmark.benchmark_training(config, steps=3, warmup=1)
  assert again['losses'] == figures['losses']
  assert again['fingerprint'] == figures['fingerprint']
