"""Comparison of detection lists for the post-processing and evaluation tests."""

import numpy as np

# Scores closer than this (1-2 float32 ulps near 1) are treated as ties: their
# order depends on the last bit of the float32 softmax, which differs between
# numpy and torch builds and CPUs.
TIE = 1e-6


def assert_same_detections(det, boxes, labels, scores, *, score_atol,
                           box_atol):
  """`det` ({'boxes', 'labels', 'scores'}) equals the reference lists.

  Scores are compared position by position (both lists are sorted).
  Labels and boxes must be in the same order, except inside a run of
  reference scores that differ by <= TIE, which is compared as a set.

  Returns:
    The number of tie runs whose order differs from the reference.
  """
  n = len(labels)
  assert len(det['labels']) == n, (len(det['labels']), n)
  np.testing.assert_allclose(det['scores'], scores, rtol=0, atol=score_atol)
  assert det['boxes'].dtype == np.float32 and det['scores'].dtype == np.float32
  swapped = 0
  start = 0
  while start < n:
    stop = start + 1
    while stop < n and scores[stop - 1] - scores[stop] <= TIE:
      stop += 1
    ours = sorted(range(start, stop), key=lambda k: (
        det['labels'][k], tuple(np.round(det['boxes'][k], 1))))
    theirs = sorted(range(start, stop), key=lambda k: (
        labels[k], tuple(np.round(boxes[k], 1))))
    for a, b in zip(ours, theirs):
      assert det['labels'][a] == labels[b], (a, b, det['labels'][a], labels[b])
      np.testing.assert_allclose(det['boxes'][a], boxes[b], rtol=0,
                                 atol=box_atol, err_msg=f'positions {a}, {b}')
    swapped += ours != theirs
    start = stop
  return swapped


def assert_similar_top_detections(det, boxes, labels, scores, *, top,
                                  min_iou=0.9, score_atol=0.02):
  """The reference's `top` best detections are in `det`, approximately.

  For inputs that differ slightly from the reference's (another resize's
  rounding): each of the first `top` reference detections (sorted by score)
  must have a detection in `det` with the same label, IoU >= min_iou and a
  score within score_atol, each of ours matched at most once; and the
  number of detections is the same.
  """
  from ssd_jax.core import box_ops  # pylint: disable=g-import-not-at-top
  assert len(det['labels']) == len(labels), (len(det['labels']), len(labels))
  iou = box_ops.pairwise_iou(np.asarray(boxes[:top], np.float32),
                             np.asarray(det['boxes'], np.float32), eps=0.0)
  used = np.zeros(len(det['labels']), bool)
  for k in range(min(top, len(labels))):
    ok = ((det['labels'] == labels[k]) & (iou[k] >= min_iou) &
          (np.abs(det['scores'] - scores[k]) <= score_atol) & ~used)
    assert ok.any(), (k, labels[k], boxes[k], scores[k])
    # The closest score among the candidates.
    candidates = np.flatnonzero(ok)
    used[candidates[np.argmin(np.abs(det['scores'][candidates] -
                                     scores[k]))]] = True
