"""SSD prior (default/anchor) boxes, computed once on the host with numpy."""

import itertools
import math

import numpy as np


def generate_priors(config):
  """Prior boxes of the reference's PriorBox for `config`.

  Order: feature map by feature map (largest first), rows (y) outer, columns
  (x) inner, then the boxes of one location: [min, sqrt(min*max), then per
  aspect ratio a: (a wide, a tall)]. Centres use image_size / stride as the
  scale (not the feature-map size), as the reference does.

  Args:
    config: the experiment config (uses `input.image_size`, `model.priors`).

  Returns:
    float32 [P, 4] center form (cx, cy, w, h), normalised to [0, 1]; clipped
    to [0, 1] in center form when `model.priors.clip`.
  """
  image_size = config.input.image_size
  p = config.model.priors
  boxes = []
  for k, fmap in enumerate(p.feature_maps):
    scale = image_size / p.strides[k]
    small = p.min_sizes[k] / image_size
    big = math.sqrt(p.min_sizes[k] * p.max_sizes[k]) / image_size
    for i, j in itertools.product(range(fmap), repeat=2):
      cx = (j + 0.5) / scale
      cy = (i + 0.5) / scale
      boxes.append((cx, cy, small, small))
      boxes.append((cx, cy, big, big))
      for ratio in p.aspect_ratios[k]:
        r = math.sqrt(ratio)
        boxes.append((cx, cy, small * r, small / r))
        boxes.append((cx, cy, small / r, small * r))
  priors = np.asarray(boxes, dtype=np.float64)
  if p.clip:
    priors = np.clip(priors, 0.0, 1.0)
  return priors.astype(np.float32)


def num_priors(config):
  """Number of priors P, without building them."""
  p = config.model.priors
  return sum(f * f * (2 + 2 * len(r))
             for f, r in zip(p.feature_maps, p.aspect_ratios))
