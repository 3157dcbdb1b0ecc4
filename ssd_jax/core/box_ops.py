"""Box arithmetic shared by the device (jax.numpy) and the host (numpy).

Every function works on either array type: numpy in, numpy out; jax in (or a
tracer), jax out. Boxes live in the last axis, 4 numbers:

* corner form: (xmin, ymin, xmax, ymax)
* center form: (cx, cy, w, h)

Coordinates are whatever the caller uses (normalised [0,1] or pixels); the
functions never clip and never add the VOC "+1".
"""

import jax.numpy as jnp
import numpy as np

IOU_EPS = 1e-5  # the reference's eps inside the IoU denominator


def _xp(*arrays):
  """numpy if every argument is a numpy array or scalar, else jax.numpy."""
  if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays):
    return np
  return jnp


def corner_to_center(boxes):
  """[..., 4] (xmin, ymin, xmax, ymax) -> [..., 4] (cx, cy, w, h)."""
  xp = _xp(boxes)
  return xp.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2,
                         boxes[..., 2:] - boxes[..., :2]], axis=-1)


def center_to_corner(boxes):
  """[..., 4] (cx, cy, w, h) -> [..., 4] (xmin, ymin, xmax, ymax)."""
  xp = _xp(boxes)
  return xp.concatenate([boxes[..., :2] - boxes[..., 2:] / 2,
                         boxes[..., :2] + boxes[..., 2:] / 2], axis=-1)


def area(boxes):
  """[..., 4] corner form -> [...] area; inverted boxes count as 0."""
  xp = _xp(boxes)
  wh = xp.clip(boxes[..., 2:] - boxes[..., :2], 0, None)
  return wh[..., 0] * wh[..., 1]


def iou(boxes_a, boxes_b, eps=IOU_EPS):
  """IoU of the boxes of `boxes_a` and `boxes_b`, paired by broadcasting.

  The one IoU of matching (targets.py, eps=IOU_EPS) and NMS (postprocess.py,
  eps=0). VOC AP keeps its own (voc_eval.py: the "+1" pixel convention).

  Args:
    boxes_a: [..., 4] corner form.
    boxes_b: [..., 4] corner form, broadcast against boxes_a.
    eps: added to the union, as the reference's `iou_of` does (0 gives
      torchvision's nms arithmetic).

  Returns:
    [...] overlap / (area_a + area_b - overlap + eps), no "+1" pixel rule.
    Computed per coordinate: broadcasting [N, 1, 4] against [1, M, 4] makes
    [N, M] arrays, never [N, M, 4].
  """
  xp = _xp(boxes_a, boxes_b)
  w = xp.clip(xp.minimum(boxes_a[..., 2], boxes_b[..., 2]) -
              xp.maximum(boxes_a[..., 0], boxes_b[..., 0]), 0, None)
  h = xp.clip(xp.minimum(boxes_a[..., 3], boxes_b[..., 3]) -
              xp.maximum(boxes_a[..., 1], boxes_b[..., 1]), 0, None)
  overlap = w * h
  union = area(boxes_a) + area(boxes_b) - overlap
  return overlap / (union + eps)


def pairwise_iou(boxes_a, boxes_b, eps=IOU_EPS):
  """`iou` of every box in `boxes_a` with every box in `boxes_b`.

  Args:
    boxes_a: [..., N, 4] corner form.
    boxes_b: [..., M, 4] corner form (leading axes broadcast with boxes_a's).
    eps: as in `iou`.

  Returns:
    [..., N, M] IoU.
  """
  return iou(boxes_a[..., :, None, :], boxes_b[..., None, :, :], eps)


def encode(boxes, priors, center_variance, size_variance):
  """Regression targets of center-form `boxes` against center-form `priors`.

  Args:
    boxes: [..., P, 4] center form (cx, cy, w, h).
    priors: [P, 4] center form, broadcast against `boxes`.
    center_variance: 0.1 in the reference.
    size_variance: 0.2 in the reference.

  Returns:
    [..., P, 4] (dx, dy, dw, dh) = ((c - p_c) / p_wh / cv, log(wh / p_wh) / sv).
  """
  xp = _xp(boxes, priors)
  return xp.concatenate([
      (boxes[..., :2] - priors[..., :2]) / priors[..., 2:] / center_variance,
      xp.log(boxes[..., 2:] / priors[..., 2:]) / size_variance,
  ], axis=-1)


def decode(locations, priors, center_variance, size_variance):
  """Inverse of `encode`: [..., P, 4] (dx, dy, dw, dh) -> center form boxes."""
  xp = _xp(locations, priors)
  return xp.concatenate([
      locations[..., :2] * center_variance * priors[..., 2:] + priors[..., :2],
      xp.exp(locations[..., 2:] * size_variance) * priors[..., 2:],
  ], axis=-1)
