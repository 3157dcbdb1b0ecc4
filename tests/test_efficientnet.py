"""EfficientNet-B3-SSD300: structure, layers and parity with the reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import efficientnet_b3_ssd300_voc
from ssd_jax import models
from ssd_jax.interop import torch_import
from ssd_jax.models import efficientnet
from ssd_jax.models import layers
from ssd_jax.training import checkpointing
from tests.tiny import assert_bfloat16_close_to_float32
from tests.tiny import tiny_config
from tests.tiny import tiny_shapes_config
from tests.tiny import train_and_check

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'models')
NAME = 'efficient_net_b3_ssd300_voc0712'


def _config():
  config = efficientnet_b3_ssd300_voc.get_config()
  config.model.backbone.pretrained = ''
  return config


def test_b3_blocks_as_reference():
  stem, specs, stage_ends = efficientnet.block_specs(1.2, 1.4)
  assert stem == 40
  assert len(specs) == 26
  # The reference's INDICES for efficientnet-b3 and its OUT_CHANNELS.
  assert tuple(stage_ends[s] for s in efficientnet.FEATURE_STAGES) == (
      7, 17, 25)
  assert [specs[i].out_filters for i in (7, 17, 25)] == [48, 136, 384]
  assert [s.stride for s in specs].count(2) == 4
  # Rounding: to the nearest multiple of 8, up one if that lost > 10%.
  assert efficientnet.round_filters(320, 1.2) == 384
  assert efficientnet.round_filters(16, 1.2) == 24  # 19.2 -> 16 < 0.9*19.2
  assert efficientnet.round_repeats(3, 1.4) == 5


def _tf_same_padding(size, kernel, stride):
  """The reference's Conv2dSamePadding pads (before, after) on one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


@pytest.mark.parametrize('size,kernel,stride,pads', [
    (300, 3, 2, (0, 1)), (38, 5, 2, (1, 2)), (75, 5, 2, (2, 2)),
    (19, 5, 1, (2, 2)),
    (10, 3, 2, (0, 1))])
