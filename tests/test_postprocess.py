"""Host post-processing: parity with the reference PostProcessor
(fixtures/postprocess.npz on model_ref.npz's logits) and with a brute-force
implementation of SPEC h."""

import os

import numpy as np
import pytest

from configs import ssd300_voc
from ssd_jax.core import box_ops
from ssd_jax.evaluation import postprocess
from tests import detection_checks

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _config(**test):
  config = ssd300_voc.get_config()
  for key, value in test.items():
    setattr(config.test, key, value)
  return config


def _iou32(a, b):
  """torchvision's NMS IoU of two boxes, in float32 scalars."""
  a, b = np.float32(a), np.float32(b)
  w = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
  h = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
                  - inter)


def _brute_nms(boxes, scores, labels, threshold, max_output=None):
  """Per-label greedy NMS, one box at a time."""
  order = sorted(range(len(scores)), key=lambda i: -scores[i])
  kept = []
  for i in order:
    if all(labels[k] != labels[i] or _iou32(boxes[k], boxes[i]) <= threshold
           for k in kept):
      kept.append(i)
  return kept[:max_output]


def _brute_detect(logits, loc, priors, orig_hw, config):
  """SPEC h for one image, with plain loops."""
  size = config.input.image_size
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  scores = e / e.sum(axis=1, keepdims=True)
  boxes = box_ops.center_to_corner(box_ops.decode(
      loc, priors, config.model.center_variance,
      config.model.size_variance)) * np.float32(size)
  cand = [(p, c) for p in range(len(priors))
          for c in range(1, logits.shape[1])
          if scores[p, c] > np.float32(config.test.confidence_threshold)]
  top = config.test.max_per_image
  kept = _brute_nms([boxes[p] for p, _ in cand],
                    [scores[p, c] for p, c in cand], [c for _, c in cand],
                    config.test.nms_threshold, top if top > 0 else None)
  h, w = orig_hw
  scale = np.array([w / size, h / size, w / size, h / size], np.float32)
  return {'boxes': np.array([boxes[cand[k][0]] * scale for k in kept],
                            np.float32).reshape(-1, 4),
          'labels': np.array([cand[k][1] for k in kept], np.int64),
          'scores': np.array([scores[cand[k]] for k in kept], np.float32),
          'num_candidates': len(cand),
          'num_after_nms': len(_brute_nms(
              [boxes[p] for p, _ in cand], [scores[p, c] for p, c in cand],
              [c for _, c in cand], config.test.nms_threshold))}


def _clustered_inputs(rng, batch, num_priors=300, num_classes=5, bg=3.0):
  """Priors around a few centres (so NMS has work) and random outputs."""
  centres = rng.uniform(0.1, 0.9, (8, 2))
  cxcy = centres[rng.integers(0, 8, num_priors)] + rng.normal(
      0, 0.03, (num_priors, 2))
  wh = rng.uniform(0.05, 0.5, (num_priors, 2))
  priors = np.concatenate([cxcy, wh], 1).astype(np.float32)
  logits = rng.normal(0, 2, (batch, num_priors, num_classes)).astype(
      np.float32)
  logits[..., 0] += bg
  loc = rng.normal(0, 0.5, (batch, num_priors, 4)).astype(np.float32)
  sizes = np.stack([rng.integers(100, 600, batch),
                    rng.integers(100, 600, batch)], 1)
  return logits, loc, priors, sizes


