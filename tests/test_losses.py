import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax.core import losses
from tests.reference_data import load_fixture


@pytest.fixture(scope='module')
def ref():
  return load_fixture('loss.npz')


def _loss_and_mask(confidence, locations, labels, gt_locations):
  reg, cls = jax.jit(losses.multibox_loss)(
      confidence, locations, labels.astype(np.int32), gt_locations)
  log_probs = jax.nn.log_softmax(confidence, axis=-1)
  mask = losses.hard_negative_mask(-log_probs[..., 0], labels > 0, 3)
  return float(reg), float(cls), np.asarray(mask)


def test_loss_case1_equals_reference(ref):
  reg, cls, mask = _loss_and_mask(ref['confidence'], ref['predicted_locations'],
                                  ref['labels'], ref['gt_locations'])
  np.testing.assert_allclose(reg, ref['reg_loss'], rtol=1e-5)
  np.testing.assert_allclose(cls, ref['cls_loss'], rtol=1e-5)
  np.testing.assert_allclose(reg, ref['reg_loss_f64'], rtol=1e-6)
  np.testing.assert_allclose(cls, ref['cls_loss_f64'], rtol=1e-6)
  np.testing.assert_array_equal(mask, ref['mask'])
  np.testing.assert_array_equal(mask.sum(1), [840, 60, 60])


def test_loss_with_an_empty_image_equals_reference(ref):
  reg, cls, mask = _loss_and_mask(ref['confidence'], ref['predicted_locations'],
                                  ref['labels2'], ref['gt_locations2'])
  np.testing.assert_allclose(reg, ref['reg_loss2'], rtol=1e-5)
  np.testing.assert_allclose(cls, ref['cls_loss2'], rtol=1e-5)
  np.testing.assert_allclose(cls, ref['cls_loss2_f64'], rtol=1e-6)
  np.testing.assert_array_equal(mask, ref['mask2'])
  np.testing.assert_array_equal(mask.sum(1), [84, 0, 32])


def test_batch_without_positives_gives_zero_loss_and_gradient(ref):
  # The reference returns NaN here (0 / 0); we return 0 (SPEC decision 2).
  assert np.isnan(ref['reg_loss3']) and np.isnan(ref['cls_loss3'])
  labels = np.zeros(ref['labels'].shape, np.int32)

  def total(confidence, locations):
    reg, cls = losses.multibox_loss(confidence, locations, labels,
                                    ref['gt_locations'])
    return reg + cls

  value, grads = jax.value_and_grad(total, argnums=(0, 1))(
      jnp.asarray(ref['confidence']), jnp.asarray(ref['predicted_locations']))
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_gradients_are_finite_and_only_on_selected_priors(ref):
  labels = ref['labels'].astype(np.int32)

  def total(confidence, locations):
    reg, cls = losses.multibox_loss(confidence, locations, labels,
                                    ref['gt_locations'])
    return reg + cls

  g_conf, g_loc = jax.grad(total, argnums=(0, 1))(
      jnp.asarray(ref['confidence']), jnp.asarray(ref['predicted_locations']))
  g_conf, g_loc = np.asarray(g_conf), np.asarray(g_loc)
  assert np.all(np.isfinite(g_conf)) and np.all(np.isfinite(g_loc))
  selected = np.abs(g_conf).sum(-1) > 0
  np.testing.assert_array_equal(selected, ref['mask'])
  np.testing.assert_array_equal(np.abs(g_loc).sum(-1) > 0, labels > 0)


def test_smooth_l1_beta_one():
  d = jnp.array([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0])
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(d)),
                             [1.5, 0.125, 0.0, 0.125, 0.5, 2.5])


def test_bfloat16_logits_are_scored_in_float32(ref):
  reg, cls = losses.multibox_loss(
      jnp.asarray(ref['confidence'], jnp.bfloat16),
      jnp.asarray(ref['predicted_locations'], jnp.bfloat16),
      ref['labels'].astype(np.int32), ref['gt_locations'])
  assert reg.dtype == jnp.float32 and cls.dtype == jnp.float32
  np.testing.assert_allclose(float(cls), ref['cls_loss'], rtol=2e-2)
  np.testing.assert_allclose(float(reg), ref['reg_loss'], rtol=2e-2)
