"""Start-up times of the commands, with the one-compile `create_model` and
with the eager build it replaced, side by side in one run.

  PYTHONPATH=. python bench/startup.py [--rounds=2]

Each measurement is a fresh process with the persistent compilation cache
off (what a first start pays), from the spawn to the moment named:

* train.py (configs/shapes_demo.py, the README's demo) to its first logged
  iteration (`iter: 000001` in log.txt; the process is then stopped);
* `Detector.from_workdir` of that demo's workdir, and its first detection;
* demo.py on a folder of demo test images, to its first drawn image.

"eager" patches `models.create_model` with the eager build (every
initialiser op by op, as before the one-compile build); the Detector and
demo.py build their model abstractly (`nnx.eval_shape`) and restore it from
the checkpoint, so create_model's compilations never concerned them: they
are measured once, with today's code.
"""

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = 'configs/shapes_demo.py'

# argv: how (eager | jit), script, script arguments...
_CHILD = '''
import runpy, sys
how, script = sys.argv[1], sys.argv[2]
if how == "eager":
  import jax
  from flax import nnx
  from ssd_jax import models
  from ssd_jax.models import ssd
  def eager_create_model(config, rngs=None):
    ssd.validate_config(config)
    with jax.threefry_partitionable(False):
      return ssd.SSD(config, rngs=rngs if rngs is not None
                     else nnx.Rngs(config.seed))
  models.create_model = eager_create_model
  ssd.create_model = eager_create_model
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
'''

_DETECTOR = '''
import sys, time
start = float(sys.argv[1])
from ssd_jax import Detector
detector = Detector.from_workdir(sys.argv[2])
loaded = time.time()
detector([sys.argv[3]])
print(loaded - start, time.time() - start)
'''


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(PYTHONPATH=ROOT, JAX_ENABLE_COMPILATION_CACHE='false')
  return env


def _seconds_until(args, ready, timeout=600):
  """Seconds from spawning `args` until `ready()`; the process is killed."""
  start = time.time()
  process = subprocess.Popen(args, cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  try:
    while not ready():
      if process.poll() is not None:
        raise RuntimeError(f'{args[2:4]} ended ({process.returncode}): '
                           f'{process.stderr.read().decode()[-2000:]}')
      if time.time() - start > timeout:
        raise RuntimeError(f'{args} timed out')
      time.sleep(0.02)
    return time.time() - start
  finally:
    process.kill()
    process.wait()


def train_to_first_step(how, workdir):
  shutil.rmtree(workdir, ignore_errors=True)
  log = os.path.join(workdir, 'log.txt')

  def ready():
    if not os.path.exists(log):
      return False
    with open(log) as f:
      return 'iter: 000001' in f.read()

  return _seconds_until(
      [sys.executable, '-c', _CHILD, how, 'train.py',
       f'--config={DEMO_CONFIG}', f'--workdir={workdir}',
       '--config.log_step=1'], ready)


def demo_to_first_image(workdir, images_dir, output_dir):
  shutil.rmtree(output_dir, ignore_errors=True)
  return _seconds_until(
      [sys.executable, '-c', _CHILD, 'jit', 'demo.py', f'--workdir={workdir}',
       f'--images_dir={images_dir}', f'--output_dir={output_dir}'],
      lambda: bool(glob.glob(os.path.join(output_dir, '*.jpg')) or
                   glob.glob(os.path.join(output_dir, '*.png'))))


def detector_times(workdir, image):
  out = subprocess.run(
      [sys.executable, '-c', _DETECTOR, str(time.time()), workdir, image],
      cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
  loaded, detected = map(float, out.stdout.split()[-2:])
  return loaded, detected


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--workdir', default='outputs/shapes_demo',
                      help='A trained demo workdir (README command 1).')
  args = parser.parse_args()
  workdir = os.path.abspath(os.path.join(ROOT, args.workdir))
  if not glob.glob(os.path.join(workdir, 'checkpoints', '*')):
    sys.exit(f'no checkpoint in {workdir}: run `python train.py '
             f'--config={DEMO_CONFIG}` first (or pass --workdir)')
  images = sorted(glob.glob(os.path.join(
      ROOT, 'datasets/shapes/VOC2007/JPEGImages/*.jpg')))[-4:]
  if not images:
    sys.exit('no demo images in datasets/shapes: train the demo first')
  scratch = tempfile.mkdtemp(prefix='ssd_jax_startup_')
  images_dir = os.path.join(scratch, 'images')
  os.makedirs(images_dir)
  for image in images:
    shutil.copy(image, images_dir)
  print(f'{platform.node()}, {os.cpu_count()} CPUs, {_cpu_model()}, '
        f'load average {os.getloadavg()[0]:.2f}')
  times = {'eager': [], 'jit': []}
  for _ in range(args.rounds):  # alternating: both see the same machine
    for how in times:
      times[how].append(train_to_first_step(
          how, os.path.join(scratch, f'train_{how}')))
  loaded, detected, demo = [], [], []
  for _ in range(args.rounds):
    a, b = detector_times(workdir, images[0])
    loaded.append(a)
    detected.append(b)
    demo.append(demo_to_first_image(workdir, images_dir,
                                    os.path.join(scratch, 'demo')))
  eager, jit = min(times['eager']), min(times['jit'])
  print('| from a fresh process to | eager build, s | create_model, s | '
        'ratio |')
  print('|---|---|---|---|')
  print(f'| train.py ({DEMO_CONFIG}): first iteration logged | {eager:.1f} | '
        f'{jit:.1f} | {eager / jit:.2f}x |')
  print(f'| Detector.from_workdir returned | (same code) | {min(loaded):.1f} '
        '| |')
  print(f'| ... and its first detection | (same code) | {min(detected):.1f} '
        '| |')
  print(f'| demo.py: first image written | (same code) | {min(demo):.1f} | |')
  print(f'best of {args.rounds}; load average at the end '
        f'{os.getloadavg()[0]:.2f}')
  shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
