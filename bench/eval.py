"""Evaluation speed: host post-processing + VOC AP, and end-to-end evaluate().

Part 1 times what the host does for every VOC07-test image (4,952 by
default): `postprocess.detect` (softmax, threshold, decode, per-class NMS,
top 100, rescale) and the VOC AP of all detections (both metrics), on
synthetic network outputs shaped like a trained SSD300's:

* every prior is confidently background: background logit ~ N(mu, 1) with
  mu ~ U(8, 10) per image, class logits ~ N(0, 1.5). About 0.5% of the
  (prior, class) pairs then pass the 0.01 threshold by chance, as low-score
  clutter spread over all classes;
* 1 + Poisson(1.4) objects per image (VOC07 test has 2.4 on average), class
  uniform, box sides U(0.08, 0.9) of the image: priors with IoU >= 0.5 to an
  object get its class logit at bg + N(2, 1.5) (scores mostly 0.5-0.99) and
  a regression close to the object's encoding (noise 0.3); priors with IoU
  0.25-0.5 get bg + N(-2.5, 1.5) (scores ~0.01-0.3): the duplicate cluster
  NMS has to suppress.
This gives a few hundred to a few thousand candidates above 0.01 per image
(printed; median ~1,700) and images that fill the 100-detection cap, which is
what makes NMS and AP cost what they cost on real data. A trained model's
exact distribution differs; random weights (e.g. the recipe weights of the
tests) are far worse than reality (~100,000 candidates per image). The
outputs of `--pool` images are generated once (not timed) and cycled.

Part 2 runs `evaluate.evaluate_dataset` end to end with the SSD300 model (random
He-normal weights, the class-0 bias raised by `--background_bias` so that the
candidate count is in the same range) on `--e2e_images` random images, next to
the bare jitted forward pass over the same batches as the baseline.

  PYTHONPATH=. python bench/eval.py [--num_images=4952] [--e2e_images=20]
"""

import argparse
import datetime
import functools
import os
import platform
import time

import numpy as np

from configs import ssd300_voc
from ssd_jax.core import box_ops
from ssd_jax.core import priors as priors_lib
from ssd_jax.evaluation import evaluate
from ssd_jax.evaluation import postprocess
from ssd_jax.evaluation import voc_eval

VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (374, 500))


def background_outputs(rng, num_priors, num_classes):
  """Outputs of an image without objects: logits [P, C] with a dominant
  background class, regression [P, 4] noise, the background logits [P]."""
  logits = rng.standard_normal((num_priors, num_classes), np.float32) * 1.5
  background = (np.float32(rng.uniform(8, 10))
                + rng.standard_normal(num_priors, np.float32))
  logits[:, 0] = background
  regression = rng.standard_normal((num_priors, 4), np.float32) * 0.5
  return logits, regression, background


def plant_object(rng, outputs, priors, corners, box, label, config):
  """Makes `outputs` (from background_outputs, updated in place) detect
  `box` [x1, y1, x2, y2] (normalised) of class `label`: priors with IoU >=
  0.5 score it above background and regress near it, those with IoU 0.25-0.5
  score it below (candidates NMS and AP must deal with)."""
  logits, regression, background = outputs
  iou = box_ops.pairwise_iou(corners, box[None])[:, 0]
  strong = iou >= 0.5
  weak = (iou >= 0.25) & ~strong
  logits[strong, label] = background[strong] + rng.normal(
      2.0, 1.5, strong.sum()).astype(np.float32)
  logits[weak, label] = background[weak] + rng.normal(
      -2.5, 1.5, weak.sum()).astype(np.float32)
  target = box_ops.encode(
      np.broadcast_to(box_ops.corner_to_center(box), (strong.sum(), 4)),
      priors[strong], config.model.center_variance,
      config.model.size_variance)
  regression[strong] = target + rng.normal(0, 0.3, target.shape).astype(
      np.float32)