def test_reference_postprocessor_parity():
  """Labels and order exact (up to float32 ties), scores 1e-6, boxes 1e-3 px
  (reached: 3.6e-7 and 6.1e-5 px)."""
  ref = np.load(os.path.join(FIXTURES, 'postprocess.npz'))
  outputs = np.load(os.path.join(FIXTURES, 'model_ref.npz'))
  priors = np.load(os.path.join(FIXTURES, 'priors_ssd300.npy'))
  config = _config()
  hw = ref['image_sizes_wh'][:, ::-1]  # stored as (W, H)
  dets = postprocess.detect(outputs['cls_logits'], outputs['bbox_pred'],
                            priors, hw, config)
  dets300 = postprocess.detect(outputs['cls_logits'], outputs['bbox_pred'],
                               priors, np.full((2, 2), 300), config)
  swapped = 0
  for i in range(2):
    n = ref['num'][i]
    swapped += detection_checks.assert_same_detections(
        dets[i], ref['boxes'][i, :n], ref['labels'][i, :n],
        ref['scores'][i, :n], score_atol=1e-6, box_atol=1e-3)
    detection_checks.assert_same_detections(
        dets300[i], ref['boxes300'][i, :n], ref['labels'][i, :n],
        ref['scores'][i, :n], score_atol=1e-6, box_atol=1e-3)
    assert dets[i]['labels'].dtype == np.int64
  # One pair of image 0 (class 16, scores 0.99056923 / 0.9905691 in the
  # reference) is equal in our float32 softmax.
  assert swapped <= 1


@pytest.mark.parametrize('max_per_image', [100, 7, 0])
@pytest.mark.parametrize('threshold', [0.01, 0.2])
def test_detect_matches_brute_force(max_per_image, threshold):
  rng = np.random.default_rng(max_per_image + int(threshold * 100))
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=3)
  config = _config(max_per_image=max_per_image,
                   confidence_threshold=threshold)
  dets = postprocess.detect(logits, loc, priors, sizes, config)
  for i in range(3):
    ref = _brute_detect(logits[i], loc[i], priors, sizes[i], config)
    # NMS had work to do, and the cap (if any) cuts.
    assert ref['num_after_nms'] < ref['num_candidates']
    if max_per_image:
      assert ref['num_after_nms'] > max_per_image == len(ref['labels'])
    detection_checks.assert_same_detections(
        dets[i], ref['boxes'], ref['labels'], ref['scores'], score_atol=1e-6,
        box_atol=1e-3)


def test_detect_without_threshold():
  rng = np.random.default_rng(5)
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=2, num_priors=60)
  config = _config(confidence_threshold=0.0)
  dets = postprocess.detect(logits, loc, priors, sizes, config)
  for i in range(2):
    ref = _brute_detect(logits[i], loc[i], priors, sizes[i], config)
    detection_checks.assert_same_detections(
        dets[i], ref['boxes'], ref['labels'], ref['scores'], score_atol=1e-6,
        box_atol=1e-3)


def test_heavy_suppression_looks_past_the_prefix():
  # 60 copies of one box score highest for class 1: the best 4 * 5 candidates
  # hold a single kept box, so NMS must go through all candidates.
  rng = np.random.default_rng(7)
  num_priors = 100
  priors = np.tile(np.float32([[0.5, 0.5, 0.3, 0.3]]), (num_priors, 1))
  priors[60:, :2] = rng.uniform(0.2, 0.8, (40, 2))
  logits = np.zeros((1, num_priors, 4), np.float32)
  logits[0, :, 0] = 2
  logits[0, :60, 1] = 8 + rng.uniform(0, 1, 60)
  logits[0, 60:, 2:] = rng.uniform(0, 3, (40, 2))
  loc = np.zeros((1, num_priors, 4), np.float32)
  config = _config(max_per_image=5)
  det = postprocess.detect(logits, loc, priors, [[300, 300]], config)[0]
  ref = _brute_detect(logits[0], loc[0], priors, (300, 300), config)
  assert len(det['labels']) == 5 and (det['labels'] == 1).sum() == 1
  detection_checks.assert_same_detections(
      det, ref['boxes'], ref['labels'], ref['scores'], score_atol=1e-6,
      box_atol=1e-3)


