"""Host-side post-processing of SSD outputs into detections (numpy only).

Reproduces the reference's PostProcessor followed by Container.resize, per
image:
  1. softmax over the C classes (class 0 = background);
  2. decode the box regression against the priors with the variances;
  3. keep the (prior, class) pairs with score > `test.confidence_threshold`
     (strict), class 0 excluded;
  4. boxes to `input.image_size` pixels, greedy NMS per class suppressing
     IoU > `test.nms_threshold` (strict, no "+1");
  5. the `test.max_per_image` best over all classes, sorted by score;
  6. boxes scaled from image_size x image_size to the original (height,
     width), never clipped.

Speed: a trained model is confident that most priors are background, so the
softmax is only evaluated for priors where some class logit comes close
enough to the background logit to pass the threshold (p_c <= exp(x_c - x_0)
because p_0 <= 1). NMS only looks at the best-scoring candidates: a box's
fate depends only on the higher-scoring boxes of its class, so greedy NMS over
a score-ordered prefix of the candidates gives exactly the boxes of the full
NMS in that prefix; the prefix is grown until it holds `max_per_image` kept
boxes (or all candidates). Images are processed on a thread pool (numpy
releases the GIL in its inner loops).
"""

import concurrent.futures
import math
import os

import numpy as np

from ssd_jax import box_ops

# The NMS prefix starts at this many candidates per kept box asked for.
_PREFIX_FACTOR = 4
# Slack (in logit units) of the background-logit prefilter; it covers the
# float32 rounding of the softmax for logits up to |x| ~ 1e5.
_PREFILTER_SLACK = 0.01

_EXECUTOR = None


def _executor():
  global _EXECUTOR
  if _EXECUTOR is None:
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
        workers, thread_name_prefix='ssd_postprocess')
  return _EXECUTOR


