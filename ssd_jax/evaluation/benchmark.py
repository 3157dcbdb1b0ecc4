"""eval.py --benchmark: the evaluation path timed on synthetic images.

Forward pass, post-processing (on the host, or on the device with
`test.nms_on_device`) and the VOC AP over `num_images` random images of the
config's input size, with the evaluator's own functions
(`evaluate.evaluate_dataset`, `predict.make_predict_step` on a mesh of every
device). The model has the config's initialisation plus `background_bias` on
the class-0 outputs of the classification heads, so that, as for a trained
model, most priors are confidently background and the candidate count above
the threshold stays in the hundreds, not every prior. No dataset,
TensorFlow or checkpoint is needed.
"""

import time

import jax
import numpy as np
from flax import nnx

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.evaluation import evaluate
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib

# Ground-truth boxes per synthetic image.
_MAX_BOXES = 4


def benchmark_model(config, background_bias, seed=0):
  """The config's model, with `background_bias` added to the class-0 bias of
  every classification-head output."""
  model = models.create_model(config, nnx.Rngs(seed))
  num_classes = int(config.model.num_classes)
  state = nnx.state(model, nnx.Param)
  pure = state.to_pure_dict()

  def shift(path, leaf):
    names = [str(getattr(k, 'key', getattr(k, 'idx', ''))) for k in path]
    if ('cls_headers' in names and names[-1] == 'bias'
        and leaf.shape[-1] % num_classes == 0):
      leaf = np.array(leaf)
      leaf[::num_classes] += background_bias
    return leaf

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(shift,
                                                                   pure))
  nnx.update(model, state)
  return model


def synthetic_eval_batches(config, num_images, batch_size, seed=0):
  """Eval batches of random uint8 images and random ground truth.

  The eval pipeline's layout (see `evaluate.evaluate_dataset`); the last
  batch is padded with invalid images. Images repeat (a pool of one batch),
  so that making them costs nothing next to the evaluation.
  """
  rng = np.random.default_rng(seed)
  size = int(config.input.image_size)
  images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  for first in range(0, num_images, batch_size):
    count = min(batch_size, num_images - first)
    corner = rng.uniform(0, 250, (batch_size, _MAX_BOXES, 2))
    boxes = np.concatenate(
        [corner, corner + rng.uniform(20, 240, (batch_size, _MAX_BOXES, 2))],
        axis=-1).astype(np.float32)
    yield {
        'image': images,
        'image_id': np.array([f'{first + i:06d}' for i in range(batch_size)]),
        'orig_size': np.tile(np.array([[375, 500]], np.int32),
                             (batch_size, 1)),
        'boxes': boxes,
        'labels': rng.integers(1, config.model.num_classes,
                               (batch_size, _MAX_BOXES)).astype(np.int32),
        'difficult': np.zeros((batch_size, _MAX_BOXES), bool),
        'mask': np.ones((batch_size, _MAX_BOXES), bool),
        'valid': np.arange(batch_size) < count,
    }


def benchmark_evaluation(config, *, num_images, batch_size=None,
                         background_bias=8.0):
  """Times evaluate_dataset over synthetic images.

  Args:
    config: the experiment config (its model, `input`, `test`).
    num_images: images evaluated (4,952 is VOC07 test).
    batch_size: images per forward pass (default `test.batch_size`), rounded
      up to a multiple of the device count.
    background_bias: see `benchmark_model`.

  Returns:
    A dict of figures: 'seconds' (evaluate_dataset end to end, compiled),
    'images_per_sec', 'forward_images_per_sec' (the bare compiled step over
    the same batches), 'compile_seconds', 'nms' ('device' or 'host'),
    'batch_size', 'num_images', 'detections_per_image', 'map' (of random
    boxes: only a check that the AP ran), 'device'.
  """
  mesh = sharding.create_mesh()
  devices = jax.device_count()
  batch_size = int(batch_size or config.test.batch_size)
  batch_size = -(-batch_size // devices) * devices
  model = benchmark_model(config, background_bias)
  model_def, variables = variables_lib.model_variables(model)
  variables = sharding.replicate(variables, mesh)
  step = predict_lib.make_predict_step(config, model_def, mesh)

  def predict(images):
    return step(variables, sharding.global_batch(images, mesh))

  first = next(synthetic_eval_batches(config, batch_size, batch_size))
  start = time.perf_counter()
  jax.block_until_ready(predict(first['image']))
  compile_seconds = time.perf_counter() - start

  start = time.perf_counter()
  for batch in synthetic_eval_batches(config, num_images, batch_size):
    jax.block_until_ready(predict(batch['image']))
  forward_seconds = time.perf_counter() - start

  priors = priors_lib.generate_priors(config)
  start = time.perf_counter()
  result = evaluate.evaluate_dataset(
      predict, synthetic_eval_batches(config, num_images, batch_size), priors,
      config, config.data.class_names, progress=False)
  seconds = time.perf_counter() - start
  on_device = bool(config.test.get('nms_on_device', False))
  return {
      'seconds': seconds,
      'images_per_sec': num_images / seconds,
      'forward_images_per_sec': num_images / forward_seconds,
      'compile_seconds': compile_seconds,
      'nms': 'device' if on_device else 'host',
      'batch_size': batch_size,
      'num_images': result['num_images'],
      'detections_per_image': float(np.mean(
          [len(d['scores']) for d in result['detections']])),
      'map': float(result['map']),
      'device': jax.devices()[0].device_kind,
  }
