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
from ssd_jax.core import priors as priors_lib
from ssd_jax.evaluation import workdir as workdir_eval
from ssd_jax.interop import torch_import
from ssd_jax.models import backbones
from ssd_jax.models import layers
from tests import recipe
from tests.reference_data import load_fixture
from tests.tiny import assert_bfloat16_close_to_float32
from tests.tiny import tiny_mobilenet_config
from tests.tiny import tiny_mobilenet_shapes_config
from tests.tiny import train_and_check

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
  """bf16 compute: float32 parameters, BatchNorm statistics updated in
  float32 in training mode, eval outputs close to the float32 model's."""
  config = tiny_mobilenet_config(name)
  config.model.dtype = 'bfloat16'
  model = recipe.recipe_model(config)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3)) * 50

  def updated_statistics(model, images):
    model.train()
    model(images)
    return nnx.state(model, nnx.BatchStat)

  stats = jax.tree.leaves(nnx.eval_shape(updated_statistics, model, images))
  assert stats and all(x.dtype == jnp.float32 for x in stats)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert_bfloat16_close_to_float32(model, config, images)


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_batch_norm_follows_pytorch(cpu_kernels):
  """Values, running statistics and gradients of torch's BatchNorm2d, with
  the CPU kernels' hand-written gradient and with plain XLA."""
  torch = pytest.importorskip('torch')
  rs = np.random.RandomState(0)
  x = rs.normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
  cotangent = rs.normal(0, 1, x.shape).astype(np.float32)
  ours = layers.BatchNorm(6, eps=1e-3, momentum=0.01)
  theirs = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)
  ours.scale[...] = jnp.asarray(rs.uniform(0.5, 1.5, 6), jnp.float32)
  ours.bias[...] = jnp.asarray(rs.uniform(-1, 1, 6), jnp.float32)
  theirs.weight.data = torch.from_numpy(np.array(ours.scale[...]))
  theirs.bias.data = torch.from_numpy(np.array(ours.bias[...]))

  def loss(model, x):
    with layers.cpu_kernels(cpu_kernels):
      y = model(x)
    return jnp.sum(y * cotangent), y

  for _ in range(2):  # training mode: batch statistics, running update
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    (_, y), (model_grads, x_grad) = nnx.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(ours, jnp.asarray(x))
    expected = theirs(x_torch)
    (expected * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum(
        ).backward()
    np.testing.assert_allclose(
        np.asarray(y), expected.detach().numpy().transpose(0, 2, 3, 1),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_grad),
                               x_torch.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model_grads.scale[...]),
                               theirs.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(model_grads.bias[...]),
                               theirs.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    theirs.zero_grad()
  np.testing.assert_allclose(np.asarray(ours.mean[...]),
                             theirs.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.var[...]),
                             theirs.running_var.numpy(), rtol=1e-5)
  ours.eval()  # nnx's eval(): running statistics
  theirs.eval()
  np.testing.assert_allclose(
      np.asarray(ours(jnp.asarray(x))),
      theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy(
          ).transpose(0, 2, 3, 1),
      rtol=1e-5, atol=1e-5)


def _imagenet_file(model, keep, extra_shapes, seed=0):
  """A state dict in an ImageNet checkpoint's layout: our backbone's keys
  for which keep(key) holds (PyTorch shapes), plus `extra_shapes` (keys the
  reference's backbone does not have) and num_batches_tracked buffers."""
  rs = np.random.RandomState(seed)
  state_dict = {}
  for key, (variable, kind) in model.backbone.torch_entries('').items():
    if keep(key):
      state_dict[key] = rs.normal(
          0, 1, recipe.torch_shape(variable, kind)).astype(np.float32)
      if key.endswith('running_var'):
        state_dict[key[:-len('running_var')] + 'num_batches_tracked'] = (
            np.array(7, np.int64))
  for key, shape in extra_shapes.items():
    state_dict[key] = rs.normal(0, 1, shape).astype(np.float32)
  return state_dict


def _backbone_values(model):
  return {key: np.asarray(variable[...]) for key, (variable, _) in
          model.backbone.torch_entries('').items()}


