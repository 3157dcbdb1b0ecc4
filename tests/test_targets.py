import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax.core import box_ops
from ssd_jax.core import targets
from tests.reference_data import load_fixture


@pytest.fixture(scope='module')
def match_case():
  ref = load_fixture('match.npz')
  priors = load_fixture('priors_ssd300.npy')
  num = ref['num']
  mask = np.arange(ref['boxes'].shape[1])[None, :] < num[:, None]
  loc, cls = jax.jit(targets.encode_targets)(
      ref['boxes'], ref['labels'].astype(np.int32), mask, priors)
  return ref, np.asarray(loc), np.asarray(cls)


def _tie_candidates(ref, image):
  """Priors where float rounding may legitimately pick another tied prior."""
  allowed = set()
  for gt in range(int(ref['num'][image])):
    if ref['forced_tie_count'][image, gt] > 1:
      allowed.update(int(p) for p in ref['forced_candidates'][image, gt] if p >= 0)
  return allowed


def test_labels_equal_reference(match_case):
  ref, _, cls = match_case
  assert cls.dtype == np.int32
  for image in range(cls.shape[0]):
    differ = set(np.nonzero(cls[image] != ref['out_labels'][image])[0].tolist())
    assert differ <= _tie_candidates(ref, image), (image, sorted(differ))
  # On this CPU the float32 arithmetic is the reference's: exact everywhere.
  np.testing.assert_array_equal(cls, ref['out_labels'])


def test_positive_locations_equal_reference(match_case):
  ref, loc, cls = match_case
  positive = ref['out_labels'] > 0
  np.testing.assert_allclose(loc[positive], ref['out_locs'][positive],
                             atol=1e-5, rtol=0)
  assert np.all(loc[cls == 0] == 0)


def test_documented_corner_cases(match_case):
  ref, _, cls = match_case
  # Image 1: two boxes share best prior 648; the later box wins it.
  assert cls[1, 648] == ref['labels'][1, 1]
  # Image 3: a box covering the whole image gets 8 positives.
  assert np.sum(cls[3] > 0) == 8
  np.testing.assert_array_equal(np.sum(cls > 0, axis=1),
                                [15, 21, 210, 8, 50, 15])


def test_padding_never_matches_and_empty_image_is_background():
  priors = load_fixture('priors_ssd300.npy')
  boxes = np.zeros((2, 4, 4), np.float32)
  boxes[0, 0] = [0.1, 0.1, 0.4, 0.5]
  # Padding rows hold a box that would match well if it were not masked.
  boxes[0, 1] = [0.5, 0.5, 0.9, 0.9]
  boxes[1, 0] = [0.1, 0.1, 0.4, 0.5]
  labels = np.array([[3, 7, 0, 0], [5, 0, 0, 0]], np.int32)
  mask = np.array([[True, False, False, False], [False] * 4])
  loc, cls = targets.encode_targets(boxes, labels, mask, priors)
  cls = np.asarray(cls)
  assert set(np.unique(cls[0])) == {0, 3}
  assert np.all(cls[1] == 0)
  assert np.all(np.isfinite(np.asarray(loc)))
  assert np.all(np.asarray(loc)[1] == 0)


def test_iou_exactly_at_threshold_is_positive():
  priors = np.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]], np.float32)
  box = np.array([[[0.3, 0.3, 0.7, 0.7]]], np.float32)  # == prior 1 (forced)
  iou = box_ops.pairwise_iou(box_ops.center_to_corner(priors[:1]), box[0])[0, 0]
  args = (box, np.array([[2]], np.int32), np.array([[True]]), priors)
  _, cls = targets.encode_targets(*args, iou_threshold=float(iou))
  assert np.asarray(cls).tolist() == [[2, 2]]
  above = float(np.nextafter(iou, np.float32(1)))
  _, cls = targets.encode_targets(*args, iou_threshold=above)
  assert np.asarray(cls).tolist() == [[0, 2]]


def test_vmaps_over_batch_like_single_images(match_case):
  ref, loc, cls = match_case
  priors = load_fixture('priors_ssd300.npy')
  n = int(ref['num'][4])
  one_loc, one_cls = targets.encode_targets(
      ref['boxes'][4:5, :n], ref['labels'][4:5, :n].astype(np.int32),
      np.ones((1, n), bool), jnp.asarray(priors))
  np.testing.assert_array_equal(np.asarray(one_cls)[0], cls[4])
  np.testing.assert_allclose(np.asarray(one_loc)[0], loc[4], atol=1e-6)
