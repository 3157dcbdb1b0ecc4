import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.models import vgg
from tests.tiny import tiny_config


@nnx.jit
def _forward(model, images):
  return model(images)


@nnx.jit
def _features_and_level0_logits(model, images):
  return model.box_head.cls_headers[0](model.features(images)[0])


def _num_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_ssd300_parameter_count(ssd300_config):
  model = nnx.eval_shape(lambda: models.create_model(ssd300_config))
  assert _num_params(model) == 26_285_486


def test_ssd512_parameter_count(ssd512_config):
  model = nnx.eval_shape(lambda: models.create_model(ssd512_config))
  assert _num_params(model) == 27_188_676


def test_feature_map_sizes(ssd300_config, ssd512_config):
  assert models.feature_map_sizes(ssd300_config) == (38, 19, 10, 5, 3, 1)
  assert models.feature_map_sizes(ssd512_config) == (64, 32, 16, 8, 4, 2, 1)


def test_outputs_follow_prior_order():
  config = tiny_config()
  model = models.create_model(config)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3)) * 50
  cls_logits, bbox_pred = _forward(model, images)
  num_priors = priors_lib.num_priors(config)
  assert cls_logits.shape == (2, num_priors, 4)
  assert bbox_pred.shape == (2, num_priors, 4)
  # Prior index = (level, y, x, box): level 0's cls conv at (y=1, x=2),
  # box 3, class 1 is output row (1 * 8 + 2) * 4 + 3.
  level0 = _features_and_level0_logits(model, images)
  np.testing.assert_allclose(np.asarray(cls_logits[:, (1 * 8 + 2) * 4 + 3, 1]),
                             np.asarray(level0[:, 1, 2, 3 * 4 + 1]), rtol=1e-6)


def test_initialisation_as_reference():
  config = tiny_config()
  model = models.create_model(config)
  assert np.all(np.asarray(model.backbone.l2_norm.weight[...]) == 20.0)
  for conv in list(model.backbone.extras) + list(model.box_head.cls_headers):
    assert np.all(np.asarray(conv.bias[...]) == 0)
    kh, kw, i, o = conv.kernel.shape
    limit = np.sqrt(6.0 / (kh * kw * (i + o)))  # xavier uniform
    assert np.abs(np.asarray(conv.kernel[...])).max() <= limit
  first = model.backbone.vgg[0]
  bound = 1 / np.sqrt(3 * 3 * 3)  # PyTorch's default conv init
  assert np.abs(np.asarray(first.bias[...])).max() <= bound
  assert np.abs(np.asarray(first.kernel[...])).max() <= bound


def test_l2norm_adds_eps_after_sqrt():
  layer = vgg.L2Norm(3, scale=20.0)
  x = jnp.array([[[[3.0, 4.0, 0.0]]], [[[0.0, 0.0, 0.0]]]])
  out = np.asarray(layer(x))
  np.testing.assert_allclose(out[0, 0, 0], [12.0, 16.0, 0.0], rtol=1e-6)
  assert np.all(out[1] == 0)


def test_ceil_mode_pool_and_pool5():
  x = jnp.arange(75 * 75, dtype=jnp.float32).reshape(1, 75, 75, 1)
  pooled = vgg.max_pool(x, 2, 2, ceil_mode=True)
  assert pooled.shape == (1, 38, 38, 1)
  assert float(pooled[0, 37, 37, 0]) == 75 * 75 - 1  # the lone last pixel
  assert vgg.max_pool(x, 2, 2).shape == (1, 37, 37, 1)
  assert vgg.max_pool(x, 3, 1, padding=1).shape == (1, 75, 75, 1)


def test_validate_config_names_the_problem():
  config = tiny_config()
  config.model.priors.feature_maps = (8, 4, 2, 2)
  with pytest.raises(ValueError, match='feature_maps'):
    models.create_model(config)
  config = tiny_config()
  config.model.backbone.out_channels = (32, 64, 32, 16)
  with pytest.raises(ValueError, match='out_channels'):
    models.create_model(config)
  config = tiny_config()
  config.model.priors.boxes_per_location = (4, 4, 4, 4)
  with pytest.raises(ValueError, match='boxes_per_location'):
    models.create_model(config)


def test_batch_norm_option_for_reduced_backbones():
  config = tiny_config()
  config.model.backbone.batch_norm = True
  model = models.create_model(config)
  assert len(model.backbone.norms) == len(model.backbone.vgg)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  before = np.asarray(model.backbone.norms[0].mean[...]).copy()
  model.train()
  _forward(model, images)
  assert not np.allclose(np.asarray(model.backbone.norms[0].mean[...]), before)
  model.eval()
  out_a = _forward(model, images)[0]
  out_b = _forward(model, images)[0]
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_bfloat16_compute_keeps_float32_params():
  config = tiny_config()
  config.model.dtype = 'bfloat16'
  model = models.create_model(config)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3)) * 50
  cls_bf16, box_bf16 = _forward(model, images)
  assert cls_bf16.dtype == jnp.bfloat16 and box_bf16.dtype == jnp.bfloat16
  config.model.dtype = 'float32'
  reference = models.create_model(config)
  cls_f32, box_f32 = _forward(reference, images)
  scale = float(jnp.abs(cls_f32).max())
  assert float(jnp.abs(cls_bf16.astype(jnp.float32) - cls_f32).max()) < 0.05 * scale
  scale = float(jnp.abs(box_f32).max())
  assert float(jnp.abs(box_bf16.astype(jnp.float32) - box_f32).max()) < 0.05 * scale


@pytest.mark.parametrize('size,ceil_mode', [(12, False), (75, True), (9, True),
                                            (9, False)])
def test_tiled_max_pool_gradient_equals_xla(size, ceil_mode):
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, size, size, 3), jnp.float32)
  x = x.at[0, 0, 0, 0].set(x[0, 0, 1, 0])  # a tie: the first one gets it

  def reference(x):
    out = -(-(size - 2) // 2) + 1 if ceil_mode else (size - 2) // 2 + 1
    extra = max((out - 1) * 2 + 2 - size, 0) if ceil_mode else 0
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                 (1, 2, 2, 1),
                                 ((0, 0), (0, extra), (0, extra), (0, 0)))

  ours = vgg.max_pool(x, 2, 2, ceil_mode=ceil_mode)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference(x)))
  grad = jax.grad(lambda x: jnp.sum(vgg.max_pool(x, 2, 2, ceil_mode=ceil_mode)
                                    * jnp.arange(1.0, 4.0)))(x)
  expected = jax.grad(lambda x: jnp.sum(reference(x) * jnp.arange(1.0, 4.0)))(x)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(expected))
