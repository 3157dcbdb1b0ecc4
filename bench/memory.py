"""Host memory over a long tiny training run: does the loop leak?

  PYTHONPATH=. python bench/memory.py [--steps=5000] [--eval_every=500]

Trains the tests' tiny shapes config through `trainer.train_and_evaluate`
(the real loop: prefetching, logging, checkpoints every `--save_every`,
evaluation every `--eval_every`) and samples the process's resident set
size (RSS) and, where the backend reports it, the device's bytes in use at
every log step. Prints the slope of a least-squares line through the
samples after the warm-up, in MiB per 1,000 steps, and writes the samples
as JSON. On CPU the device memory is the host's, so RSS is the figure.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib():
  """Resident set size of this process, from /proc (Linux)."""
  with open('/proc/self/statm') as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf('SC_PAGE_SIZE') / 2**20


def device_mib():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  value = stats.get('bytes_in_use')
  return None if value is None else value / 2**20


def slope_per_1000(samples, warmup):
  """MiB per 1,000 steps of a least-squares line through (step, MiB)."""
  points = [(s, m) for s, m in samples if s > warmup and m is not None]
  if len(points) < 2:
    return None
  steps, mib = np.asarray(points, np.float64).T
  return float(np.polyfit(steps, mib, 1)[0] * 1000)


def measure(steps, eval_every, save_every, log_every, workdir, warmup):
  """Runs the loop; returns {'rss': [(step, MiB)], 'device': [...], ...}."""
  from ssd_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_shapes_config(os.path.join(workdir, 'shapes'))
  config.solver.max_iter = steps
  config.solver.lr_steps = (steps + 1,)
  config.log_step = log_every
  config.save_step = save_every
  config.eval_step = eval_every
  config.keep_checkpoints = 2
  rss, device = [], []
  read = trainer.Progress.read

  def sampled_read(self, step, log=True):
    read(self, step, log)
    rss.append((step, rss_mib()))
    device.append((step, device_mib()))

  trainer.Progress.read = sampled_read
  start = time.perf_counter()
  try:
    trainer.train_and_evaluate(config, os.path.join(workdir, 'run'))
  finally:
    trainer.Progress.read = read
  return {'steps': steps, 'eval_every': eval_every, 'warmup': warmup,
          'seconds': time.perf_counter() - start, 'rss': rss,
          'device': device,
          'rss_slope_mib_per_1000': slope_per_1000(rss, warmup),
          'device_slope_mib_per_1000': slope_per_1000(device, warmup)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5000)
  parser.add_argument('--eval_every', type=int, default=500)
  parser.add_argument('--save_every', type=int, default=1000)
  parser.add_argument('--log_every', type=int, default=50)
  parser.add_argument('--warmup', type=int, default=500)
  parser.add_argument('--out', default='memory.json')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    result = measure(args.steps, args.eval_every, args.save_every,
                     args.log_every, workdir, args.warmup)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  first = next(m for s, m in result['rss'] if s > args.warmup)
  print(f'{args.steps} steps in {result["seconds"]:.0f} s; RSS after the '
        f'warm-up {first:.0f} MiB -> {result["rss"][-1][1]:.0f} MiB, slope '
        f'{result["rss_slope_mib_per_1000"]:.2f} MiB / 1,000 steps; device '
        f'slope {result["device_slope_mib_per_1000"]}; wrote {args.out}')


if __name__ == '__main__':
  main()
