"""Winograd convolution, the bias-gradient rewrite and layers.Conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax.models import layers
from ssd_jax.models import winograd


def direct_conv(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def value_and_grads(fn, x, kernel, cotangent):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y,) + vjp(cotangent)


def assert_close_relative(actual, expected, tol):
  scale = np.abs(np.asarray(expected)).max()
  np.testing.assert_array_less(np.abs(np.asarray(actual) - expected).max(),
                               tol * scale)


# Even and odd sizes (odd ones need a partial last tile), one and many
# channels, non-square inputs.
@pytest.mark.parametrize('shape', [(2, 7, 5, 3, 4), (1, 6, 6, 2, 1),
                                   (3, 4, 9, 5, 6), (1, 1, 1, 4, 2),
                                   (2, 19, 19, 16, 24)])
def test_winograd_equals_direct_convolution_and_its_gradients(shape):
  batch, height, width, channels, out_channels = shape
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(batch, height, width, channels), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, channels, out_channels), jnp.float32)
  cotangent = jnp.asarray(rng.randn(batch, height, width, out_channels),
                          jnp.float32)
  expected = value_and_grads(direct_conv, x, kernel, cotangent)
  actual = jax.jit(lambda *a: value_and_grads(winograd.conv3x3, *a))(
      x, kernel, cotangent)
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    assert_close_relative(a, e, 1e-5)


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_add_bias_gradient_is_the_sum_over_all_but_channels(cpu_kernels):
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(3, 5, 7, 6), jnp.float32)
  bias = jnp.asarray(rng.randn(6), jnp.float32)
  dy = jnp.asarray(rng.randn(3, 5, 7, 6), jnp.float32)
  with layers.cpu_kernels(cpu_kernels):
    y, vjp = jax.vjp(layers.add_bias, x, bias)
    jaxpr = str(jax.make_jaxpr(layers.add_bias)(x, bias))
  assert ('custom_vjp_call' in jaxpr) == cpu_kernels
  dx, dbias = vjp(dy)
  np.testing.assert_array_equal(y, x + bias)
  np.testing.assert_array_equal(dx, dy)
  np.testing.assert_allclose(dbias, np.asarray(dy, np.float64).sum((0, 1, 2)),
                             rtol=1e-5, atol=1e-5)


def test_add_bias_gradient_in_bfloat16_keeps_the_bias_dtype():
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  bias = jnp.zeros((8,), jnp.bfloat16)
  with layers.cpu_kernels(True):
    _, vjp = jax.vjp(layers.add_bias, x, bias)
  _, dbias = vjp(jnp.ones_like(x))
  assert dbias.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dbias.astype(jnp.float32), 32.0)


def test_use_winograd_only_for_wide_3x3_stride_1_float32_cpu_kernels():
  same = ((1, 1), (1, 1))
  with layers.cpu_kernels(True):
    assert layers.use_winograd((3, 3, 256, 256), (1, 1), same, (1, 1),
                               jnp.float32)
    # conv2_1 (64 -> 128: harmonic mean 85) gains, conv1_2 (64 -> 64) loses.
    assert layers.use_winograd((3, 3, 64, 128), (1, 1), [[1, 1], [1, 1]],
                               (1, 1), 'float32')
    assert not layers.use_winograd((3, 3, 64, 64), (1, 1), same, (1, 1),
                                   jnp.float32)
    assert not layers.use_winograd((3, 3, 256, 256), (2, 2), same, (1, 1),
                                   jnp.float32)
    assert not layers.use_winograd((3, 3, 512, 1024), (1, 1),
                                   ((6, 6), (6, 6)), (6, 6), jnp.float32)
    assert not layers.use_winograd((3, 3, 256, 256), (1, 1), 'VALID', (1, 1),
                                   jnp.float32)
    assert not layers.use_winograd((1, 1, 256, 256), (1, 1), 'SAME', (1, 1),
                                   jnp.float32)
    assert not layers.use_winograd((3, 3, 256, 256), (1, 1), same, (1, 1),
                                   jnp.bfloat16)
  with layers.cpu_kernels(False):
    assert not layers.use_winograd((3, 3, 256, 256), (1, 1), same, (1, 1),
                                   jnp.float32)


@pytest.mark.parametrize('cpu_kernels', [True, False])
@pytest.mark.parametrize('kwargs,winograd_kernel', [
    (dict(in_features=64, out_features=128, kernel_size=(3, 3),
          padding=((1, 1), (1, 1))), True),  # conv2_1's widths: Winograd
    (dict(in_features=8, out_features=16, kernel_size=(3, 3), strides=(2, 2),
          padding=((1, 1), (1, 1))), False),
    (dict(in_features=8, out_features=16, kernel_size=(3, 3),
          padding=((6, 6), (6, 6)), kernel_dilation=(6, 6)), False),
    (dict(in_features=8, out_features=16, kernel_size=(1, 1)), False),
])
def test_conv_equals_nnx_conv_with_the_same_parameters(kwargs, winograd_kernel,
                                                      cpu_kernels):
  ours = layers.Conv(**kwargs, bias_init=nnx.initializers.normal(1.0),
                     rngs=nnx.Rngs(0))
  reference = nnx.Conv(**kwargs, rngs=nnx.Rngs(1))
  nnx.update(reference, nnx.state(ours))
  x = jnp.asarray(np.random.RandomState(3).randn(2, 10, 10,
                                                 kwargs['in_features']),
                  jnp.float32)

  def loss(model, x):
    return jnp.sum(model(x) ** 2)

  with layers.cpu_kernels(cpu_kernels):
    our_loss, our_grads = nnx.value_and_grad(loss)(ours, x)
    jaxpr = jax.make_jaxpr(lambda x: ours(x))(x)
  # Which path ran: Winograd's and add_bias' custom VJPs, or plain XLA.
  functions = [eqn.params['call_jaxpr'].jaxpr.debug_info.func_src_info
               for eqn in jaxpr.eqns if eqn.primitive.name == 'custom_vjp_call']
  assert any('conv3x3' in f for f in functions) == (
      winograd_kernel and cpu_kernels)
  assert len(functions) == cpu_kernels * (1 + (winograd_kernel and cpu_kernels))
  ref_loss, ref_grads = nnx.value_and_grad(loss)(reference, x)
  np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5)
  for name in ('kernel', 'bias'):
    assert_close_relative(our_grads[name][...], ref_grads[name][...], 1e-5)


def test_conv_without_bias_and_unsupported_options():
  conv = layers.Conv(4, 8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     rngs=nnx.Rngs(0))
  x = jnp.ones((1, 5, 5, 4), jnp.float32)
  np.testing.assert_allclose(conv(x), direct_conv(x, conv.kernel[...]),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='feature groups'):
    layers.Conv(4, 8, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='input dilation'):
    layers.Conv(4, 8, (3, 3), input_dilation=2, rngs=nnx.Rngs(0))