def softmax(logits):
  """Float32 softmax over the last axis, shifted by the row maximum."""
  logits = np.asarray(logits, np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def nms(boxes, scores, iou_threshold, max_output=None):
  """Greedy single-class non-maximum suppression.

  Args:
    boxes: [N, 4] corner form (xmin, ymin, xmax, ymax).
    scores: [N] scores; boxes are visited in descending score order, ties in
      index order.
    iou_threshold: a box is suppressed by a kept, higher-scoring box when
      their IoU (intersection / union, no "+1") is > this (strict).
    max_output: stop after this many kept boxes (None = no limit).

  Returns:
    int64 [K] indices of the kept boxes, in descending score order.
  """
  boxes = np.asarray(boxes)
  order = np.argsort(-np.asarray(scores), kind='stable')
  keep = _greedy_sorted(boxes[order], iou_threshold,
                        len(order) if max_output is None else max_output)
  return order[keep]


def _greedy_sorted(boxes, iou_threshold, max_output):
  """Greedy NMS on boxes already sorted by descending score -> kept positions."""
  n = len(boxes)
  if n <= 1 or max_output <= 1:
    return np.arange(min(n, max_output), dtype=np.int64)
  suppress = box_ops.pairwise_iou(boxes, boxes, eps=0.0) > iou_threshold
  alive = np.ones(n, dtype=bool)
  kept = []
  for i in range(n):
    if alive[i]:
      kept.append(i)
      if len(kept) == max_output:
        break
      alive[i + 1:] &= ~suppress[i, i + 1:]
  return np.asarray(kept, dtype=np.int64)


def batched_nms(boxes, scores, labels, iou_threshold, max_output=None):
  """Greedy NMS applied to each label independently, results merged.

  Equals the reference's batched_nms (per-class NMS, kept boxes in descending
  score order over all classes) followed by `keep[:max_output]`.

  Args:
    boxes: [N, 4] corner form.
    scores: [N] scores; ties are ordered by index.
    labels: [N] int class of each box; boxes of different labels never
      suppress each other.
    iou_threshold: suppress when IoU > this (strict, no "+1").
    max_output: keep at most this many boxes over all labels (None = all).

  Returns:
    int64 [K] indices of the kept boxes, in descending score order.
  """
  boxes = np.asarray(boxes)
  labels = np.asarray(labels)
  order = np.argsort(-np.asarray(scores), kind='stable')
  n = len(order)
  limit = n if max_output is None else max_output
  size = min(n, max(_PREFIX_FACTOR * limit, 64))
  while True:
    prefix = order[:size]
    kept = _batched_greedy_sorted(boxes[prefix], labels[prefix],
                                  iou_threshold, limit)
    if len(kept) >= limit or size == n:
      return prefix[kept[:limit]]
    size = min(n, _PREFIX_FACTOR * size)


def _batched_greedy_sorted(boxes, labels, iou_threshold, max_output):
  """Per-label greedy NMS on score-sorted boxes -> kept positions, sorted."""
  by_label = np.argsort(labels, kind='stable')  # keeps score order per label
  sorted_labels = labels[by_label]
  starts = np.flatnonzero(np.diff(sorted_labels)) + 1
  kept = []
  for group in np.split(by_label, starts):
    kept.append(group[_greedy_sorted(boxes[group], iou_threshold,
                                     max_output)])
  return np.sort(np.concatenate(kept))


def _candidates(logits, threshold):
  """(prior, class) pairs with softmax score > threshold.

  Args:
    logits: [P, C] float32 logits of one image.
    threshold: the confidence threshold (strict).

  Returns:
    prior [N] int64, label [N] int64 in 1..C-1, score [N] float32, ordered by
    prior then class (the reference's flattening order).
  """
  num_priors, num_classes = logits.shape
  threshold = np.float32(threshold)
  if threshold > 0:
    # p_c = p_0 * exp(x_c - x_0) <= exp(x_c - x_0): a pair can only pass if
    # x_c > x_0 + log(threshold). Class 0 never passes (its bound is +inf).
    bound = logits[:, 0] + np.float32(math.log(threshold) - _PREFILTER_SLACK)
    bound = np.repeat(bound, num_classes)
    bound[::num_classes] = np.inf
    flat = np.flatnonzero(logits.reshape(-1) > bound)
    rows = np.unique(flat // num_classes)
  else:
    rows = np.arange(num_priors)
  scores = softmax(logits[rows])[:, 1:]
  row, col = np.nonzero(scores > threshold)
  return rows[row], col + 1, scores[row, col]


def detect_image(cls_logits, bbox_pred, priors, orig_size, *, image_size,
                 center_variance, size_variance, confidence_threshold,
                 nms_threshold, max_per_image):
  """Detections of one image; see `detect` for the conventions.

  Args:
    cls_logits: [P, C] float32 logits.
    bbox_pred: [P, 4] float32 box regression (dx, dy, dw, dh).
    priors: [P, 4] center form (cx, cy, w, h), normalised to [0, 1].
    orig_size: (height, width) of the original image in pixels.
    image_size: the network input side (300 for SSD300).
    center_variance, size_variance: the box coder's variances.
    confidence_threshold: keep scores > this (strict).
    nms_threshold: suppress IoU > this (strict).
    max_per_image: at most this many detections.

  Returns:
    {'boxes': float32 [K, 4], 'labels': int64 [K], 'scores': float32 [K]}.
  """
  prior, label, score = _candidates(cls_logits, confidence_threshold)
  boxes = box_ops.center_to_corner(box_ops.decode(
      bbox_pred[prior], priors[prior], center_variance, size_variance))
  boxes *= np.float32(image_size)
  keep = batched_nms(boxes, score, label, nms_threshold, max_per_image)
  height, width = orig_size
  scale = np.array([width / image_size, height / image_size,
                    width / image_size, height / image_size], np.float32)
  return {'boxes': (boxes[keep] * scale).astype(np.float32),
          'labels': label[keep].astype(np.int64),
          'scores': score[keep].astype(np.float32)}


def detect(cls_logits, bbox_pred, priors, orig_sizes, config, *,
           parallel=True):
  """The reference's detections for a batch of images.

  Args:
    cls_logits: [B, P, C] class logits (numpy or jax), class 0 = background.
    bbox_pred: [B, P, 4] box regression (dx, dy, dw, dh) against `priors`.
    priors: [P, 4] center form (cx, cy, w, h), normalised to [0, 1].
    orig_sizes: [B, 2] (height, width) of the original images in pixels.
    config: the experiment config (uses `input.image_size`,
      `model.center_variance`, `model.size_variance`, `test.*`).
    parallel: spread the images over a thread pool.

  Returns:
    A list of B dicts: 'boxes' float32 [K, 4] (xmin, ymin, xmax, ymax) in
    original-image pixels, unclipped; 'labels' int64 [K] in 1..C-1; 'scores'
    float32 [K]; sorted by descending score, K <= test.max_per_image.
  """
  cls_logits = np.asarray(cls_logits, np.float32)
  bbox_pred = np.asarray(bbox_pred, np.float32)
  priors = np.asarray(priors, np.float32)
  orig_sizes = np.asarray(orig_sizes)
  batch = cls_logits.shape[0]
  if not (bbox_pred.shape[0] == len(orig_sizes) == batch):
    raise ValueError(
        f'batch sizes differ: cls_logits {cls_logits.shape}, bbox_pred '
        f'{bbox_pred.shape}, orig_sizes {orig_sizes.shape}')
  if cls_logits.shape[1] != len(priors) or bbox_pred.shape[1] != len(priors):
    raise ValueError(
        f'{len(priors)} priors but cls_logits {cls_logits.shape} and '
        f'bbox_pred {bbox_pred.shape}')
  kwargs = dict(
      image_size=config.input.image_size,
      center_variance=config.model.center_variance,
      size_variance=config.model.size_variance,
      confidence_threshold=config.test.confidence_threshold,
      nms_threshold=config.test.nms_threshold,
      max_per_image=config.test.max_per_image)

  def one(i):
    return detect_image(cls_logits[i], bbox_pred[i], priors,
                        tuple(orig_sizes[i]), **kwargs)

  if parallel and batch > 1:
    return list(_executor().map(one, range(batch)))
  return [one(i) for i in range(batch)]
