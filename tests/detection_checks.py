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