def test_threads_do_not_change_results():
  rng = np.random.default_rng(11)
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=20)
  config = _config()
  serial = postprocess.detect(logits, loc, priors, sizes, config,
                              num_threads=1)
  threaded = postprocess.detect(logits, loc, priors, sizes, config,
                                num_threads=3)
  assert len(serial) == len(threaded) == 20
  for a, b in zip(serial, threaded):
    for key in ('boxes', 'labels', 'scores'):
      np.testing.assert_array_equal(a[key], b[key])


def test_no_candidates():
  logits = np.zeros((2, 10, 3), np.float32)
  logits[..., 0] = 20  # every prior is background with p ~ 1
  dets = postprocess.detect(logits, np.zeros((2, 10, 4), np.float32),
                            np.full((10, 4), 0.5, np.float32), [[1, 1]] * 2,
                            _config())
  for det in dets:
    assert det['boxes'].shape == (0, 4) and det['labels'].shape == (0,)
    assert det['scores'].shape == (0,)


@pytest.mark.parametrize('threshold', [0.3, 0.45, 0.7])
@pytest.mark.parametrize('max_output', [None, 10])
def test_batched_nms_matches_brute_force(threshold, max_output):
  rng = np.random.default_rng(int(threshold * 10))
  n = 300
  xy = rng.uniform(0, 200, (n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, 2))], 1).astype(
      np.float32)
  boxes[n // 2:] = boxes[:n // 2] + rng.normal(0, 3, (n // 2, 4)).astype(
      np.float32)  # near-duplicates
  scores = rng.uniform(size=n).astype(np.float32)
  labels = rng.integers(0, 3, n)
  kept = postprocess.batched_nms(boxes, scores, labels, threshold, max_output)
  ref = _brute_nms(boxes, scores, labels, threshold, max_output)
  np.testing.assert_array_equal(kept, ref)
  assert len(kept) < n  # something was suppressed
  single = postprocess.nms(boxes, scores, threshold, max_output)
  np.testing.assert_array_equal(
      single, _brute_nms(boxes, scores, np.zeros(n), threshold, max_output))


def test_nms_is_strict_and_keeps_other_classes():
  a = [0, 0, 10, 10]
  b = [0, 0, 10, 18.18181818]  # IoU with a = 0.55
  boxes = np.array([a, b, b], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  iou = postprocess.pairwise_iou(boxes[:1], boxes[1:2])[0, 0]
  np.testing.assert_array_equal(
      postprocess.batched_nms(boxes, scores, [1, 1, 2], iou), [0, 1, 2])
  np.testing.assert_array_equal(
      postprocess.batched_nms(boxes, scores, [1, 1, 2], iou - 1e-6), [0, 2])


def test_pairwise_iou_equals_box_ops():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 300, (50, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(1, 100, (50, 2))], 1).astype(
      np.float32)
  np.testing.assert_array_equal(
      postprocess.pairwise_iou(boxes[:20], boxes),
      box_ops.pairwise_iou(boxes[:20], boxes, eps=0.0))
  batched = postprocess.pairwise_iou(boxes.reshape(2, 25, 4),
                                     boxes.reshape(2, 25, 4))
  np.testing.assert_array_equal(
      batched[1], box_ops.pairwise_iou(boxes[25:], boxes[25:], eps=0.0))


def test_input_errors():
  config = _config()
  priors = np.full((10, 4), 0.5, np.float32)
  with pytest.raises(ValueError, match='priors'):
    postprocess.detect(np.zeros((1, 9, 3)), np.zeros((1, 9, 4)), priors,
                       [[1, 1]], config)
  with pytest.raises(ValueError, match='bbox_pred'):
    postprocess.detect(np.zeros((1, 10, 3)), np.zeros((1, 10, 2)), priors,
                       [[1, 1]], config)
  with pytest.raises(ValueError, match='orig_sizes'):
    postprocess.detect(np.zeros((2, 10, 3)), np.zeros((2, 10, 4)), priors,
                       [[1, 1]], config)
