"""The CPU-kernels switch: GPU graphs are plain XLA; both paths match the reference.

`layers.cpu_kernels` decides whether the model uses its CPU-only custom-VJP
kernels (Winograd, the bias gradient, the tiled max-pool gradient, the
depthwise convolution and BatchNorm gradients of the MobileNets). These
tests check that with them off the train step's jaxpr holds no custom VJP
and is exactly the jaxpr of the same step with each kernel replaced by its
plain XLA definition, and that the step built for CPU devices has them on.
The train-step parity test runs the SSD300 train step on both paths against
the reference trainer (fixtures/train_step.npz).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.models import layers
from ssd_jax.models import vgg
from ssd_jax.models import winograd
from ssd_jax.runtime import kernels
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib
from ssd_jax.training import optim
from ssd_jax.training import train_step as train_step_lib
from tests import train_step_parity
from tests.reference_data import load_fixture


def custom_vjp_functions(jaxpr):
  """Names of the functions of every custom_vjp_call in `jaxpr`, nested too."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'custom_vjp_call':
      info = eqn.params['call_jaxpr'].jaxpr.debug_info
      names.append(info.func_src_info.split(' ')[0])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names += custom_vjp_functions(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names += custom_vjp_functions(sub)
  return names


def abstract_train_state(config, tx):
  """SSD train state of `config` as shapes only (nothing initialised)."""
  model = nnx.eval_shape(lambda: models.create_model(config))
  model_def, params, model_state = variables_lib.split_model(model)
  state = train_step_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      model_state=model_state, opt_state=jax.eval_shape(tx.init, params))
  return model_def, state


def train_step_jaxpr(config, cpu_kernels):
  tx = optim.create_optimizer(config)
  model_def, state = abstract_train_state(config, tx)
  mesh = sharding.create_mesh(jax.devices()[:1])
  step = train_step_lib.make_train_step(config, model_def, tx, mesh,
                                   cpu_kernels=cpu_kernels)
  b, s, m = 2, config.input.image_size, config.data.max_boxes
  batch = {'image': jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
           'boxes': jax.ShapeDtypeStruct((b, m, 4), jnp.float32),
           'labels': jax.ShapeDtypeStruct((b, m), jnp.int32),
           'mask': jax.ShapeDtypeStruct((b, m), jnp.bool_)}
  return step.trace(state, batch).jaxpr


def test_cpu_kernels_context_overrides_the_backend_default():
  assert layers.cpu_kernels_enabled() == (jax.default_backend() == 'cpu')
  with layers.cpu_kernels(False):
    assert not layers.cpu_kernels_enabled()
    with layers.cpu_kernels(True):
      assert layers.cpu_kernels_enabled()
    assert not layers.cpu_kernels_enabled()
  assert layers.cpu_kernels_enabled() == (jax.default_backend() == 'cpu')


def forward_jaxpr(config, cpu_kernels):
  model = nnx.eval_shape(lambda: models.create_model(config))
  graph_def, state = nnx.split(model)
  size = config.input.image_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

  def forward(state, images):
    with layers.cpu_kernels(cpu_kernels):
      return nnx.merge(graph_def, state)(images)

  return jax.make_jaxpr(forward)(state, images)


def test_forward_without_cpu_kernels_has_no_custom_vjp(ssd300_config):
  assert custom_vjp_functions(forward_jaxpr(ssd300_config, False).jaxpr) == []
  with_kernels = custom_vjp_functions(
      forward_jaxpr(ssd300_config, True).jaxpr)
  # SSD300: Winograd from conv2_1 to conv5_3 (11 convs) and for the six
  # heads, a bias gradient per conv (15 VGG + 8 extras + 6 heads), pools 1-4
  # tiled (pool5 is 3x3/1: XLA's).
  assert with_kernels.count('conv3x3') == 11 + 6
  assert with_kernels.count('_add_bias_fast_gradient') == 15 + 8 + 6
  assert with_kernels.count('_tiled_max_pool') == 4
  assert len(with_kernels) == 17 + 29 + 4


def test_train_step_without_cpu_kernels_is_the_plain_model(ssd300_config,
                                                           monkeypatch):
  plain = str(train_step_jaxpr(ssd300_config, cpu_kernels=False))
  assert 'custom_vjp' not in plain
  assert str(train_step_jaxpr(ssd300_config, cpu_kernels=True)) != plain

  # The kernels replaced by their plain XLA definitions: the same program.
  def direct_conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(1, 1),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def reduce_window_max_pool(x, window, pads):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                                 (1, window, window, 1),
                                 (1, window, window, 1), pads)

  monkeypatch.setattr(winograd, 'conv3x3', direct_conv3x3)
  monkeypatch.setattr(layers, '_add_bias_fast_gradient', lambda x, b: x + b)
  monkeypatch.setattr(vgg, '_tiled_max_pool', reduce_window_max_pool)
  substituted = str(train_step_jaxpr(ssd300_config, cpu_kernels=True))
  assert substituted == plain


def test_mobilenet_train_step_kernels_only_on_the_cpu_path():
  """The MobileNets' CPU kernels (depthwise convolution, BatchNorm gradient;
  V2 and V3 build them from the same layers) are in the CPU train step and
  absent from the plain (GPU) one."""
  from tests.tiny import tiny_mobilenet_config  # pylint: disable=g-import-not-at-top
  config = tiny_mobilenet_config('mobilenet_v2')
  assert custom_vjp_functions(forward_jaxpr(config, False).jaxpr) == []
  with_kernels = custom_vjp_functions(forward_jaxpr(config, True).jaxpr)
  assert '_depthwise_taps' in with_kernels
  assert '_batch_norm_fast_gradient' in with_kernels
  plain = str(train_step_jaxpr(config, cpu_kernels=False))
  assert 'custom_vjp' not in plain
  assert str(train_step_jaxpr(config, cpu_kernels=True)) != plain


def test_steps_choose_the_kernels_by_device_platform(monkeypatch):
  chosen = []
  real = layers.cpu_kernels

  def recording(enabled):
    chosen.append(enabled)
    return real(enabled)

  monkeypatch.setattr(layers, 'cpu_kernels', recording)
  from tests.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  train_step_jaxpr(config, cpu_kernels=None)
  assert chosen == [all(d.platform == 'cpu' for d in jax.devices())]
  assert kernels.compiler_options('gpu') is None


@pytest.fixture(scope='module')
def train_step_fixture():
  return load_fixture('train_step.npz')


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_train_step_equals_reference_trainer(ssd300_config, train_step_fixture,
                                             cpu_kernels):
  config = train_step_parity.reference_config(ssd300_config)
  np.testing.assert_allclose(
      [optim.learning_rate_at(config, i) for i in range(3)],
      train_step_fixture['lrs'], rtol=1e-12)
  result = train_step_parity.check(config, train_step_fixture, cpu_kernels)
  for iteration, (worst, ratio) in result['worst_update_ratio'].items():
    print(f'iteration {iteration}, cpu_kernels={cpu_kernels}: largest update '
          f'error / f32-vs-f64 distance {ratio:.2f} ({worst})')
  assert result['losses_ok'], result['loss_errors']
  assert result['ok'], result['worst_update_ratio']
