"""Throughput of the compiled eval forward (predict step) on random images.

    python bench/predict_step.py --config=configs/ssd300_voc.py --batch_size=64 \
        --steps=20 [--config.model.dtype=bfloat16]

Times the device forward only (raw head outputs, no host post-processing;
bench/eval.py measures that). Imports no TensorFlow. The last line printed is
one JSON object.
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
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/ssd300_voc.py',
                                'Model config.', lock_config=True)
flags.DEFINE_integer('batch_size', 64, 'Images per forward.')
flags.DEFINE_integer('steps', 20, 'Timed forwards (after 2 warm-up ones).')


def main(argv):
  del argv
  config = FLAGS.config
  config.model.backbone.pretrained = ''
  mesh = sharding.create_mesh()
  model = models.create_model(config)
  model_def, params, model_state = variables_lib.split_model(model)
  state = jax.device_put(
      variables_lib.ModelVariables(params=params, model_state=model_state),
      sharding.replicated_sharding(mesh))
  predict = predict_lib.make_predict_step(config, model_def)
  size = config.input.image_size
  images = sharding.global_batch(
      np.random.RandomState(0).randint(
          0, 256, (FLAGS.batch_size, size, size, 3)).astype(np.uint8), mesh)
  start = time.perf_counter()
  jax.block_until_ready(predict(state, images))
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(predict(state, images))
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    out = predict(state, images)
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  print(json.dumps({
      'framework': 'jax', 'what': 'predict_step',
      'images_per_sec': FLAGS.batch_size * FLAGS.steps / elapsed,
      'step_ms': 1000 * elapsed / FLAGS.steps,
      'batch_size': FLAGS.batch_size, 'dtype': config.model.dtype,
      'compile_s': compile_seconds,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
  }))


if __name__ == '__main__':
  app.run(main)
