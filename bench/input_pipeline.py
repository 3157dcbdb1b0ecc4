r"""Input pipeline throughput: images/s of the train and eval pipelines.

Writes (once) a VOC-format dataset of ~500 x 375 JPEGs (shapes on textured,
noisy backgrounds, ~85 KB each, about the size and decode cost of VOC
photos), then measures, in this process:

  * train: `create_train_iterator` at batch 32 (decode, the full SSD
    augmentation, batching), after a warm-up that also pays the one-off XLA
    compilations;
  * eval: `create_eval_iterator` (decode, resize, batching);
  * baseline: the reference's augmentation written with numpy + OpenCV as
    the reference does it (PIL decode, PhotometricDistort, Expand,
    RandomSampleCrop, RandomMirror, resize), one image at a time, one thread.
    (The reference also encodes targets on the host; that is not included.)

Images/s per core = images / CPU-seconds of this process (all threads), so
it does not depend on how many cores the machine lends; `--cores` pins the
process to that many cores first.

  python bench/input_pipeline.py [--data /tmp/ssd_bench_voc] [--cores 1]
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', default='/tmp/ssd_jax_bench_voc')
  parser.add_argument('--num-images', type=int, default=512)
  parser.add_argument('--cores', type=int, default=0,
                      help='pin to this many cores (0 = all)')
  parser.add_argument('--warmup-batches', type=int, default=40)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--baseline-images', type=int, default=300)
  parser.add_argument('--train-image-dtype', default=None,
                      choices=('float32', 'uint8'),
                      help="input.train_image_dtype (default: the config's)")
  return parser.parse_args()


def make_dataset(root, num_images):
  """~500 x 375 JPEGs with VOC XML; the noise makes them VOC-sized files."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  base = os.path.join(root, 'VOC2007')
  done = os.path.join(base, 'ImageSets', 'Main', 'test.txt')
  if os.path.exists(done):
    return
  for sub in ('JPEGImages', 'Annotations', os.path.join('ImageSets', 'Main')):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
  ids = []
  for i in range(num_images):
    image, objects = shapes.make_image(0, i, 500)
    rng = np.random.default_rng([1, i])
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255)
    image_id = f'{i:06d}'
    ids.append(image_id)
    Image.fromarray(image.astype(np.uint8)).save(
        os.path.join(base, 'JPEGImages', f'{image_id}.jpg'), quality=90)
    with open(os.path.join(base, 'Annotations', f'{image_id}.xml'), 'w') as f:
      f.write(shapes.annotation_xml(image_id, image.shape[1], image.shape[0],
                                    objects))
  for split in ('trainval', 'test'):  # test.txt last: marks the set complete
    with open(os.path.join(base, 'ImageSets', 'Main', f'{split}.txt'),
              'w') as f:
      f.write(''.join(f'{i}\n' for i in ids))


def measure(next_batch, num_batches, batch_size):
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next_batch()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = num_batches * batch_size
  return n / wall, n / cpu


