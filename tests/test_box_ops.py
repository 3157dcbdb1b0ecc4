import jax.numpy as jnp
import numpy as np

from ssd_jax.core import box_ops


def test_corner_center_round_trip_numpy_and_jax():
  rng = np.random.RandomState(0)
  corner = np.sort(rng.rand(10, 2, 2), axis=1).transpose(0, 2, 1).reshape(10, 4)
  corner = corner[:, [0, 1, 2, 3]].astype(np.float32)
  center = box_ops.corner_to_center(corner)
  assert isinstance(center, np.ndarray)
  np.testing.assert_allclose(box_ops.center_to_corner(center), corner, atol=1e-6)
  center_jax = box_ops.corner_to_center(jnp.asarray(corner))
  assert isinstance(center_jax, jnp.ndarray)
  np.testing.assert_allclose(np.asarray(center_jax), center, atol=1e-7)


def test_corner_to_center_values():
  box = np.array([[0.1, 0.2, 0.5, 0.8]], np.float32)
  np.testing.assert_allclose(box_ops.corner_to_center(box),
                             [[0.3, 0.5, 0.4, 0.6]], atol=1e-7)


def test_pairwise_iou_matches_hand_computation():
  a = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32)
  b = np.array([[1, 1, 2, 2], [5, 5, 6, 6], [0, 0, 2, 2]], np.float32)
  iou = box_ops.pairwise_iou(a, b)
  assert iou.shape == (2, 3)
  eps = box_ops.IOU_EPS
  expected = np.array([[1 / (4 + 1 - 1 + eps), 0, 4 / (4 + eps)],
                       [1 / (4 + 1 - 1 + eps), 0, 1 / (7 + eps)]], np.float32)
  np.testing.assert_allclose(iou, expected, rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b))),
      expected, rtol=1e-6)


def test_inverted_boxes_have_no_area():
  inverted = np.array([[2, 2, 1, 1]], np.float32)
  assert box_ops.area(inverted)[0] == 0
  assert box_ops.pairwise_iou(inverted, inverted)[0, 0] == 0


def test_encode_decode_round_trip():
  rng = np.random.RandomState(1)
  priors = np.concatenate([rng.rand(50, 2), rng.rand(50, 2) * 0.5 + 0.05],
                          axis=1).astype(np.float32)
  boxes = np.concatenate([rng.rand(50, 2), rng.rand(50, 2) * 0.5 + 0.05],
                         axis=1).astype(np.float32)
  loc = box_ops.encode(boxes, priors, 0.1, 0.2)
  np.testing.assert_allclose(loc[:, 0],
                             (boxes[:, 0] - priors[:, 0]) / priors[:, 2] / 0.1,
                             rtol=1e-5)
  np.testing.assert_allclose(loc[:, 3],
                             np.log(boxes[:, 3] / priors[:, 3]) / 0.2, rtol=1e-5)
  np.testing.assert_allclose(box_ops.decode(loc, priors, 0.1, 0.2), boxes,
                             atol=1e-5)
  decoded_jax = box_ops.decode(jnp.asarray(loc), jnp.asarray(priors), 0.1, 0.2)
  np.testing.assert_allclose(np.asarray(decoded_jax), boxes, atol=1e-5)
