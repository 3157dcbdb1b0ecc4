"""Model creation: the one-compile `create_model` vs the eager build it
replaced (every initialiser run op by op), side by side.

  PYTHONPATH=. python bench/model_creation.py [--rounds=2]

Each measurement is a fresh process with the persistent compilation cache
off (what a first train.py, eval.py or Detector start pays): seconds from
the call to the initialised arrays, and the XLA compilations counted with
JAX's backend-compile events.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = '''
import json, sys, time
import jax
from jax import monitoring
jax.config.update("jax_enable_compilation_cache", False)
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event)
    if "backend_compile" in event else None)
from flax import nnx
import importlib
from ssd_jax import models
from ssd_jax.models import ssd
config = importlib.import_module("configs." + sys.argv[1]).get_config()
jax.numpy.zeros(()).block_until_ready()
compiles.clear()
start = time.perf_counter()
if sys.argv[2] == "eager":
  with jax.threefry_partitionable(False):
    model = ssd.SSD(config, rngs=nnx.Rngs(config.seed))
else:
  model = models.create_model(config)
jax.block_until_ready(nnx.state(model))
print(json.dumps({"seconds": time.perf_counter() - start,
                  "compiles": len(compiles)}))
'''


def measure(config, how):
  out = subprocess.run([sys.executable, '-c', _CHILD, config, how], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--configs', default='ssd300_voc,mobilenet_v2_ssd320_voc')
  args = parser.parse_args()
  print(f'{platform.node()}, {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.2f}')
  print('| config | eager build: s, compilations | create_model: s, '
        'compilations | ratio |')
  print('|---|---|---|---|')
  for config in args.configs.split(','):
    eager, jitted = [], []
    for _ in range(args.rounds):  # alternating, so both see the same machine
      eager.append(measure(config, 'eager'))
      jitted.append(measure(config, 'jit'))
    e = min(r['seconds'] for r in eager)
    j = min(r['seconds'] for r in jitted)
    print(f'| {config} | {e:.2f}, {eager[0]["compiles"]} | {j:.2f}, '
          f'{jitted[0]["compiles"]} | {e / j:.1f}x |')
  print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
