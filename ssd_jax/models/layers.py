"""The convolution layer of the SSD model, tuned for XLA:CPU.

Two departures from nnx.Conv, both for speed on CPU, both equal to it up to
float rounding:

* On CPU, 3x3 stride-1 convolutions that are wide enough (`use_winograd`)
  run as Winograd F(2x2, 3x3) (ssd_jax/models/winograd.py): for SSD300's
  conv2_1 to conv4_3 and the conv4_3 head it takes 15-37% less time forward
  + backward than XLA's direct convolution (bench/conv_layers.py).
* The bias gradient: XLA:CPU reduces a [B, H, W, C] gradient over (B, H, W)
  slowly, as a tree of windowed reductions (14 ms for SSD300's conv1_2 at
  batch 4, where reading the tensor takes 3.5 ms; 3-7x slower than reading
  on the other layers). `add_bias` sums the rows of the [B*H, W*C] matrix,
  then the W rows of the [W, C] result: the same sums, in another order, at
  memory speed (the SSD300 train step at batch 4: 3% faster).
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
  """nnx.Conv for NHWC input, through `conv`, its bias added with `add_bias`.

  Same parameters (`kernel` [kh, kw, in, out], `bias` [out]) and outputs as
  nnx.Conv. Strides and kernel_dilation are ints or per-axis tuples, padding
  explicit (low, high) pairs or 'SAME' / 'VALID'; feature groups, input
  dilation and masks are not supported (a ValueError says so).
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if (self.feature_group_count != 1 or self.mask is not None or
        _pair(self.input_dilation or 1) != (1, 1)):
      raise ValueError('layers.Conv supports neither feature groups, nor '
                       'input dilation, nor masks; use nnx.Conv')

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    y = conv(x.astype(dtype), self.kernel[...].astype(dtype),
             _pair(self.strides or 1), self.padding,
             _pair(self.kernel_dilation or 1))
    if self.bias is None:
      return y
    return add_bias(y, self.bias[...].astype(dtype))


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def conv(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1)),
         dilation=(1, 1)):
  """x [N, H, W, C] * kernel [kh, kw, C, O] -> [N, H', W', O], no bias.

  Winograd where `use_winograd` says so, else XLA's convolution.
  """
  if use_winograd(kernel.shape, strides, padding, dilation, x.dtype):
    return winograd.conv3x3(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, rhs_dilation=dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def use_winograd(kernel_shape, strides, padding, dilation, dtype):
  """Whether `conv` runs this convolution as Winograd F(2x2, 3x3).

  On CPU, in float32, for 3x3 stride-1 convolutions padded by 1 whose
  channel counts have a harmonic mean of 80 or more: the matrix products
  Winograd shrinks grow with in x out channels, its transforms with in + out,
  and on SSD300's shapes it won forward + backward from conv2_1 (64 -> 128)
  on and lost on conv1_2 (64 -> 64).
  """
  if not isinstance(padding, str):
    padding = tuple(_pair(p) for p in padding)
  _, _, channels_in, channels_out = kernel_shape
  harmonic_mean = 2 * channels_in * channels_out / (channels_in + channels_out)
  return (jax.default_backend() == 'cpu' and
          jnp.dtype(dtype) == jnp.float32 and
          tuple(kernel_shape[:2]) == (3, 3) and
          harmonic_mean >= 80 and
          tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and
          padding == ((1, 1), (1, 1)))
