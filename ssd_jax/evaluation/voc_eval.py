"""PASCAL VOC detection average precision, equal to the reference's evaluator.

The reference (lufficc/SSD) evaluates with a copy of chainercv's
`eval_detection_voc`; this module computes the same numbers with array
operations over the whole dataset (every prediction paired with the ground
truth of its image and class) instead of Python loops over (image, class,
prediction):

* boxes are (xmin, ymin, xmax, ymax) in pixels, 0-based (the VOC XML value
  minus 1); both predictions and ground truth get +1 on xmax and ymax (the
  "integer" VOC convention) before the IoU;
* within one image and class, predictions are visited by descending score;
  each takes the ground truth box of its class with the largest IoU (first
  one on ties); IoU >= `iou_thresh` is a match. A match with a difficult box
  is ignored (neither true nor false positive); a match with a box already
  taken by a higher-scoring prediction is a false positive (no fall back to
  the second-best box); everything else that matches is a true positive;
* per class, precision and recall over all images, ordered by score;
* AP: the VOC07 11-point metric (thresholds `np.arange(0., 1.1, 0.1)`) or the
  area under the monotone precision envelope;
* `ap[l]` is NaN when class l has no non-difficult ground truth (even if it
  has predictions), and for l = 0 (background); mAP is the NaN-mean.

Ties in score among one image's predictions of one class are visited in
descending index order (what the reference's `argsort()[::-1]` gives when
numpy's sort keeps ties in place, as it does for small arrays); pooled over
images, the order is the reference's `argsort()[::-1]` of the same array.
"""

import numpy as np

# The reference's 11 recall thresholds, with their float rounding
# (0.30000000000000004, ...).
VOC07_RECALL_THRESHOLDS = np.arange(0., 1.1, 0.1)


def voc_iou(boxes_a, boxes_b):
  """IoU with the VOC "+1" convention: [N, 4], [M, 4] -> [N, M].

  Boxes are (xmin, ymin, xmax, ymax) with inclusive integer-pixel ends, so
  xmax and ymax get +1 first. See `voc_iou_pairs` for the arithmetic.
  """
  a = np.asarray(boxes_a)
  b = np.asarray(boxes_b)
  return voc_iou_pairs(a[:, None, :], b[None, :, :])


def _match(image, labels, scores, boxes, gt_image, gt_labels, gt_boxes,
           gt_difficult, iou_thresh):
  """Match flags of all predictions of a dataset at once.

  Args: the predictions and ground truth of all images concatenated, with
    `image` / `gt_image` the image index of each.

  Returns:
    order: the predictions sorted by (image, label, descending score, then
      descending index), the order the reference visits them in;
    match: int8 flags in that order, 1 true positive, 0 false positive,
      -1 ignored (matched a difficult box).
  """
  order = np.lexsort((-np.arange(len(labels)), -scores, labels, image))
  labels, boxes = labels[order], boxes[order]
  gt_order = np.lexsort((gt_labels, gt_image))  # stable: keeps box order
  num_keys = max(labels.max(initial=0), gt_labels.max(initial=0)) + 1
  key = image[order] * num_keys + labels
  gt_key = gt_image[gt_order] * num_keys + gt_labels[gt_order]
  # Each prediction against the ground truth of its image and label: pairs.
  first_gt = np.searchsorted(gt_key, key, 'left')
  count = np.searchsorted(gt_key, key, 'right') - first_gt
  match = np.zeros(len(labels), np.int8)
  has_gt = np.flatnonzero(count)
  if not len(has_gt):
    return order, match
  pair_pred = np.repeat(has_gt, count[has_gt])
  segment = np.cumsum(count[has_gt]) - count[has_gt]
  pair_gt = gt_order[first_gt[pair_pred] + np.arange(len(pair_pred))
                     - np.repeat(segment, count[has_gt])]
  iou = voc_iou_pairs(boxes[pair_pred], gt_boxes[pair_gt])
  # First maximum per prediction, as argmax; a NaN IoU counts as the maximum
  # and as a match (NaN < iou_thresh is False), as in the reference.
  best_iou = np.maximum.reduceat(iou, segment)
  best_of_pair = np.repeat(best_iou, count[has_gt])
  is_best = (iou == best_of_pair) | (np.isnan(iou) & np.isnan(best_of_pair))
  best = pair_gt[np.minimum.reduceat(
      np.where(is_best, np.arange(len(iou)), len(iou)), segment)]
  matched = ~(best_iou < iou_thresh)
  difficult = matched & gt_difficult[best]
  match[has_gt[difficult]] = -1
  claims = np.flatnonzero(matched & ~difficult)
  # The first claim of a box in visiting order (its best score) is the true
  # positive; later claims are false positives (no second-best fallback).
  _, first = np.unique(best[claims], return_index=True)
  match[has_gt[claims[first]]] = 1
  return order, match


