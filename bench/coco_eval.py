"""COCO evaluation speed: post-processing + COCOeval over 5,000 images.

Times what the host does to evaluate COCO val2017 (5,000 images) once the
network outputs are there: `postprocess.detect` (softmax, threshold, decode,
per-class NMS, top 100, rescale) and `coco_eval.coco_metrics` (the results list,
the ground-truth dataset, COCOeval evaluate + accumulate + summarize), with
both COCO APIs on the same detections: faster-coco-eval (what coco_eval
uses) and pycocotools (the reference's).

Synthetic data shaped like COCO and a trained SSD300 (81 classes, 8,732
priors):
* ground truth: 1 + Poisson(6.3) objects per image (val2017 has 7.3), the
  80 COCO category ids, box sides log-uniform over 8..600 px in 640x480-ish
  images (small, medium and large objects), 1% crowd, segment area 0.7 of
  the box;
* outputs as in bench/eval.py: every prior confidently background
  (logit ~ N(U(8, 10), 1)), class logits N(0, 1.5) (low-score clutter),
  priors with IoU >= 0.5 to an object get its class at bg + N(2, 1.5) and a
  regression near its encoding, priors with IoU 0.25-0.5 bg + N(-2.5, 1.5).
The outputs of `--pool` images are generated once (not timed) and cycled;
each of the 5,000 images has its own id and its pool image's ground truth.

  PYTHONPATH=. python bench/coco_eval.py [--num_images=5000] [--apis=both]
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np

from bench import eval as eval_bench
from configs import ssd300_coco
from ssd_jax.core import box_ops
from ssd_jax.core import priors as priors_lib
from ssd_jax.evaluation import coco_eval
from ssd_jax.evaluation import postprocess

CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)
SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (375, 500))


class Annotations:
  """The fields of data.coco.CocoAnnotations, without importing TF."""

  def __init__(self, rows):
    rows = np.asarray(rows, np.float64).reshape(-1, 9)
    self.ids = rows[:, 0].astype(np.int64)
    self.image_ids = rows[:, 1].astype(np.int64)
    self.category_ids = rows[:, 2].astype(np.int64)
    self.bboxes = rows[:, 3:7]
    self.areas = rows[:, 7]
    self.iscrowd = rows[:, 8].astype(bool)


class Info:
  """The fields of data.coco.CocoInfo."""

  def __init__(self, annotations):
    self.category_ids = np.array((0,) + CATEGORY_IDS, np.int64)
    self.class_names = ('__background__',) + tuple(
        f'category{c}' for c in CATEGORY_IDS)
    self.annotations = annotations


def synthetic_image(rng, priors, config):
  """(logits [P, 81], regression [P, 4], (h, w), gt rows without ids)."""
  num_classes = config.model.num_classes
  corners = box_ops.center_to_corner(priors)
  outputs = eval_bench.background_outputs(rng, len(priors), num_classes)
  height, width = SIZES[rng.integers(len(SIZES))]
  gt = []
  for _ in range(1 + rng.poisson(6.3)):
    label = int(rng.integers(1, num_classes))
    w = min(np.exp(rng.uniform(np.log(8), np.log(600))), width - 1)
    h = min(np.exp(rng.uniform(np.log(8), np.log(600))), height - 1)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = np.array([x / width, y / height, (x + w) / width,
                    (y + h) / height], np.float32)
    eval_bench.plant_object(rng, outputs, priors, corners, box, label, config)
    gt.append((CATEGORY_IDS[label - 1], x, y, w, h, 0.7 * w * h,
               rng.uniform() < 0.01))
  return outputs[0], outputs[1], (height, width), gt


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=5000)
  parser.add_argument('--pool', type=int, default=100,
                      help='distinct synthetic images, cycled')
  parser.add_argument('--batch_size', type=int, default=20)
  parser.add_argument('--apis', default='both',
                      choices=('both', 'faster_coco_eval', 'pycocotools'))
  args = parser.parse_args()
  if args.pool % args.batch_size:
    raise ValueError('--pool must be a multiple of --batch_size')
  config = ssd300_coco.get_config()
  priors = priors_lib.generate_priors(config)
  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, '
        f'{len(os.sched_getaffinity(0))} CPUs, load average '
        f'{os.getloadavg()[0]:.2f}')
  rng = np.random.default_rng(0)
  pool = [synthetic_image(rng, priors, config) for _ in range(args.pool)]
  logits = np.stack([p[0] for p in pool])
  regression = np.stack([p[1] for p in pool])
  sizes = np.array([p[2] for p in pool])
  rows = []
  for i in range(args.num_images):
    for cat, x, y, w, h, area, crowd in pool[i % args.pool][3]:
      rows.append((len(rows) + 1, 1 + 3 * i, cat, x, y, w, h, area, crowd))
  info = Info(Annotations(rows))

  start, cpu_start = time.perf_counter(), time.process_time()
  detections = []
  for first in range(0, args.num_images, args.batch_size):
    batch = slice(first % args.pool, first % args.pool +
                  min(args.batch_size, args.num_images - first))
    detections += postprocess.detect(logits[batch], regression[batch],
                                     priors, sizes[batch], config)
  for i, det in enumerate(detections):
    det['image_id'] = str(1 + 3 * i)
  t_detect = time.perf_counter() - start
  cpu_detect = time.process_time() - cpu_start
  num_dets = sum(len(d['scores']) for d in detections)
  print(f'{args.num_images} images, {len(rows)} ground-truth boxes, '
        f'{num_dets} detections ({num_dets / args.num_images:.1f} per image); '
        f'postprocess.detect {t_detect:.2f} s (CPU {cpu_detect:.2f} s)')

  start, cpu_start = time.perf_counter(), time.process_time()
  results = coco_eval.results_list(detections, info.category_ids)
  gt = coco_eval.ground_truth_dataset(
      info.annotations, [d['image_id'] for d in detections],
      info.class_names, info.category_ids)
  t_lists = time.perf_counter() - start
  cpu_lists = time.process_time() - cpu_start
  print(f'results list + ground-truth dataset {t_lists:.2f} s (CPU '
        f'{cpu_lists:.2f} s)')
  apis = (('faster_coco_eval', 'pycocotools') if args.apis == 'both' else
          (args.apis,))
  stats = {}
  for api in apis:
    start, cpu_start = time.perf_counter(), time.process_time()
    stats[api], _ = coco_eval.coco_eval(gt, [dict(r) for r in results], api)
    t_eval = time.perf_counter() - start
    cpu_eval = time.process_time() - cpu_start
    print(f'{api}: COCOeval {t_eval:.2f} s (CPU {cpu_eval:.2f} s); detect + '
          f'lists + COCOeval = {t_detect + t_lists + t_eval:.2f} s (CPU '
          f'{cpu_detect + cpu_lists + cpu_eval:.2f} s); AP {stats[api][0]:.4f} '
          f'AP50 {stats[api][1]:.4f} APs {stats[api][3]:.4f} '
          f'APl {stats[api][5]:.4f}')
  if len(stats) == 2:
    diff = np.abs(stats['faster_coco_eval'] - stats['pycocotools']).max()
    print(f'largest difference of the 12 stats between the APIs: {diff:.3g}')
  print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
