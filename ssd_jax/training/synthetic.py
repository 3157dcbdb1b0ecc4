"""Synthetic train batches (numpy) for tests and benchmarks."""

import numpy as np


def synthetic_batch(config, batch_size, seed=0, max_objects=6):
  """Random images with 1..max_objects random boxes each.

  Returns the train batch layout: 'image' uint8 [B,S,S,3] RGB pixel values
  (uniform 0..255, not mean-subtracted), 'boxes' float32
  [B,M,4] corner form in [0,1], 'labels' int32 [B,M], 'mask' bool [B,M], with
  S = input.image_size and M = data.max_boxes.
  """
  rng = np.random.RandomState(seed)
  size, max_boxes = config.input.image_size, config.data.max_boxes
  boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  labels = np.zeros((batch_size, max_boxes), np.int32)
  mask = np.zeros((batch_size, max_boxes), bool)
  for i in range(batch_size):
    n = rng.randint(1, min(max_objects, max_boxes) + 1)
    wh = rng.uniform(0.1, 0.6, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (1 - wh)
    boxes[i, :n] = np.concatenate([xy, xy + wh], axis=1)
    labels[i, :n] = rng.randint(1, config.model.num_classes, n)
    mask[i, :n] = True
  image = rng.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8)
  return {'image': image, 'boxes': boxes, 'labels': labels, 'mask': mask}
