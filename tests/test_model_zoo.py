"""The reference's model zoo: every config against fixtures/models/.

Each reference config builds here with the reference's priors and parameter
count, takes the reference's state dict (the fixtures' recipe weights,
BatchNorm statistics included) and, where the fixture stores them, gives the
reference's head outputs.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax import priors as priors_lib
from ssd_jax import torch_import
from ssd_jax.models import backbones
from ssd_jax.models import layers
from tests import recipe
from tests.reference_data import load_fixture
from tests.tiny import tiny_mobilenet_config

# fixture name -> (our config module, trainable parameters in the fixtures'
# README table, whether the fixture holds head outputs).
ZOO = {
    'mobilenet_v2_ssd320_voc0712': ('mobilenet_v2_ssd320_voc', 3_304_708, True),
    'mobilenet_v3_ssd320_voc0712': ('mobilenet_v3_ssd320_voc', 3_860_436, True),
    'efficient_net_b3_ssd300_voc0712': (
        'efficientnet_b3_ssd300_voc', 12_656_262, True),
    'vgg_ssd300_coco_trainval35k': ('ssd300_coco', 34_305_206, False),
    'vgg_ssd512_coco_trainval35k': ('ssd512_coco', 36_038_196, False),
    'vgg_ssd512_voc0712': ('ssd512_voc', 27_188_676, True),
}


def zoo_config(name):
  module, _, _ = ZOO[name]
  try:
    config = importlib.import_module(f'configs.{module}').get_config()
  except ModuleNotFoundError as e:
    if e.name == f'configs.{module}':
      pytest.skip(f'configs/{module}.py is not in this checkout')
    raise
  config.model.backbone.pretrained = ''
  return config


@nnx.jit
def _forward_with_features(model, images):
  features = model.features(images)
  return model.box_head(features), features


@nnx.jit
def _forward(model, images):
  return model(images)


def _num_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('name', sorted(ZOO))
def test_config_matches_reference(name):
  """Priors, parameter count, the reference state dict (strict import) and,
  where stored, the head outputs within 1e-4 of their magnitude."""
  config = zoo_config(name)
  ref = load_fixture(f'models/{name}.npz')
  np.testing.assert_allclose(priors_lib.generate_priors(config), ref['priors'],
                             rtol=0, atol=1e-6)
  model = nnx.eval_shape(lambda: models.create_model(config))
  assert _num_params(model) == ZOO[name][1]
  # Strict: every key (parameters and BatchNorm buffers) fits, none is left.
  torch_import.load_detector_state_dict(
      model, recipe.model_recipe_state_dict(name), name)
  if not ZOO[name][2]:
    return
  model.eval()
  images = jnp.asarray(recipe.model_input(name, config.input.image_size))
  with jax.default_matmul_precision('highest'):
    (cls_logits, bbox_pred), features = _forward_with_features(model, images)
  for ours, theirs in ((cls_logits, ref['cls_logits']),
                       (bbox_pred, ref['bbox_pred'])):
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0,
                               atol=1e-4 * np.abs(theirs).max())
  np.testing.assert_allclose([float(jnp.abs(f).mean()) for f in features],
                             ref['feat_absmean'], rtol=1e-4)


def test_unknown_backbone_and_predictor_are_clear_errors():
  config = zoo_config('mobilenet_v2_ssd320_voc0712')
  config.model.backbone.name = 'mobilenet_v9'
  with pytest.raises(ValueError, match=r"'mobilenet_v9'.*valid names: "
                     r'efficientnet_b3, mobilenet_v2, mobilenet_v3, vgg'):
    models.create_model(config)
  config = zoo_config('mobilenet_v2_ssd320_voc0712')
  config.model.box_head.predictor = 'ssdheavy'
  with pytest.raises(ValueError, match="'ssdheavy'.*valid names: ssd, ssdlite"):
    models.create_model(config)
  assert set(backbones.BACKBONES) == {'vgg', 'mobilenet_v2', 'mobilenet_v3',
                                      'efficientnet_b3'}


def test_mobilenet_priors_must_fit_the_backbone():
  config = zoo_config('mobilenet_v3_ssd320_voc0712')
  config.input.image_size = 300  # 19, 10, 5, 3, 2, 1: not the 320 priors
  with pytest.raises(ValueError, match=r"feature maps \(19, 10, 5, 3, 2, 1\) "
                     r"with backbone 'mobilenet_v3'"):
    models.validate_config(config)


@pytest.mark.parametrize('name', ['mobilenet_v2', 'mobilenet_v3'])
def test_bfloat16_keeps_batch_norm_statistics_float32(name):
  config = tiny_mobilenet_config(name)
  config.model.dtype = 'bfloat16'
  model = models.create_model(config)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3)) * 50
  model.train()  # batch statistics, running averages updated
  cls_train, _ = _forward(model, images)
  assert cls_train.dtype == jnp.bfloat16
  stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert stats and all(x.dtype == jnp.float32 for x in stats)
  assert all(np.isfinite(np.asarray(x)).all() for x in stats)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  model.eval()
  cls_bf16, box_bf16 = _forward(model, images)
  config.model.dtype = 'float32'
  reference = nnx.eval_shape(lambda: models.create_model(config))
  nnx.update(reference, nnx.state(model))  # same weights and statistics
  reference.eval()
  cls_f32, box_f32 = _forward(reference, images)
  for low, high in ((cls_bf16, cls_f32), (box_bf16, box_f32)):
    scale = float(jnp.abs(high).max())
    assert float(jnp.abs(low.astype(jnp.float32) - high).max()) < 0.05 * scale


def test_batch_norm_follows_pytorch():
  torch = pytest.importorskip('torch')
  rs = np.random.RandomState(0)
  x = rs.normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
  ours = layers.BatchNorm(6, eps=1e-3, momentum=0.01)
  theirs = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)
  ours.scale[...] = jnp.asarray(rs.uniform(0.5, 1.5, 6), jnp.float32)
  theirs.weight.data = torch.from_numpy(np.asarray(ours.scale[...]))
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for _ in range(2):  # training mode: batch statistics, running update
    y = ours(jnp.asarray(x))
    expected = theirs(x_torch).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.mean[...]),
                             theirs.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.var[...]),
                             theirs.running_var.numpy(), rtol=1e-5)
  ours.eval()  # nnx's eval(): running statistics
  theirs.eval()
  np.testing.assert_allclose(
      np.asarray(ours(jnp.asarray(x))),
      theirs(x_torch).detach().numpy().transpose(0, 2, 3, 1),
      rtol=1e-5, atol=1e-5)
