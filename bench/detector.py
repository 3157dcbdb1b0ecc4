"""Detector throughput: image files -> boxes, against a per-image loop.

Three ways through the same SSD300 (random weights with a raised background
bias, as bench/eval.py's end-to-end part, so that a trained-model-like number
of candidates reaches NMS) on `--num_images` JPEG files (the voc_tiny
fixtures, 240-500 px, cycled):

* Detector: `inference.Detector(batch_size=B)(paths)`: decode + resize on a
  thread pool, batches of B cross to the device as uint8, post-processing of
  batch k while the device computes batch k + 1;
* per-image loop (baseline): what one writes without the Detector: for each
  file, PIL decode, the same resize, the compiled eval predict step on a
  batch of 1 (uint8 pixels; it subtracts the mean), `postprocess.detect`;
* forward only: the bare compiled forward at batch B on ready inputs (the
  ceiling).
Compilation is excluded from every figure (one warm-up call each).

  PYTHONPATH=. python bench/detector.py [--num_images=24] [--batch_size=8]
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np

from bench import eval as eval_bench
from configs import ssd300_voc
from ssd_jax.core import priors as priors_lib
from ssd_jax.deploy import inference
from ssd_jax.evaluation import postprocess
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib

JPEGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'tests', 'fixtures', 'voc_tiny', 'VOC2007', 'JPEGImages')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=24)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--background_bias', type=float, default=13.0)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, '
        f'{os.cpu_count()} CPUs, {jax.devices()[0].platform}, load average '
        f'{os.getloadavg()[0]:.2f}')
  config = ssd300_voc.get_config()
  graphdef, state = eval_bench.random_model(config, args.background_bias)
  model = nnx.merge(graphdef, state)
  files = sorted(os.path.join(JPEGS, name) for name in os.listdir(JPEGS))
  paths = [files[i % len(files)] for i in range(args.num_images)]
  size = config.input.image_size

  # Detector.
  detector = inference.Detector(model, config, batch_size=args.batch_size)
  detector(paths[:args.batch_size])  # compile
  start = time.perf_counter()
  results = detector(paths)
  t_detector = time.perf_counter() - start
  candidates = np.mean([len(r['scores']) for r in results])

  # Per-image loop.
  model_def, params, model_state = variables_lib.split_model(model)
  train_state = variables_lib.ModelVariables(params=params, model_state=model_state)
  predict_step = predict_lib.make_predict_step(config, model_def)
  priors = priors_lib.generate_priors(config)

  def one_image(path):
    image = inference.load_image(path)
    pixels = inference.resize_for_model(image, size)[None]  # uint8
    cls_logits, bbox_pred = predict_step(train_state, pixels)
    return postprocess.detect(cls_logits, bbox_pred, priors,
                              [image.shape[:2]], config)[0]

  one_image(paths[0])  # compile
  start = time.perf_counter()
  loop_results = [one_image(path) for path in paths]
  t_loop = time.perf_counter() - start
  for ours, theirs in zip(results, loop_results):
    assert len(ours['scores']) == len(theirs['scores'])

  # Forward only.
  batch = np.zeros((args.batch_size, size, size, 3), np.float32)
  jax.block_until_ready(predict_step(train_state, batch))
  batches = -(-args.num_images // args.batch_size)
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(predict_step(train_state, batch))
  t_forward = time.perf_counter() - start

  n = args.num_images
  print(f'SSD300, {n} JPEG files, {candidates:.0f} detections per image at '
        f'score > 0.01 (the cap is {config.test.max_per_image})')
  print(f'Detector, batch {args.batch_size}: {n / t_detector:.2f} images/s '
        f'({t_detector / n * 1000:.0f} ms per image)')
  print(f'per-image loop (baseline), batch 1: {n / t_loop:.2f} images/s '
        f'({t_loop / n * 1000:.0f} ms per image)')
  print(f'forward only, batch {args.batch_size}: '
        f'{batches * args.batch_size / t_forward:.2f} images/s')
  print(f'Detector / per-image loop: {t_loop / t_detector:.2f}x; load average '
        f'at the end {os.getloadavg()[0]:.2f}')
  detector.close()


if __name__ == '__main__':
  main()