def test_same_padded_convs_match_torch(size, kernel, stride, pads):
  """Our 'SAME' convs against torch convs of the input padded as the
  reference pads it: the odd pixel at the bottom / right."""
  torch = pytest.importorskip('torch')
  rng = np.random.RandomState(size + kernel)
  x = rng.randn(2, size, size, 6).astype(np.float32)
  dense = rng.randn(kernel, kernel, 6, 4).astype(np.float32)
  depthwise = rng.randn(kernel, kernel, 1, 6).astype(np.float32)
  top, bottom = _tf_same_padding(size, kernel, stride)
  assert (top, bottom) == pads
  x_torch = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                    [top, bottom, top, bottom])

  def torch_conv(kernel_hwio, groups):
    out = torch.nn.functional.conv2d(
        x_torch, torch.from_numpy(kernel_hwio.transpose(3, 2, 0, 1)),
        stride=stride, groups=groups)
    return out.numpy().transpose(0, 2, 3, 1)

  ours = jax.jit(layers.conv, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(dense), (stride, stride), 'SAME')
  np.testing.assert_allclose(np.asarray(ours), torch_conv(dense, 1),
                             rtol=1e-5, atol=1e-4)
  ours = jax.jit(layers.depthwise_conv, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(depthwise), (stride, stride), 'SAME')
  np.testing.assert_allclose(np.asarray(ours), torch_conv(depthwise, 6),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('strides,padding,dilation,size', [
    ((1, 1), 'SAME', (1, 1), 3), ((2, 2), 'SAME', (1, 1), 3),
    ((2, 1), ((1, 0), (2, 1)), (1, 1), 3), ((1, 1), 'VALID', (2, 2), 3),
    ((2, 2), 'SAME', (1, 1), 5), ((2, 2), ((2, 1), (0, 2)), (2, 1), 5)])
def test_depthwise_conv_equals_grouped_conv(strides, padding, dilation, size):
  """The CPU shifted-sum path and its hand-written gradient: values and
  gradients of XLA's grouped conv (strides, dilations, asymmetric padding,
  padded rows that no output reads)."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 9, 8, 5), jnp.float32)
  kernel = jnp.asarray(rng.randn(size, size, 1, 5), jnp.float32)

  @jax.jit
  def grouped(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=5)

  @jax.jit
  def ours(x, kernel):
    with layers.cpu_kernels(True):
      return layers.depthwise_conv(x, kernel, strides, padding, dilation)

  np.testing.assert_allclose(np.asarray(ours(x, kernel)),
                             np.asarray(grouped(x, kernel)),
                             rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.randn(*grouped(x, kernel).shape), jnp.float32)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * weights),
                           (0, 1)))(x, kernel)
  expected = jax.jit(jax.grad(lambda *a: jnp.sum(grouped(*a) * weights),
                              (0, 1)))(x, kernel)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5,
                               atol=1e-4)


def test_drop_connect_drops_whole_residual_branches_in_training_only():
  spec = efficientnet.BlockSpec(3, 1, 8, 8, 6, 0.25)
  block = efficientnet.MBConvBlock(spec, drop_connect_rate=0.5,
                                   rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1).dropout
  x = jax.random.normal(jax.random.key(2), (64, 5, 5, 8))
  residual = nnx.jit(lambda block, x, rngs: block(x, rngs=rngs) - x)
  block.eval()
  branch = residual(block, x, rngs)  # eval: no drop, no scaling
  block.train()
  block.set_attributes(use_running_average=True)  # same BN as in eval
  out = residual(block, x, rngs)
  kept = np.asarray(jnp.all(jnp.isclose(out, 2 * branch, atol=1e-5),
                            axis=(1, 2, 3)))
  dropped = np.asarray(jnp.all(out == 0, axis=(1, 2, 3)))
  assert np.all(kept ^ dropped)  # per example: all of it x 1/keep, or none
  assert 16 < kept.sum() < 48
  assert not np.array_equal(np.asarray(residual(block, x, rngs)), out)


def _tiny_config(num_classes=4):
  """A reduced EfficientNet (width 0.25, depth 0.5: 10 blocks) on 64 px: feature maps 8, 4, 2 and one extra
  level of 1."""
  config = efficientnet_b3_ssd300_voc.get_config()
  base = tiny_config(num_classes)
  b = config.model.backbone
  b.pretrained = ''
  b.width_coefficient = 0.25
  b.depth_coefficient = 0.5
  b.extras = ((16, 32, 3, 2, 1),)
  b.out_channels = (16, 32, 80, 32)
  config.model.num_classes = num_classes
  config.model.priors = base.model.priors
  config.input.image_size = 64
  config.data = base.data
  config.solver.batch_size = base.solver.batch_size
  return config


@nnx.jit
def _forward(model, images):
  return model(images)


def test_reduced_variant_builds_with_fitting_priors():
  config = _tiny_config()
  assert models.feature_map_sizes(config) == (8, 4, 2, 1)
  model = nnx.eval_shape(lambda: models.create_model(config))
  assert len(model.backbone.blocks) == 10
  assert model.backbone.out_channels == (16, 32, 80, 32)
  assert [b.drop_connect is not None for b in model.backbone.blocks] == [
      False] * 4 + [True, False, True, False, True, False]



def test_train_loss_applies_drop_connect_with_the_step_rngs():
  """The train step's loss gets an RngStream (train_step_lib.loss_and_targets):
  in training, different keys drop different residual branches; no stream
  (or eval mode) is deterministic."""
  from ssd_jax.core import priors as priors_lib  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import synthetic  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  from tests.recipe import recipe_model  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  model = recipe_model(config)
  batch = synthetic.synthetic_batch(config, 4)
  priors = priors_lib.generate_priors(config)

  @nnx.jit
  def loss(model, key):
    rngs = None if key is None else nnx.Rngs(dropout=key).dropout
    return train_step_lib.loss_and_targets(model, batch, priors, config, rngs)[0]

  model.train()
  model.set_attributes(use_running_average=True)  # BN as in eval
  losses = [float(loss(model, jax.random.key(k))) for k in range(4)]
  assert len(set(losses)) > 1
  assert float(loss(model, jax.random.key(0))) == losses[0]
  model.eval()
  assert float(loss(model, jax.random.key(0))) == float(loss(model, None))


def test_bfloat16_keeps_batch_norm_statistics_float32():
  config = _tiny_config()
  config.model.dtype = 'bfloat16'
  model = models.create_model(config)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3)) * 50
  model.train()  # batch statistics, running averages updated
  cls_train, box_train = _forward(model, images)
  assert cls_train.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(box_train, np.float32)).all()
  stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert len(stats) == 2 * 30  # mean and var of 30 BatchNorms
  assert all(x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all()
             for x in stats)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert_bfloat16_close_to_float32(model, config, images)


def test_trains_checkpoints_and_evaluates(tmp_path):
  config = tiny_shapes_config(tmp_path / 'shapes', num_train=8, num_test=4)
  model_config = _tiny_config(len(config.data.class_names)).model
  config.model = model_config
  config.solver.max_iter = 2
  config.save_step = 1
  workdir = tmp_path / 'run'
  train_and_check(config, workdir)
  # The checkpoint holds the BatchNorm statistics, moved by training.
  model = nnx.eval_shape(lambda: models.create_model(config))
  checkpointing.restore_model(checkpointing.Checkpointer(str(workdir)), model,
                              2)
  assert not np.allclose(np.asarray(model.backbone.bn0.var[...]), 1.0)


def test_imagenet_weights_load_as_the_reference_loads_them(tmp_path):
  """The EfficientNet-PyTorch B3 file, non-strictly (as the reference's
  load_state_dict(strict=False)): stem and blocks taken, the ImageNet head
  (_conv_head, _bn1, _fc) skipped, the extra levels keep their init."""
  torch = pytest.importorskip('torch')
  config = _config()
  model = nnx.eval_shape(lambda: models.create_model(config))
  # Concrete values without the (slow, eager) random initialisation.
  arrays = nnx.state(model, nnx.Not(nnx.RngState))
  nnx.update(model, jax.tree.map(lambda a: jnp.full(a.shape, 7.0, a.dtype),
                                 arrays))
  ours = model.backbone.torch_entries('')
  extras = {k for k in ours if k.startswith('extras.')}
  assert len(extras) == 12
  rs = np.random.RandomState(0)
  weights = {}
  for key, (variable, kind) in ours.items():
    if key in extras:
      continue
    shape = tuple(variable.shape)
    if kind in ('conv', 'depthwise'):
      shape = (shape[3], shape[2], shape[0], shape[1])
    weights[key] = rs.normal(0, 0.1, shape).astype(np.float32)
    if key.endswith('running_var'):
      weights[key.replace('running_var', 'num_batches_tracked')] = np.array(0)
  head = {'_conv_head.weight': (1536, 384, 1, 1), '_bn1.weight': (1536,),
          '_bn1.bias': (1536,), '_bn1.running_mean': (1536,),
          '_bn1.running_var': (1536,), '_fc.weight': (1000, 1536),
          '_fc.bias': (1000,)}
  weights.update({k: np.ones(s, np.float32) for k, s in head.items()})
  path = tmp_path / 'efficientnet-b3-c8376fa2.pth'
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
             path)

  taken = torch_import.load_pretrained_backbone(model, str(path), config)
  assert sorted(taken) == sorted(set(ours) - extras)
  stem = np.asarray(model.backbone.conv_stem.kernel[...])
  np.testing.assert_array_equal(stem, weights['_conv_stem.weight'].transpose(
      2, 3, 1, 0))
  depthwise = model.backbone.blocks[25].depthwise_conv.kernel[...]
  np.testing.assert_array_equal(
      np.asarray(depthwise),
      weights['_blocks.25._depthwise_conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(model.backbone.blocks[3].bn1.var[...]),
      weights['_blocks.3._bn1.running_var'])
  for key in extras:
    assert np.all(np.asarray(ours[key][0][...]) == 7.0)

  weights['_blocks.0._se_reduce.weight'] = np.ones((8, 40, 1, 1), np.float32)
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
             path)
  with pytest.raises(ValueError, match=r'_blocks\.0\._se_reduce\.weight'):
    torch_import.load_pretrained_backbone(model, str(path), config)
