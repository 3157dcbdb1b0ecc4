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

How it stays fast (a trained model, ~4,952 VOC07 test images):
* the softmax is only evaluated where it can matter: p_c = p_0 exp(x_c - x_0)
  <= exp(x_c - x_0), so a pair can only pass the threshold if
  x_c > x_0 + log(threshold), and a trained model keeps most priors far below
  that;
* a box's NMS fate depends only on the higher-scoring boxes of its class, so
  NMS walks the candidates by descending score and stops once
  `max_per_image` boxes are kept; it first looks at the best
  4 * max_per_image candidates of each image and goes through all of them only
  for an image where those hold too few kept boxes;
* the work is vectorised over the images of a batch: no Python loop runs
  per box or per class; NMS loops over blocks of candidates and over the
  positions in a block, each step for all images at once. Chunks of a batch
  run on a thread pool (numpy releases the GIL inside its loops).
"""

import concurrent.futures
import math
import os

import numpy as np

from ssd_jax.core import box_ops

# NMS first looks at this many candidates per detection asked for.
_PREFIX_FACTOR = 4
# NMS resolves this many candidates (per image) at a time.
_BLOCK = 48
# Slack (in logit units) of the background-logit prefilter; it covers the
# float32 rounding of the softmax for logits up to |x| ~ 1e5.
_PREFILTER_SLACK = 0.01
# Candidate rows whose softmax is computed at a time.
_SOFTMAX_ROWS = 2048
# Fewest images per thread-pool task.
_MIN_CHUNK = 8

_EXECUTOR = None


def _executor():
  global _EXECUTOR
  if _EXECUTOR is None:
    _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
        _default_threads(), thread_name_prefix='ssd_postprocess')
  return _EXECUTOR


def _default_threads():
  return max(1, min(8, available_cpus()))


def available_cpus():
  """CPUs this process may run on.

  os.sched_getaffinity exists on Linux only; elsewhere: all of the machine's.
  """
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def softmax(logits):
  """Float32 softmax over the last axis, shifted by the row maximum."""
  logits = np.asarray(logits, np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def pairwise_iou(boxes_a, boxes_b):
  """IoU [..., N, M] of corner-form boxes [..., N, 4] x [..., M, 4].

  No "+1" and no eps: torchvision's nms arithmetic. 0/0 (two empty boxes)
  gives NaN, which never suppresses.
  """
  with np.errstate(divide='ignore', invalid='ignore'):
    return box_ops.pairwise_iou(boxes_a, boxes_b, eps=0.0)


def _resolve_blocks(suppress, alive):
  """Greedy NMS inside blocks of score-sorted boxes.

  Args:
    suppress: bool [B, n, n]; [b, i, j] (i < j): box i suppresses box j if i
      is kept.
    alive: bool [B, n], the boxes still in the running.

  Returns:
    bool [B, n]: the kept boxes. The sequential greedy loop, vectorised over
    the B blocks.
  """
  alive = alive.copy()
  for i in range(alive.shape[1] - 1):
    alive[:, i + 1:] &= ~(suppress[:, i, i + 1:] & alive[:, i, None])
  return alive


def _greedy_nms(boxes, labels, iou_threshold, max_output):
  """Per-label greedy NMS of score-sorted boxes, for a batch of images.

  Args:
    boxes: [B, K, 4] corner form, each image's boxes by descending score.
    labels: int [B, K]; boxes of different labels never suppress each other;
      -1 marks padding (never kept).
    iou_threshold: suppress when IoU > this (strict).
    max_output: stop an image once it has this many kept boxes.

  Returns:
    bool [B, K]: the kept boxes (at most max_output per image).

  The boxes are walked in blocks of _BLOCK: a block is first checked against
  the boxes kept so far (of its own image and label), then resolved inside;
  an image drops out once it has max_output boxes.
  """
  batch, size = labels.shape
  keep = np.zeros((batch, size), bool)
  kept_boxes = np.zeros((batch, max_output, 4), boxes.dtype)
  kept_labels = np.full((batch, max_output), -2, labels.dtype)
  count = np.zeros(batch, np.int64)
  for start in range(0, size, _BLOCK):
    block_labels = labels[:, start:start + _BLOCK]
    alive = (block_labels >= 0) & (count < max_output)[:, None]
    active = np.flatnonzero(alive.any(axis=1))
    if not len(active):
      break  # padding is at the end, so later blocks hold no live box either
    alive = alive[active]
    block_labels = block_labels[active]
    block = boxes[active, start:start + _BLOCK]
    seen = int(count[active].max())
    if seen:
      hit = ((pairwise_iou(kept_boxes[active, :seen], block) > iou_threshold)
             & (kept_labels[active, :seen, None] == block_labels[:, None, :]))
      alive &= ~hit.any(axis=1)
    suppress = np.triu((pairwise_iou(block, block) > iou_threshold)
                       & (block_labels[:, :, None] == block_labels[:, None, :]),
                       1)
    new = _resolve_blocks(suppress, alive)
    rank = np.cumsum(new, axis=1)
    new &= rank <= (max_output - count[active])[:, None]
    keep[active, start:start + _BLOCK] = new
    row, col = np.nonzero(new)
    slot = count[active[row]] + rank[row, col] - 1
    kept_boxes[active[row], slot] = block[row, col]
    kept_labels[active[row], slot] = block_labels[row, col]
    count[active] += new.sum(axis=1)
  return keep


def batched_nms(boxes, scores, labels, iou_threshold, max_output=None):
  """Greedy NMS applied to each label independently, results merged.

  Equals the reference's batched_nms (per-class NMS, kept boxes in descending
  score order over all classes) followed by `keep[:max_output]`.

  Args:
    boxes: [N, 4] corner form (xmin, ymin, xmax, ymax).
    scores: [N] scores; boxes are visited by descending score, ties in index
      order.
    labels: [N] int (>= 0) class of each box; boxes of different labels never
      suppress each other.
    iou_threshold: a box is suppressed by a kept, higher-scoring box of its
      label when their IoU (no "+1") is > this (strict).
    max_output: keep at most this many boxes over all labels (None = all).

  Returns:
    int64 [K] indices of the kept boxes, in descending score order.
  """
  boxes = np.asarray(boxes)
  labels = np.asarray(labels)
  if (labels < 0).any():
    raise ValueError('batched_nms: labels must be >= 0')
  order = np.argsort(-np.asarray(scores), kind='stable')
  limit = len(order) if max_output is None else max_output
  if not len(order) or limit <= 0:
    return np.zeros(0, np.int64)
  keep = _greedy_nms(boxes[order][None], labels[order][None], iou_threshold,
                     limit)[0]
  return order[keep]


def nms(boxes, scores, iou_threshold, max_output=None):
  """Greedy single-class NMS; see `batched_nms`. Returns kept indices."""
  return batched_nms(boxes, scores, np.zeros(len(boxes), np.int64),
                     iou_threshold, max_output)


def _candidates(cls_logits, threshold):
  """(image, prior, class) triples with softmax score > threshold.

  Args:
    cls_logits: [B, P, C] float32 logits.
    threshold: the confidence threshold (strict).

  Returns:
    image, prior, label (1..C-1) int64 [N] and score float32 [N], ordered by
    image, prior, class (the reference's flattening order).
  """
  batch, num_priors, num_classes = cls_logits.shape
  logits = cls_logits.reshape(batch * num_priors, num_classes)
  threshold = np.float32(threshold)
  if threshold > 0:
    # A pair can only pass if x_c > x_0 + log(threshold) (module docstring);
    # class 0 is never a candidate.
    bound = logits[:, :1] + np.float32(math.log(threshold) - _PREFILTER_SLACK)
    rows = np.flatnonzero((logits[:, 1:] > bound).any(axis=1))
  else:
    rows = np.arange(batch * num_priors)
  flat_rows, labels, scores = [], [], []
  # Softmax of the candidate rows, laid out [C, rows] so that the reductions
  # over the classes run along long contiguous rows; a chunk of rows at a
  # time, so that the transposing copy stays in cache (many classes).
  for start in range(0, len(rows), _SOFTMAX_ROWS):
    part = rows[start:start + _SOFTMAX_ROWS]
    probs = logits[part].T.copy()
    probs -= probs.max(axis=0)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=0)
    row, col = np.nonzero((probs[1:] > threshold).T)  # (prior, class) order
    flat_rows.append(part[row])
    labels.append(col + 1)
    scores.append(probs[col + 1, row])
  if not flat_rows:
    return (np.zeros(0, np.int64),) * 3 + (np.zeros(0, np.float32),)
  flat_rows = np.concatenate(flat_rows)
  return (flat_rows // num_priors, flat_rows % num_priors,
          np.concatenate(labels), np.concatenate(scores))


def _top_order(scores, count):
  """Indices of the `count` best scores (more on ties at the cut), sorted by
  descending score, ties by index: a prefix of the full stable order."""
  if count >= len(scores):
    return np.argsort(-scores, kind='stable')
  cut = np.partition(scores, len(scores) - count)[len(scores) - count]
  top = np.flatnonzero(scores >= cut)
  return top[np.argsort(-scores[top], kind='stable')]


def _detect_batch(cls_logits, bbox_pred, priors, orig_sizes, *, image_size,
                  center_variance, size_variance, confidence_threshold,
                  nms_threshold, max_per_image):
  """`detect` on float32 numpy arrays, without threads."""
  batch = cls_logits.shape[0]
  image, prior, label, score = _candidates(cls_logits, confidence_threshold)
  counts = np.bincount(image, minlength=batch)  # candidates are by image
  starts = np.cumsum(counts) - counts
  limit = int(counts.max()) if max_per_image is None else max_per_image

  def boxes_of(index):  # corner form in image_size pixels, as the reference
    boxes = box_ops.center_to_corner(box_ops.decode(
        bbox_pred[image[index], prior[index]], priors[prior[index]],
        center_variance, size_variance))
    return boxes * np.float32(image_size)

  # NMS over the best `size` candidates of every image (by descending score,
  # ties in the reference's flattening order), padded.
  size = min(_PREFIX_FACTOR * limit, int(counts.max()))
  top = np.zeros((batch, size), np.int64)
  valid = np.arange(size) < counts[:, None]
  for b in range(batch):
    mine = score[starts[b]:starts[b] + counts[b]]
    top[b, :min(size, counts[b])] = starts[b] + _top_order(mine, size)[:size]
  top_boxes = boxes_of(top)
  keep = _greedy_nms(top_boxes, np.where(valid, label[top], -1),
                     nms_threshold, limit)

  results = []
  for b in range(batch):
    kept = top[b][keep[b]]
    boxes = top_boxes[b][keep[b]]
    if len(kept) < limit and counts[b] > size:
      # Too many suppressed in the prefix: NMS over all of this image's.
      order = starts[b] + np.argsort(-score[starts[b]:starts[b] + counts[b]],
                                     kind='stable')
      order_boxes = boxes_of(order)
      order_keep = _greedy_nms(order_boxes[None], label[order][None],
                               nms_threshold, limit)[0]
      kept, boxes = order[order_keep], order_boxes[order_keep]
    height, width = orig_sizes[b]
    scale = np.array([width / image_size, height / image_size,
                      width / image_size, height / image_size], np.float32)
    results.append({'boxes': boxes * scale,
                    'labels': label[kept],
                    'scores': score[kept]})
  return results


def detect(cls_logits, bbox_pred, priors, orig_sizes, config, *,
           num_threads=None):
  """The reference's detections for a batch of images.

  Args:
    cls_logits: [B, P, C] class logits (numpy or jax), class 0 = background.
    bbox_pred: [B, P, 4] box regression (dx, dy, dw, dh) against `priors`.
    priors: [P, 4] center form (cx, cy, w, h), normalised to [0, 1].
    orig_sizes: [B, 2] (height, width) of the original images in pixels.
    config: the experiment config (uses `input.image_size`,
      `model.center_variance`, `model.size_variance`, `test.*`;
      `test.max_per_image` <= 0 means no limit).
    num_threads: split the batch over this many threads (None: up to the
      number of CPUs, at least 8 images per thread; 1: no threads).

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
  if cls_logits.ndim != 3 or bbox_pred.shape != cls_logits.shape[:2] + (4,):
    raise ValueError(f'expected cls_logits [B, P, C] and bbox_pred [B, P, 4], '
                     f'got {cls_logits.shape} and {bbox_pred.shape}')
  if cls_logits.shape[1] != len(priors):
    raise ValueError(f'{len(priors)} priors but cls_logits has '
                     f'{cls_logits.shape[1]} boxes per image')
  if orig_sizes.shape != (batch, 2):
    raise ValueError(f'orig_sizes must be [B, 2] (height, width) with B = '
                     f'{batch}, got shape {orig_sizes.shape}')
  max_per_image = config.test.max_per_image
  kwargs = dict(
      image_size=config.input.image_size,
      center_variance=config.model.center_variance,
      size_variance=config.model.size_variance,
      confidence_threshold=config.test.confidence_threshold,
      nms_threshold=config.test.nms_threshold,
      max_per_image=max_per_image if max_per_image > 0 else None)

  if num_threads is None:
    num_threads = min(_default_threads(), batch // _MIN_CHUNK)
  if num_threads <= 1 or batch < 2:
    return _detect_batch(cls_logits, bbox_pred, priors, orig_sizes, **kwargs)
  bounds = np.linspace(0, batch, min(num_threads, batch) + 1).astype(int)
  chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  parts = _executor().map(
      lambda s: _detect_batch(cls_logits[s], bbox_pred[s], priors,
                              orig_sizes[s], **kwargs), chunks)
  return [det for part in parts for det in part]
