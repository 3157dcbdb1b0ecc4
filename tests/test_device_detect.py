"""core.detect (post-processing on the device) equals the host path and the
reference's PostProcessor where no candidate is cut."""

import os

import jax
import numpy as np
import pytest

from ssd_jax.core import detect
from ssd_jax.evaluation import postprocess
from tests import detection_checks
from tests.test_postprocess import _clustered_inputs
from tests.test_postprocess import _config

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _device_detections(cls_logits, bbox_pred, priors, orig_sizes, config,
                       **kwargs):
  detections = jax.jit(lambda a, b: detect.detect(a, b, priors, config,
                                                  **kwargs))(
                                                      cls_logits, bbox_pred)
  return detections, detect.to_host_detections(
      detections, orig_sizes, config.input.image_size)


def _assert_equal_to_host(ours, host, *, box_rtol=1e-5, score_atol=1e-5):
  for det, theirs in zip(ours, host):
    scale = max(1.0, float(np.abs(theirs['boxes']).max(initial=0)))
    detection_checks.assert_same_detections(
        det, theirs['boxes'], theirs['labels'], theirs['scores'],
        score_atol=score_atol, box_atol=box_rtol * scale)
    assert det['labels'].dtype == np.int64


@pytest.mark.parametrize('per_class', [8732, 400])
def test_reference_postprocessor_and_host_path(per_class):
  """model_ref.npz's outputs (deterministic weights, scores near uniform:
  every prior of every class is above 0.01, 6,450 per class): with all
  priors as candidates nothing is cut; with 400 the cut does not reach the
  100 kept detections of either image."""
  ref = np.load(os.path.join(FIXTURES, 'postprocess.npz'))
  outputs = np.load(os.path.join(FIXTURES, 'model_ref.npz'))
  priors = np.load(os.path.join(FIXTURES, 'priors_ssd300.npy'))
  config = _config(candidates_per_class=per_class)
  hw = ref['image_sizes_wh'][:, ::-1]
  raw, ours = _device_detections(outputs['cls_logits'], outputs['bbox_pred'],
                                 priors, hw, config)
  assert np.asarray(raw.num_candidates).max() == 6450
  np.testing.assert_array_equal(raw.num_detections, ref['num'])
  for i in range(2):
    n = ref['num'][i]
    detection_checks.assert_same_detections(
        ours[i], ref['boxes'][i, :n], ref['labels'][i, :n],
        ref['scores'][i, :n], score_atol=1e-6, box_atol=1e-3)
  host = postprocess.detect(outputs['cls_logits'], outputs['bbox_pred'],
                            priors, hw, config)
  _assert_equal_to_host(ours, host)


@pytest.mark.parametrize('max_per_image', [100, 7])
@pytest.mark.parametrize('threshold', [0.01, 0.2])
def test_equals_host_path_on_clustered_boxes(max_per_image, threshold):
  rng = np.random.default_rng(max_per_image + int(threshold * 100))
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=3)
  config = _config(max_per_image=max_per_image, confidence_threshold=threshold,
                   candidates_per_class=len(priors))
  raw, ours = _device_detections(logits, loc, priors, sizes, config)
  host = postprocess.detect(logits, loc, priors, sizes, config)
  assert max(len(h['scores']) for h in host) > 0
  _assert_equal_to_host(ours, host)
  # Padding past the count is zero.
  for i, n in enumerate(np.asarray(raw.num_detections)):
    assert not np.asarray(raw.scores)[i, n:].any()
    assert not np.asarray(raw.labels)[i, n:].any()


def test_top_k_ties_variant_and_traced_threshold():
  rng = np.random.default_rng(5)
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=2)
  config = _config(candidates_per_class=len(priors), confidence_threshold=0.3)
  host = postprocess.detect(logits, loc, priors, sizes, config)
  # Distinct scores: the plain top-k order is the exact order.
  _, ours = _device_detections(logits, loc, priors, sizes, config,
                               exact_ties=False)
  _assert_equal_to_host(ours, host)
  # The threshold as a traced argument: one compilation, the same result.
  fn = jax.jit(lambda a, b, t: detect.detect(a, b, priors, _config(
      candidates_per_class=len(priors)), confidence_threshold=t))
  traced = detect.to_host_detections(fn(logits, loc, np.float32(0.3)), sizes,
                                     config.input.image_size)
  _assert_equal_to_host(traced, host)


def test_cut_is_counted():
  rng = np.random.default_rng(2)
  logits, loc, priors, sizes = _clustered_inputs(rng, batch=2, bg=-5.0)
  config = _config(candidates_per_class=16)
  raw, _ = _device_detections(logits, loc, priors, sizes, config)
  expected = (postprocess.softmax(logits)[..., 1:] > 0.01).sum(axis=1)
  np.testing.assert_array_equal(raw.num_candidates, expected)
  assert expected.max() > 16


def test_no_candidates_and_bad_config():
  priors = np.full((10, 4), 0.5, np.float32)
  logits = np.zeros((2, 10, 3), np.float32)
  logits[..., 0] = 20.0
  config = _config()
  raw, ours = _device_detections(logits, np.zeros((2, 10, 4), np.float32),
                                 priors, np.full((2, 2), 300), config)
  assert raw.boxes.shape == (2, 100, 4)
  assert [len(d['scores']) for d in ours] == [0, 0]
  with pytest.raises(ValueError, match='max_per_image'):
    detect.detect(logits, logits[..., :1].repeat(4, -1), priors,
                  _config(max_per_image=0))