def synthetic_image(rng, priors, config):
  """Trained-model-like outputs and ground truth of one image (see above)."""
  num_classes = config.model.num_classes
  corners = box_ops.center_to_corner(priors)
  outputs = background_outputs(rng, len(priors), num_classes)
  height, width = VOC_SIZES[rng.integers(len(VOC_SIZES))]
  boxes, labels = [], []
  for _ in range(1 + rng.poisson(1.4)):
    label = int(rng.integers(1, num_classes))
    w, h = rng.uniform(0.08, 0.9, 2)
    cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                   np.float32)
    plant_object(rng, outputs, priors, corners, box, label, config)
    boxes.append(np.round(box * [width, height, width, height]))
    labels.append(label)
  gt = {'boxes': np.asarray(boxes, np.float32),
        'labels': np.asarray(labels, np.int64),
        'difficult': rng.uniform(size=len(labels)) < 0.1}
  return outputs[0], outputs[1], (height, width), gt


def make_pool(config, priors, pool_size):
  rng = np.random.default_rng(0)
  return [synthetic_image(rng, priors, config) for _ in range(pool_size)]


def bench_host(config, priors, pool, num_images, batch_size, num_threads):
  """Seconds for detect() and for the AP over `num_images` images."""
  pool_size = len(pool)
  logits = np.stack([p[0] for p in pool])
  regression = np.stack([p[1] for p in pool])
  sizes = np.array([p[2] for p in pool])
  if pool_size % batch_size:
    raise ValueError('--pool must be a multiple of --batch_size')
  threshold = config.test.confidence_threshold
  candidates = [int((postprocess.softmax(l)[:, 1:] > threshold).sum())
                for l in logits[:64]]
  detections = []
  start, cpu_start = time.perf_counter(), time.process_time()
  for first in range(0, num_images, batch_size):
    # Contiguous views of the pool: no copy, like a fresh device->host array.
    batch = slice(first % pool_size,
                  first % pool_size + min(batch_size, num_images - first))
    detections += postprocess.detect(logits[batch], regression[batch], priors,
                                     sizes[batch], config,
                                     num_threads=num_threads)
  t_detect = time.perf_counter() - start
  cpu_detect = time.process_time() - cpu_start
  ids = np.arange(num_images) % pool_size
  gts = [pool[i][3] for i in ids]
  start, cpu_start = time.perf_counter(), time.process_time()
  prec, rec = voc_eval.precision_recall(
      [d['boxes'] for d in detections], [d['labels'] for d in detections],
      [d['scores'] for d in detections], [g['boxes'] for g in gts],
      [g['labels'] for g in gts], [g['difficult'] for g in gts])
  ap07 = voc_eval.average_precision(prec, rec, use_07_metric=True)
  voc_eval.average_precision(prec, rec, use_07_metric=False)
  t_ap = time.perf_counter() - start
  cpu_ap = time.process_time() - cpu_start
  return {'detect_s': t_detect, 'ap_s': t_ap,
          'cpu_s': cpu_detect + cpu_ap,
          'candidates_p10_50_90': np.percentile(candidates, [10, 50, 90]),
          'dets_per_image': np.mean([len(d['scores']) for d in detections]),
          'map': voc_eval.mean_ap(ap07)}