def voc_iou_pairs(boxes_a, boxes_b):
  """`voc_iou` of boxes paired by broadcasting: [..., 4], [..., 4] -> [...].

  Not box_ops.iou, on purpose: the reference's VOC evaluator (chainercv's
  bbox_iou) adds 1 to xmax/ymax and takes a box's area unclipped, and AP
  parity needs its arithmetic bit for bit. Computed in the inputs' dtype;
  0/0 gives NaN, as there.
  """
  ax1, ay1 = boxes_a[..., 0], boxes_a[..., 1]
  bx1, by1 = boxes_b[..., 0], boxes_b[..., 1]
  ax2, ay2 = boxes_a[..., 2] + 1, boxes_a[..., 3] + 1
  bx2, by2 = boxes_b[..., 2] + 1, boxes_b[..., 3] + 1
  left, top = np.maximum(ax1, bx1), np.maximum(ay1, by1)
  right, bottom = np.minimum(ax2, bx2), np.minimum(ay2, by2)
  area_i = (right - left) * (bottom - top) * ((left < right) & (top < bottom))
  area_a = (ax2 - ax1) * (ay2 - ay1)
  area_b = (bx2 - bx1) * (by2 - by1)
  with np.errstate(divide='ignore', invalid='ignore'):
    return area_i / (area_a + area_b - area_i)


def _concat(arrays, dtype, width=None):
  shape = (0,) if width is None else (0, width)
  arrays = [a for a in arrays if len(a)]
  return np.concatenate(arrays).astype(dtype, copy=False) if arrays else (
      np.zeros(shape, dtype))


def precision_recall(pred_boxes, pred_labels, pred_scores, gt_boxes,
                     gt_labels, gt_difficults=None, *, iou_thresh=0.5):
  """Per-class precision and recall curves over a dataset.

  Args:
    pred_boxes: per image, [R, 4] (xmin, ymin, xmax, ymax) pixels, 0-based.
    pred_labels: per image, [R] int labels (1..C-1).
    pred_scores: per image, [R] scores.
    gt_boxes: per image, [M, 4] ground truth, same convention.
    gt_labels: per image, [M] int labels.
    gt_difficults: per image, [M] bool; None = nothing is difficult.
    iou_thresh: a prediction matches when IoU >= this.

  The IoU is computed in the common dtype of all boxes (the reference: of
  each image's; the same when all images share dtypes, e.g. float32).

  Returns:
    (prec, rec): lists indexed by label, of length max(label seen) + 1.
    prec[l] is the float64 precision array over class l's predictions
    ordered by score (NaN where only ignored predictions were seen so far);
    rec[l] the recall array. Both are None for labels seen nowhere, and rec[l]
    is None when class l has no non-difficult ground truth.
  """
  lengths = {len(pred_boxes), len(pred_labels), len(pred_scores),
             len(gt_boxes), len(gt_labels)}
  if gt_difficults is not None:
    lengths.add(len(gt_difficults))
  if len(lengths) != 1:
    raise ValueError('Length of input iterables need to be same.')
  preds = [[], [], [], []]  # image, labels, scores, boxes
  gts = [[], [], [], []]  # image, labels, boxes, difficult
  for i in range(len(pred_boxes)):
    labels = np.asarray(pred_labels[i]).reshape(-1)
    scores = np.asarray(pred_scores[i]).reshape(-1)
    boxes = np.asarray(pred_boxes[i]).reshape(-1, 4)
    gt_l = np.asarray(gt_labels[i]).reshape(-1)
    gt_b = np.asarray(gt_boxes[i]).reshape(-1, 4)
    if gt_difficults is None or gt_difficults[i] is None:
      gt_d = np.zeros(len(gt_l), bool)
    else:
      gt_d = np.asarray(gt_difficults[i]).reshape(-1)
    if not len(labels) == len(scores) == len(boxes):
      raise ValueError(f'image {i}: {len(boxes)} predicted boxes, '
                       f'{len(labels)} labels, {len(scores)} scores')
    if not len(gt_l) == len(gt_b) == len(gt_d):
      raise ValueError(f'image {i}: {len(gt_b)} ground truth boxes, '
                       f'{len(gt_l)} labels, {len(gt_d)} difficult flags')
    for acc, value in zip(preds + gts, (np.full(len(labels), i), labels,
                                        scores, boxes, np.full(len(gt_l), i),
                                        gt_l, gt_b, gt_d)):
      acc.append(value)
  box_dtype = np.result_type(*[b.dtype for b in preds[3] + gts[2]],
                             np.float32)
  image = _concat(preds[0], np.int64)
  labels = _concat(preds[1], np.int64)
  scores = _concat(preds[2], np.result_type(*[s.dtype for s in preds[2]],
                                            np.float32))
  boxes = _concat(preds[3], box_dtype, 4)
  gt_image = _concat(gts[0], np.int64)
  gt_l = _concat(gts[1], np.int64)
  gt_b = _concat(gts[2], box_dtype, 4)
  gt_d = _concat(gts[3], bool)
  if not len(labels) and not len(gt_l):
    raise ValueError('no predictions and no ground truth: nothing to evaluate')

  order, match = _match(image, labels, scores, boxes, gt_image, gt_l, gt_b,
                        gt_d, iou_thresh)
  labels, scores = labels[order], scores[order]
  seen = np.unique(np.concatenate([labels, gt_l]))
  num_labels = int(seen.max()) + 1
  n_pos = np.bincount(gt_l[~gt_d], minlength=num_labels)
  # Pooled over images in image order, as the reference's lists.
  by_label = np.argsort(labels, kind='stable')
  starts = np.searchsorted(labels[by_label], np.arange(num_labels + 1))
  prec = [None] * num_labels
  rec = [None] * num_labels
  for l in seen.tolist():
    rows = by_label[starts[l]:starts[l + 1]]
    score_l, match_l = scores[rows], match[rows]
    match_l = match_l[score_l.argsort()[::-1]]
    tp = np.cumsum(match_l == 1)
    fp = np.cumsum(match_l == 0)
    with np.errstate(divide='ignore', invalid='ignore'):
      prec[l] = tp / (fp + tp)
    if n_pos[l] > 0:
      rec[l] = tp / n_pos[l]
  return prec, rec