def test_mobilenet_v2_imagenet_weights_load_like_the_reference(tmp_path):
  """torchvision's mobilenet_v2 file has `features.0-18` (= the reference's
  `features`) and `classifier.1`; load_state_dict(strict=False) takes every
  `features` key, skips the classifier and leaves the extras as they are."""
  config = tiny_mobilenet_config('mobilenet_v2')
  model = recipe.recipe_model(config)
  before = _backbone_values(model)
  features = sorted(k for k in before if k.startswith('features.'))
  assert features[0] == 'features.0.0.weight' and any(
      k.startswith('features.18.') for k in features)
  state_dict = _imagenet_file(
      model, lambda k: k.startswith('features.'),
      {'classifier.1.weight': (1000, 1280), 'classifier.1.bias': (1000,)})
  taken = torch_import.load_backbone_state_dict_non_strict(model, state_dict)
  assert sorted(taken) == features
  after = _backbone_values(model)
  for key in before:
    if key.startswith('extras.'):
      np.testing.assert_array_equal(after[key], before[key])
  np.testing.assert_array_equal(  # OIHW -> HWIO, depthwise [C,1,3,3] -> [3,3,1,C]
      after['features.1.conv.0.0.weight'],
      state_dict['features.1.conv.0.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(after['features.18.1.running_var'],
                                state_dict['features.18.1.running_var'])
  wrong = dict(state_dict)
  wrong['features.2.conv.2.weight'] = np.zeros((24, 96, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'features.2.conv.2.weight has shape'):
    torch_import.load_backbone_state_dict_non_strict(model, wrong)
  with pytest.raises(ValueError, match='no key fits'):
    torch_import.load_backbone_state_dict_non_strict(
        model, {'fc.weight': np.zeros((1000, 2048))})
  # Through a file and the backbone-name dispatch the trainer uses.
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'mobilenet_v2-b0353104.pth')
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in
              state_dict.items()}, path)
  assert sorted(torch_import.load_pretrained_backbone(model, path,
                                                      config)) == features


def test_mobilenet_v3_imagenet_weights_load_like_the_reference():
  """d-li14's mobilenetv3-large file has `features.0-15` (stem and blocks),
  its last 1x1 conv as `conv.*` and `classifier.*`. The reference's
  MobileNetV3 appends that conv to `features` (features.16), so
  load_state_dict(strict=False) takes features.0-15 only: features.16 and
  the extras keep their initialisation."""
  config = tiny_mobilenet_config('mobilenet_v3')
  model = recipe.recipe_model(config)
  before = _backbone_values(model)
  blocks = sorted(k for k in before if k.startswith('features.')
                  and not k.startswith('features.16.'))
  state_dict = _imagenet_file(
      model, lambda k: k in blocks,
      {'conv.0.weight': (960, 160, 1, 1), 'conv.1.weight': (960,),
       'conv.1.bias': (960,), 'conv.1.running_mean': (960,),
       'conv.1.running_var': (960,), 'classifier.0.weight': (1280, 960),
       'classifier.0.bias': (1280,), 'classifier.3.weight': (1000, 1280),
       'classifier.3.bias': (1000,)})
  taken = torch_import.load_backbone_state_dict_non_strict(model, state_dict)
  assert sorted(taken) == blocks
  after = _backbone_values(model)
  for key in before:
    if key.startswith(('features.16.', 'extras.')):
      np.testing.assert_array_equal(after[key], before[key])
  np.testing.assert_array_equal(  # Linear [out, in] -> [in, out]
      after['features.4.conv.5.fc.0.weight'],
      state_dict['features.4.conv.5.fc.0.weight'].T)


def test_mobilenet_trains_and_evaluates_end_to_end(tmp_path):
  """MobileNetV3-SSDLite through the trainer on shapes data: finite losses,
  checkpoints, the evaluation JSON; then restored by the evaluator alone."""
  pytest.importorskip('tensorflow')  # the input pipeline
  config = tiny_mobilenet_shapes_config(tmp_path / 'shapes', 'mobilenet_v3',
                                        num_train=16, num_test=4)
  config.solver.max_iter = 4
  config.save_step = 2
  workdir = tmp_path / 'run'
  result = train_and_check(config, workdir)
  restored = workdir_eval.evaluate_workdir(config, str(workdir))
  assert restored['voc_2007_test']['map'] == pytest.approx(result['map'])


def test_shapes_demo_mobilenet_config_is_valid():
  from configs import shapes_demo_mobilenet  # pylint: disable=g-import-not-at-top
  config = shapes_demo_mobilenet.get_config()
  models.validate_config(config)
  assert config.model.backbone.name == 'mobilenet_v2'
  assert config.model.box_head.predictor == 'ssdlite'
  assert priors_lib.num_priors(config) == 628
