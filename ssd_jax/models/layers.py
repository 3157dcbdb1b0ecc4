"""The convolution layer of the SSD model, tuned for XLA:CPU.

Two departures from nnx.Conv, both for speed on CPU, both equal to it up to
float rounding:

* On CPU, 3x3 stride-1 convolutions with 256 or more output channels run as
  Winograd F(2x2, 3x3) (ssd_jax/models/winograd.py): for SSD300's conv3_x to
  conv5_x it takes 20-35% less time forward + backward than XLA's direct
  convolution (bench/conv_layers.py); narrower layers gain nothing.
* XLA:CPU reduces a [B, H, W, C] gradient over (B, H, W) slowly: it splits the
reduction into a tree of windowed reductions that run several times slower
than reading the tensor (14 ms instead of 3.5 ms for SSD300's conv1 at batch
4, 6-7x on the deeper layers; bench/conv_layers.py measures the train step).
Summing the rows of the [B*H, W*C] matrix first, then the W rows of the
[W, C] result, gives the same sums (in another order) at memory speed.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import winograd


@jax.custom_vjp
def add_bias(x, bias):
  """x [..., H, W, C] + bias [C]."""
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, dy):
  return dy, bias_gradient(dy).astype(dy.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def bias_gradient(dy):
  """Sum of dy [..., W, C] over all but its last axis, in float32 -> [C]."""
  width, channels = dy.shape[-2:]
  rows = jnp.sum(dy.reshape(-1, width * channels), axis=0, dtype=jnp.float32)
  return jnp.sum(rows.reshape(width, channels), axis=0)


class Conv(nnx.Conv):
  """nnx.Conv for NHWC input whose bias is added with `add_bias`.

  Same parameters (`kernel` [kh, kw, in, out], `bias` [out]), the same
  arguments and the same outputs as nnx.Conv; strides, padding and
  kernel_dilation must be given as ints or per-axis tuples, padding as
  explicit (low, high) pairs or 'SAME' / 'VALID'.
  """

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = self.kernel[...].astype(dtype)
    strides = _pair(self.strides or 1)
    dilation = _pair(self.kernel_dilation or 1)
    if use_winograd(kernel.shape, strides, self.padding, dilation, dtype):
      y = winograd.conv3x3(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, strides, self.padding, rhs_dilation=dilation,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return add_bias(y, self.bias[...].astype(dtype))


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def use_winograd(kernel_shape, strides, padding, dilation, dtype):
  """Whether `Conv` runs this convolution as Winograd F(2x2, 3x3)."""
  padding = tuple(_pair(p) for p in padding) if not isinstance(padding, str) else padding
  return (jax.default_backend() == 'cpu' and
          jnp.dtype(dtype) == jnp.float32 and
          tuple(kernel_shape[:2]) == (3, 3) and kernel_shape[3] >= 256 and
          strides == (1, 1) and dilation == (1, 1) and
          padding == ((1, 1), (1, 1)))