def random_model(config, background_bias, seed=0):
  """SSD300 with He-normal weights drawn by numpy (much faster than the
  model's own initialisers), the first conv scaled by 0.02 as the tests'
  recipe weights (keeps logits O(10)), and `background_bias` on the class-0
  outputs of the classification heads, to get a trained-model-like number of
  candidates above the threshold."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: models.create_model(config)))
  num_classes = config.model.num_classes

  def init(path, leaf):
    names = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    if names[-1] == 'kernel':
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      if names[:3] == ['backbone', 'vgg', 0]:
        std *= 0.02
      return rng.normal(0, std, leaf.shape).astype(np.float32)
    if names[-1] == 'weight':  # L2Norm scale
      return np.full(leaf.shape, 20, np.float32)
    bias = np.zeros(leaf.shape, np.float32)
    if 'cls_headers' in names:
      bias[::num_classes] = background_bias
    return bias

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      init, state.to_pure_dict()))
  return graphdef, state


def bench_end_to_end(config, priors, num_images, batch_size, background_bias):
  """Images/s of evaluate() and of the bare forward over the same batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = random_model(config, background_bias)

  @jax.jit
  def predict(state, images):
    return nnx.merge(graphdef, state)(images)

  predict_fn = functools.partial(predict, state)
  size = config.input.image_size
  rng = np.random.default_rng(1)
  max_boxes = 4
  images = rng.uniform(-120, 130, (batch_size, size, size, 3)).astype(
      np.float32)

  def batches():
    for first in range(0, num_images, batch_size):
      b = min(batch_size, num_images - first)
      yield {
          'image': images,
          'image_id': np.array([f'{first + i:06d}' for i in range(batch_size)]),
          'orig_size': np.tile(np.array([[375, 500]], np.int32),
                               (batch_size, 1)),
          'boxes': np.tile(np.array([[10, 20, 200, 300]], np.float32),
                           (batch_size, max_boxes, 1)),
          'labels': np.full((batch_size, max_boxes), 15, np.int32),
          'difficult': np.zeros((batch_size, max_boxes), bool),
          'mask': np.tile(np.arange(max_boxes) < 2, (batch_size, 1)),
          'valid': np.arange(batch_size) < b,
      }

  cls_logits, _ = jax.block_until_ready(predict_fn(images))  # compile
  candidates = (postprocess.softmax(np.asarray(cls_logits))[..., 1:]
                > config.test.confidence_threshold).sum(axis=(1, 2))
  start = time.perf_counter()
  for batch in batches():
    jax.block_until_ready(predict_fn(batch['image']))
  t_forward = time.perf_counter() - start
  start = time.perf_counter()
  result = evaluate.evaluate_dataset(predict_fn, batches(), priors, config,
                             config.data.class_names, progress=False)
  t_eval = time.perf_counter() - start
  assert result['num_images'] == num_images
  return {'forward_img_s': num_images / t_forward,
          'evaluate_img_s': num_images / t_eval,
          'candidates': int(np.median(candidates)),
          'device': str(jax.devices()[0].platform)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=4952)
  parser.add_argument('--pool', type=int, default=256,
                      help='distinct synthetic images, cycled')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--e2e_images', type=int, default=20,
                      help='images for the end-to-end run (0 = skip)')
  parser.add_argument('--e2e_batch_size', type=int, default=10)
  parser.add_argument('--background_bias', type=float, default=13.0,
                      help='class-0 logit offset of the end-to-end model')
  args = parser.parse_args()
  config = ssd300_voc.get_config()
  priors = priors_lib.generate_priors(config)
  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, '
        f'{len(os.sched_getaffinity(0))} CPUs, load average '
        f'{os.getloadavg()[0]:.2f}')
  pool = make_pool(config, priors, args.pool)
  for threads in (None, 1):
    r = bench_host(config, priors, pool, args.num_images, args.batch_size,
                   threads)
    total = r['detect_s'] + r['ap_s']
    print(f'host, {"default threads" if threads is None else "1 thread"}: '
          f'{args.num_images} images, candidates > 0.01 per image p10/50/90 '
          f'{r["candidates_p10_50_90"].astype(int).tolist()}, '
          f'{r["dets_per_image"]:.1f} detections per image: '
          f'detect {r["detect_s"]:.2f} s + AP (both metrics) {r["ap_s"]:.2f} s '
          f'= {total:.2f} s ({args.num_images / total:.0f} images/s; '
          f'process CPU time {r["cpu_s"]:.2f} s)')
  if args.e2e_images:
    r = bench_end_to_end(config, priors, args.e2e_images, args.e2e_batch_size,
                         args.background_bias)
    print(f'end to end on {r["device"]}, SSD300 random weights (median '
          f'{r["candidates"]} candidates > 0.01 per image), batch '
          f'{args.e2e_batch_size}, {args.e2e_images} images: forward only '
          f'{r["forward_img_s"]:.2f} images/s, evaluate() '
          f'{r["evaluate_img_s"]:.2f} images/s')
  print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
