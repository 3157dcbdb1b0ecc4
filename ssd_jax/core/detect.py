"""The reference's post-processing as a jit-able, batched JAX function.

The same rules as the host path (`evaluation.postprocess.detect`), with
static shapes so that it runs on the device, inside an exported graph:
  1. softmax over the C classes (class 0 = background);
  2. decode the box regression against the priors with the variances, boxes
     to `input.image_size` pixels (corner form);
  3. per class 1..C-1, the `test.candidates_per_class` best priors, of which
     those with score > `test.confidence_threshold` (strict) are candidates;
  4. greedy NMS per class, suppressing IoU > `test.nms_threshold` (strict,
     no "+1", no eps);
  5. the `test.max_per_image` best kept boxes over all classes, by descending
     score, ties by (prior, class) as the reference flattens them.

Where no class has more candidates above the threshold than
`candidates_per_class`, this is exactly the host path's result (same labels
and order, boxes and scores to float rounding); `num_candidates` says
whether any class was cut. Outputs are padded to `max_per_image` with a
per-image count.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.core import box_ops


class Detections(NamedTuple):
  """Padded detections of a batch; entries past `num_detections` are zero.

  boxes: float32 [B, N, 4] (xmin, ymin, xmax, ymax) in pixels of the
    image_size x image_size network input (`to_original_pixels`,
    `to_normalized` convert them).
  scores: float32 [B, N], descending.
  labels: int32 [B, N], class ids 1..C-1.
  num_detections: int32 [B].
  num_candidates: int32 [B, C-1], the priors above the threshold of each
    class before the per-class cut (more than candidates_per_class: cut).
  """
  boxes: jax.Array
  scores: jax.Array
  labels: jax.Array
  num_detections: jax.Array
  num_candidates: jax.Array


def _greedy_nms(boxes, alive, iou_threshold):
  """Greedy NMS of score-sorted boxes, vectorised over leading axes.

  Args:
    boxes: [..., K, 4] corner form, by descending score.
    alive: bool [..., K], the boxes in the running.
    iou_threshold: a kept box suppresses later boxes with IoU > this.

  Returns:
    bool [..., K]: the kept boxes.
  """
  size = boxes.shape[-2]

  # The boxes travel in the loop's carry and the positions are made inside
  # the body, not closed over: jax2onnx cannot convert a loop body that reads
  # an array from outside.
  def visit(i, carry):
    keep, boxes = carry
    positions = jnp.arange(size)
    box = jax.lax.dynamic_slice_in_dim(boxes, i, 1, axis=-2)
    overlaps = box_ops.iou(box, boxes, eps=0.0)  # [..., K]; 0/0 never hits
    kept = jax.lax.dynamic_slice_in_dim(keep, i, 1, axis=-1)
    suppressed = kept & (overlaps > iou_threshold) & (positions > i)
    return keep & ~suppressed, boxes

  keep, _ = jax.lax.fori_loop(0, size, visit, (alive, boxes))
  return keep


def _top_k(values, k, by_sort):
  """`lax.top_k` over the last axis, or the same (ties by index) by a sort."""
  if not by_sort:
    return jax.lax.top_k(values, k)
  indices = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  negated, indices = jax.lax.sort((-values, indices), dimension=values.ndim - 1,
                                  num_keys=1, is_stable=True)
  return -negated[..., :k], indices[..., :k]


def keep_top_candidates(class_scores, k):
  """Scores below each row's k-th best set to 0: `detect`'s candidates.

  For NMS ops without a per-class candidate cut (TFLite's detection op,
  ONNX NonMaxSuppression): with scores above the threshold they keep the
  k best priors of each class (and equal ones), as `detect` does.

  Args:
    class_scores: float32 [..., P], one row per class.
    k: the candidates per row; >= P leaves the scores as they are.

  Returns:
    float32 [..., P].
  """
  if k >= class_scores.shape[-1]:
    return class_scores
  # The k-th best score is gathered by its index: TF 2.21's TFLite converter
  # turns a top-k whose indices go unused into a sort it cannot write.
  _, best = jax.lax.top_k(class_scores, k)
  kth = jnp.take_along_axis(class_scores, best[..., -1:], axis=-1)
  return jnp.where(class_scores >= kth, class_scores, 0.0)


def detect(cls_logits, bbox_pred, priors, config, *, confidence_threshold=None,
           exact_ties=True, top_k_by_sort=False):
  """Detections of a batch, on the device.

  Args:
    cls_logits: [B, P, C] class logits, class 0 = background.
    bbox_pred: [B, P, 4] box regression (dx, dy, dw, dh) against `priors`.
    priors: [P, 4] center form (cx, cy, w, h), normalised to [0, 1].
    config: the experiment config (`input.image_size`, `model.*_variance`,
      `test.confidence_threshold`, `nms_threshold`, `max_per_image`,
      `candidates_per_class`).
    confidence_threshold: overrides `test.confidence_threshold`; may be a
      traced scalar (one compilation for every threshold).
    exact_ties: order equal scores by (prior, class) as the host path does,
      with a three-key sort; False orders them by class, then prior, with a
      plain top-k (for converters without a multi-operand sort).
    top_k_by_sort: compute the top-k as a sort (same result): the top-k
      lowers to a StableHLO composite that older StableHLO consumers (TF
      2.21's XlaCallModule) cannot read.

  Returns:
    `Detections`, N = test.max_per_image.
  """
  test = config.test
  size = float(config.input.image_size)
  batch, num_priors, num_classes = cls_logits.shape
  per_class = min(int(test.candidates_per_class), num_priors)
  max_per_image = int(test.max_per_image)
  if max_per_image <= 0:
    raise ValueError('the device post-processing needs test.max_per_image '
                     f'> 0, got {max_per_image}')

  scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
  boxes = box_ops.center_to_corner(box_ops.decode(
      bbox_pred.astype(jnp.float32), jnp.asarray(priors, jnp.float32),
      config.model.center_variance, config.model.size_variance)) * size

  class_scores = jnp.swapaxes(scores[..., 1:], 1, 2)  # [B, C-1, P]
  if confidence_threshold is None:
    confidence_threshold = test.confidence_threshold
  threshold = jnp.asarray(confidence_threshold, jnp.float32)
  num_candidates = jnp.sum(class_scores > threshold, axis=-1, dtype=jnp.int32)
  top_scores, top_priors = _top_k(class_scores, per_class, top_k_by_sort)
  alive = top_scores > threshold
  top_boxes = jnp.take_along_axis(boxes[:, None], top_priors[..., None],
                                  axis=2)  # [B, C-1, K, 4]
  keep = _greedy_nms(top_boxes, alive, float(test.nms_threshold))

  flat_scores = jnp.where(keep, top_scores, -jnp.inf).reshape(batch, -1)
  flat_priors = top_priors.reshape(batch, -1)
  flat_labels = jnp.broadcast_to(
      jnp.arange(1, num_classes, dtype=jnp.int32)[:, None],
      top_priors.shape[1:]).reshape(-1)
  flat_labels = jnp.broadcast_to(flat_labels, flat_priors.shape)
  count = min(max_per_image, flat_scores.shape[1])
  if exact_ties:
    slots = jnp.broadcast_to(jnp.arange(flat_scores.shape[1]),
                             flat_scores.shape)
    _, _, _, order = jax.lax.sort(
        (-flat_scores, flat_priors, flat_labels, slots), dimension=1,
        num_keys=3)
    order = order[:, :count]
  else:
    _, order = _top_k(flat_scores, count, top_k_by_sort)
  best_scores = jnp.take_along_axis(flat_scores, order, axis=1)
  valid = best_scores > -jnp.inf
  best_priors = jnp.take_along_axis(flat_priors, order, axis=1)
  best_boxes = jnp.take_along_axis(boxes, best_priors[..., None], axis=1)
  pad = max_per_image - count
  widths = ((0, 0), (0, pad))
  return Detections(
      boxes=jnp.pad(jnp.where(valid[..., None], best_boxes, 0.0),
                    widths + ((0, 0),)),
      scores=jnp.pad(jnp.where(valid, best_scores, 0.0), widths),
      labels=jnp.pad(jnp.where(valid, jnp.take_along_axis(
          flat_labels, order, axis=1), 0), widths),
      num_detections=jnp.sum(valid, axis=1, dtype=jnp.int32),
      num_candidates=num_candidates)


def to_original_pixels(boxes, orig_sizes, image_size):
  """Network-input pixel boxes [B, N, 4] -> original-image pixels.

  orig_sizes: [B, 2] (height, width). The host path's scaling (float32
  width / image_size), never clipped.
  """
  orig_sizes = jnp.asarray(orig_sizes, jnp.float32)
  height, width = orig_sizes[:, 0], orig_sizes[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1) / jnp.float32(
      image_size)
  return boxes * scale[:, None, :]


def to_normalized(boxes, image_size):
  """Network-input pixel boxes -> (xmin, ymin, xmax, ymax) in [0, 1]."""
  return boxes / jnp.float32(image_size)


def to_host_detections(detections, orig_sizes, image_size):
  """`Detections` -> the host path's list of per-image dicts.

  Args:
    detections: `Detections` (jax or numpy arrays).
    orig_sizes: [B, 2] (height, width) of the original images.
    image_size: the network input size S.

  Returns:
    B dicts {'boxes' float32 [K, 4] original pixels, 'labels' int64 [K],
    'scores' float32 [K]}, scaled as `evaluation.postprocess.detect` scales.
  """
  boxes = np.asarray(detections.boxes, np.float32)
  scores = np.asarray(detections.scores, np.float32)
  labels = np.asarray(detections.labels).astype(np.int64)
  counts = np.asarray(detections.num_detections)
  results = []
  for i, (height, width) in enumerate(np.asarray(orig_sizes)):
    scale = np.array([width / image_size, height / image_size,
                      width / image_size, height / image_size], np.float32)
    n = int(counts[i])
    results.append({'boxes': boxes[i, :n] * scale, 'labels': labels[i, :n],
                    'scores': scores[i, :n]})
  return results