def average_precision(prec, rec, *, use_07_metric=False):
  """AP per label from `precision_recall`'s curves; NaN where either is None.

  use_07_metric: the VOC07 11-point metric (mean over recall thresholds
  0, 0.1, ..., 1 of the best precision at recall >= t); otherwise the area
  under the precision envelope (VOC2010+).
  """
  ap = np.empty(len(prec))
  for l in range(len(prec)):
    if prec[l] is None or rec[l] is None:
      ap[l] = np.nan
      continue
    precision = np.nan_to_num(prec[l])
    if use_07_metric:
      ap[l] = 0
      for t in VOC07_RECALL_THRESHOLDS:
        reached = rec[l] >= t
        p = np.max(precision[reached]) if reached.any() else 0
        ap[l] += p / 11
    else:
      mpre = np.concatenate(([0], precision, [0]))
      mrec = np.concatenate(([0], rec[l], [1]))
      mpre = np.maximum.accumulate(mpre[::-1])[::-1]
      i = np.flatnonzero(mrec[1:] != mrec[:-1])
      ap[l] = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
  return ap


def mean_ap(ap):
  """np.nanmean of an AP array, as the reference; NaN if every entry is NaN."""
  ap = np.asarray(ap, np.float64)
  if np.isnan(ap).all():
    return float('nan')
  return float(np.nanmean(ap))


def eval_detection_voc(pred_boxes, pred_labels, pred_scores, gt_boxes,
                       gt_labels, gt_difficults=None, *, iou_thresh=0.5,
                       use_07_metric=False):
  """VOC AP per class and mAP, as the reference's `eval_detection_voc`.

  Args: see `precision_recall` (per-image lists of arrays);
    use_07_metric: 11-point VOC07 AP (what the reference reports) instead of
      the area under the curve.

  Returns:
    {'ap': float64 [max(label seen) + 1] (index = label, NaN for background
    and for classes without non-difficult ground truth), 'map': the NaN-mean}.
  """
  prec, rec = precision_recall(pred_boxes, pred_labels, pred_scores, gt_boxes,
                               gt_labels, gt_difficults, iou_thresh=iou_thresh)
  ap = average_precision(prec, rec, use_07_metric=use_07_metric)
  return {'ap': ap, 'map': mean_ap(ap)}


def format_results(ap, map_value, class_names):
  """The reference's printed table.

  "mAP: 0.7740" then "{name:<16}: {ap:.4f}" for labels 1..len(ap)-1, each
  line ending in a newline (NaN prints as "nan").
  """
  if len(ap) > len(class_names):
    raise ValueError(f'{len(ap)} AP values but only {len(class_names)} class '
                     'names')
  text = 'mAP: {:.4f}\n'.format(map_value)
  for label in range(1, len(ap)):
    text += '{:<16}: {:.4f}\n'.format(class_names[label], ap[label])
  return text