def reference_augment(image, boxes, rng, size=300, mean=(123, 117, 104)):
  """The reference's train transform in numpy/OpenCV (for the baseline)."""
  import cv2  # pylint: disable=g-import-not-at-top
  image = image.astype(np.float32)
  if rng.integers(2):
    image += rng.uniform(-32, 32)
  contrast_first = rng.integers(2)
  if contrast_first and rng.integers(2):
    image *= rng.uniform(0.5, 1.5)
  image = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  if rng.integers(2):
    image[:, :, 1] *= rng.uniform(0.5, 1.5)
  if rng.integers(2):
    image[:, :, 0] += rng.uniform(-18, 18)
    image[:, :, 0][image[:, :, 0] > 360.0] -= 360.0
    image[:, :, 0][image[:, :, 0] < 0.0] += 360.0
  image = cv2.cvtColor(image, cv2.COLOR_HSV2RGB)
  if not contrast_first and rng.integers(2):
    image *= rng.uniform(0.5, 1.5)
  if rng.integers(2):
    image = image[:, :, rng.permutation(3)]
  if rng.integers(2):
    height, width, _ = image.shape
    ratio = rng.uniform(1, 4)
    left = int(rng.uniform(0, width * ratio - width))
    top = int(rng.uniform(0, height * ratio - height))
    canvas = np.empty((int(height * ratio), int(width * ratio), 3),
                      np.float32)
    canvas[:] = mean
    canvas[top:top + height, left:left + width] = image
    image = canvas
    boxes = boxes + (left, top, left, top)
  height, width, _ = image.shape
  for _ in range(16):  # mode draws
    mode = (None, 0.1, 0.3, 0.7, 0.9, -np.inf)[rng.integers(6)]
    if mode is None:
      break
    done = False
    for _ in range(50):
      w, h = rng.uniform(0.3 * width, width), rng.uniform(0.3 * height, height)
      if h / w < 0.5 or h / w > 2:
        continue
      left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
      rect = np.array([int(left), int(top), int(left + w), int(top + h)])
      inter = np.prod(np.clip(np.minimum(boxes[:, 2:], rect[2:]) -
                              np.maximum(boxes[:, :2], rect[:2]), 0, None), 1)
      union = (np.prod(boxes[:, 2:] - boxes[:, :2], 1) +
               np.prod(rect[2:] - rect[:2]) - inter)
      if (inter / union).max() < mode:
        continue
      centres = (boxes[:, :2] + boxes[:, 2:]) / 2
      keep = np.all((rect[:2] < centres) & (centres < rect[2:]), 1)
      if not keep.any():
        continue
      image = image[rect[1]:rect[3], rect[0]:rect[2]]
      boxes = boxes[keep].copy()
      boxes[:, :2] = np.maximum(boxes[:, :2], rect[:2]) - rect[:2]
      boxes[:, 2:] = np.minimum(boxes[:, 2:], rect[2:]) - rect[:2]
      done = True
      break
    if done:
      break
  if rng.integers(2):
    image = image[:, ::-1]
    boxes = boxes.copy()
    boxes[:, 0::2] = image.shape[1] - boxes[:, 2::-2]
  boxes = boxes / np.array(image.shape[1::-1] * 2, np.float32)
  image = cv2.resize(np.ascontiguousarray(image), (size, size))
  return image - np.array(mean, np.float32), boxes


def baseline(index, num_images):
  """Reference-style augmentation, one thread: images/s per CPU-second."""
  try:
    import cv2  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  cpu = time.process_time()
  for k in range(num_images):
    i = k % len(index)
    image = np.array(Image.open(index.paths[i]).convert('RGB'))
    boxes = index.objects(i)[0]
    reference_augment(image, boxes[:, :4].astype(np.float32), rng)
  return num_images / (time.process_time() - cpu)


def main():
  args = parse_args()
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top

  make_dataset(args.data, args.num_images)
  config = ssd300_voc.get_config()
  config.data.voc_root = args.data
  config.data.class_names = shapes.CLASS_NAMES
  config.data.train = ('voc_2007_trainval',)
  config.solver.batch_size = args.batch_size
  if args.train_image_dtype:
    config.input.train_image_dtype = args.train_image_dtype
  cores = len(os.sched_getaffinity(0))

  it = pipeline.create_train_iterator(config)
  warm = time.perf_counter()
  for _ in range(args.warmup_batches):
    next(it)
  warm = time.perf_counter() - warm
  train_wall, train_cpu = measure(lambda: next(it), args.batches,
                                  args.batch_size)

  eval_it = pipeline.create_eval_iterator(config, 'voc_2007_test',
                                          batch_size=args.batch_size)
  batches = iter(eval_it)
  next(batches)  # warm-up
  n = len(eval_it) - 1
  eval_wall, eval_cpu = measure(lambda: next(batches), n, args.batch_size)
  base = baseline(pipeline.load_index(config, 'voc_2007_trainval'),
                  args.baseline_images)

  try:
    with open('/proc/cpuinfo') as f:
      cpu_model = next(l for l in f if l.startswith('model name')).split(
          ':')[1].strip()
  except (OSError, StopIteration):
    cpu_model = platform.processor()
  sizes = [os.path.getsize(p) for p in
           pipeline.load_index(config, 'voc_2007_test').paths]
  print(f'date: {datetime.datetime.now().isoformat(timespec="minutes")}')
  print(f'machine: {cpu_model}, {cores} cores used, load average '
        f'{os.getloadavg()[0]:.2f}')
  print(f'data: {args.num_images} JPEGs ~500x375, mean '
        f'{np.mean(sizes) / 1024:.0f} KB')
  image_dtype = config.input.get('train_image_dtype', 'float32')
  print(f'train (batch {args.batch_size}, {image_dtype} images): '
        f'{train_wall:.1f} images/s, '
        f'{train_cpu:.1f} images/s per core (warm-up incl. XLA compiles '
        f'{warm:.0f} s)')
  print(f'eval  (batch {args.batch_size}): {eval_wall:.1f} images/s, '
        f'{eval_cpu:.1f} images/s per core')
  if base:
    print(f'baseline numpy/OpenCV reference augmentation (1 thread): '
          f'{base:.1f} images/s per core')


if __name__ == '__main__':
  main()
