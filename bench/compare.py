"""JAX train step vs the PyTorch reference step, side by side in one process.

    python bench/compare.py --batch_sizes=4,8 --steps=3 --rounds=5

For each batch size both steps are built (same network, loss and SGD update;
JAX also matches priors on the device, PyTorch gets pre-encoded targets as
in the reference), then timed in alternating rounds so that both see the same
machine load. Reports the median seconds per step of each and the ratio
torch_time / jax_time (> 1 means JAX is faster). The last line printed is one
JSON object.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import torch

from bench.torch_step import TorchStep
from bench.train_step import JaxStep
from configs import ssd300_voc


def compare(batch_size, steps, rounds, dtype='float32'):
  config = ssd300_voc.get_config()
  config.model.dtype = dtype
  jax_step = JaxStep(config, batch_size)
  torch_step = TorchStep(batch_size)
  jax_times, torch_times = [], []
  for _ in range(rounds):
    jax_times.append(jax_step.run(steps) / steps)
    torch_times.append(torch_step.run(steps) / steps)
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  return {
      'batch_size': batch_size, 'dtype': dtype,
      'jax_step_s': jax_s, 'torch_step_s': torch_s,
      'jax_images_per_sec': batch_size / jax_s,
      'torch_images_per_sec': batch_size / torch_s,
      'ratio_torch_over_jax': torch_s / jax_s,
      'jax_rounds_s': jax_times, 'torch_rounds_s': torch_times,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_sizes', default='4,8')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  results = []
  for batch_size in (int(b) for b in args.batch_sizes.split(',')):
    result = compare(batch_size, args.steps, args.rounds, args.dtype)
    results.append(result)
    print(f"batch {batch_size}: jax {result['jax_step_s']:.3f} s/step "
          f"({result['jax_images_per_sec']:.2f} img/s), torch "
          f"{result['torch_step_s']:.3f} s/step "
          f"({result['torch_images_per_sec']:.2f} img/s), torch/jax time "
          f"ratio {result['ratio_torch_over_jax']:.2f}", flush=True)
  print(json.dumps({
      'device': f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores',
      'jax': jax.__version__, 'torch': torch.__version__,
      'torch_threads': torch.get_num_threads(), 'results': results}))


if __name__ == '__main__':
  main()
