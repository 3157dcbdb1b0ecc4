"""Throughput of the compiled JAX train step on synthetic batches.

    python bench/train_step.py --config=configs/ssd300_voc.py --batch_size=8 \
        --steps=20 [--config.model.dtype=bfloat16]

Synthetic batches (ssd_jax.training.synthetic): random mean-subtracted images and 1-6
ground-truth boxes per image (VOC07+12 trainval averages about 2.4
non-difficult objects per image), padded to data.max_boxes. Matching, loss, backward and the SGD update
all run inside the timed step, as in training. Imports no TensorFlow.
The last line printed is one JSON object.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from ssd_jax import models
from ssd_jax.runtime import sharding
from ssd_jax.training import optim
from ssd_jax.training import synthetic
from ssd_jax.training import train_step as train_step_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/ssd300_voc.py',
                                'Model config.', lock_config=True)
flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
flags.DEFINE_integer('steps', 20, 'Timed steps (after 2 warm-up steps).')
flags.DEFINE_integer('repeats', 1, 'Timed rounds; the best is reported.')


def peak_memory_mib():
  stats = jax.local_devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return round(stats['peak_bytes_in_use'] / 2**20)


class JaxStep:
  """A compiled train step and its state, timed a few steps at a time."""

  def __init__(self, config, batch_size):
    config.solver.batch_size = batch_size
    config.model.backbone.pretrained = ''
    self.mesh = sharding.create_mesh()
    model = models.create_model(config)
    tx = optim.create_optimizer(config)
    model_def, self.state = train_step_lib.create_train_state(model, tx, self.mesh)
    self.step = train_step_lib.make_train_step(config, model_def, tx, self.mesh)
    self.batch = sharding.global_batch(synthetic.synthetic_batch(config, batch_size),
                                        self.mesh)
    start = time.perf_counter()
    self.run(1)
    self.compile_seconds = time.perf_counter() - start
    self.run(1)

  def run(self, steps):
    """Runs `steps` steps; returns seconds (synchronised at the end)."""
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    loss = float(metrics['total_loss'])
    elapsed = time.perf_counter() - start
    if not np.isfinite(loss):
      raise FloatingPointError(f'non-finite loss {loss}')
    return elapsed


def main(argv):
  del argv
  config = FLAGS.config
  bench = JaxStep(config, FLAGS.batch_size)
  best = min(bench.run(FLAGS.steps) for _ in range(FLAGS.repeats))
  result = {
      'framework': 'jax',
      'images_per_sec': FLAGS.batch_size * FLAGS.steps / best,
      'step_ms': 1000 * best / FLAGS.steps,
      'batch_size': FLAGS.batch_size,
      'dtype': config.model.dtype,
      'image_size': config.input.image_size,
      'steps': FLAGS.steps,
      'compile_s': bench.compile_seconds,
      'peak_memory_mib': peak_memory_mib(),
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
