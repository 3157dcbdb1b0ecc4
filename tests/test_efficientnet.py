"""EfficientNet-B3-SSD300: structure, layers and parity with the reference."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import efficientnet_b3_ssd300_voc
from ssd_jax import priors as priors_lib
from ssd_jax.models import efficientnet
from ssd_jax.models import layers
from ssd_jax.models import ssd

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


def test_same_padding_is_tf_style():
  assert efficientnet.same_padding(300, 3, 2) == (0, 1)
  assert efficientnet.same_padding(75, 5, 2) == (1, 2)
  assert efficientnet.same_padding(38, 3, 2) == (0, 1)
  assert efficientnet.same_padding(19, 5, 1) == (2, 2)
  assert efficientnet.same_padding(19, 1, 1) == (0, 0)


@pytest.mark.parametrize('size,kernel,stride', [(300, 3, 2), (75, 5, 2),
                                                (19, 5, 1), (10, 3, 2)])
def test_same_padded_convs_match_torch(size, kernel, stride):
  """Our 'SAME' convs against torch with the reference's explicit F.pad."""
  torch = pytest.importorskip('torch')
  rng = np.random.RandomState(size + kernel)
  x = rng.randn(2, size, size, 6).astype(np.float32)
  dense = rng.randn(kernel, kernel, 6, 4).astype(np.float32)
  depthwise = rng.randn(kernel, kernel, 1, 6).astype(np.float32)
  top, bottom = efficientnet.same_padding(size, kernel, stride)
  x_torch = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                    [top, bottom, top, bottom])

  def torch_conv(kernel_hwio, groups):
    out = torch.nn.functional.conv2d(
        x_torch, torch.from_numpy(kernel_hwio.transpose(3, 2, 0, 1)),
        stride=stride, groups=groups)
    return out.numpy().transpose(0, 2, 3, 1)

  ours = layers.conv(jnp.asarray(x), jnp.asarray(dense), (stride, stride),
                     'SAME')
  np.testing.assert_allclose(np.asarray(ours), torch_conv(dense, 1),
                             rtol=1e-5, atol=1e-4)
  ours = layers.depthwise_conv(jnp.asarray(x), jnp.asarray(depthwise),
                               (stride, stride), 'SAME')
  np.testing.assert_allclose(np.asarray(ours), torch_conv(depthwise, 6),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('strides,padding,dilation', [
    ((1, 1), 'SAME', (1, 1)), ((2, 2), 'SAME', (1, 1)),
    ((2, 1), ((1, 0), (2, 1)), (1, 1)), ((1, 1), 'VALID', (2, 2))])
def test_depthwise_conv_equals_grouped_conv(strides, padding, dilation):
  """The CPU shifted-sum path: values and gradients of XLA's grouped conv."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 9, 8, 5), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, 1, 5), jnp.float32)

  def grouped(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=5)

  def ours(x, kernel):
    return layers.depthwise_conv(x, kernel, strides, padding, dilation)

  np.testing.assert_allclose(np.asarray(ours(x, kernel)),
                             np.asarray(grouped(x, kernel)),
                             rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.randn(*grouped(x, kernel).shape), jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), (0, 1))(x, kernel)
  expected = jax.grad(lambda *a: jnp.sum(grouped(*a) * weights), (0, 1))(
      x, kernel)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5,
                               atol=1e-4)


def test_batch_norm_follows_torch_momentum_and_unbiased_running_var():
  torch = pytest.importorskip('torch')
  rng = np.random.RandomState(0)
  x = rng.randn(3, 5, 4, 6).astype(np.float32) * 3 + 1
  reference = torch.nn.BatchNorm2d(6, momentum=0.01, eps=1e-3)
  with torch.no_grad():
    reference.weight.uniform_(0.5, 1.5)
    reference.bias.normal_()
  norm = efficientnet.BatchNorm(6)
  norm.scale.set_value(jnp.asarray(reference.weight.detach().numpy()))
  norm.bias.set_value(jnp.asarray(reference.bias.detach().numpy()))
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for _ in range(2):  # training: batch statistics, running stats updated
    expected = reference(x_torch).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected,
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(norm.mean[...]),
                             reference.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(norm.var[...]),
                             reference.running_var.numpy(), rtol=1e-6)
  reference.eval()
  norm.use_running_average = True
  expected = reference(x_torch).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected,
                             rtol=1e-5, atol=1e-5)


def test_drop_connect_drops_whole_residual_branches_in_training_only():
  spec = efficientnet.BlockSpec(3, 1, 8, 8, 6, 0.25)
  block = efficientnet.MBConvBlock(spec, drop_connect_rate=0.5,
                                   rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1).dropout
  x = jax.random.normal(jax.random.key(2), (64, 5, 5, 8))
  block.eval()
  branch = block(x) - x  # eval: no drop, no scaling
  block.train()
  block.set_attributes(use_running_average=True)  # same BN as in eval
  out = block(x, rngs=rngs) - x
  kept = np.asarray(jnp.all(jnp.isclose(out, 2 * branch, atol=1e-5),
                            axis=(1, 2, 3)))
  dropped = np.asarray(jnp.all(out == 0, axis=(1, 2, 3)))
  assert np.all(kept ^ dropped)  # per example: all of it x 1/keep, or none
  assert 16 < kept.sum() < 48
  assert not np.array_equal(np.asarray(block(x, rngs=rngs) - x), out)


def _recipe_state_dict():
  """The README's deterministic weights for NAME, in module order."""
  with open(os.path.join(FIXTURES, f'{NAME}_shapes.json')) as f:
    shapes = json.load(f)
  first_conv = next(k for k, s in shapes.items() if len(s) == 4)
  state_dict = {}
  for k, key in enumerate(sorted(shapes)):
    shape = tuple(shapes[key])
    rs = np.random.RandomState(4000 + k)
    if key.endswith('num_batches_tracked'):
      value = np.zeros(shape, np.int64)
    elif key.endswith('running_mean'):
      value = rs.normal(0, 0.1, shape)
    elif key.endswith('running_var'):
      value = rs.uniform(0.5, 1.5, shape)
    elif key.endswith('.weight') and len(shape) == 1:
      value = rs.uniform(0.5, 1.5, shape)
    elif key.endswith('.weight'):
      std = np.sqrt(1 / np.prod(shape[1:]))
      value = rs.normal(0, std * (0.02 if key == first_conv else 1), shape)
    else:
      value = rs.normal(0, 0.01, shape)
    state_dict[key] = value.astype(np.float32) if value.dtype == np.float64 \
        else value
  return {key: state_dict[key] for key in shapes}
