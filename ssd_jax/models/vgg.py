"""VGG16 (reduced fc) backbone with L2Norm and the SSD extra layers.

All modules take and return NHWC activations. Convolution kernels are HWIO.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import layers


# VGG16 convolutions up to conv5_3: widths, 'M' = 2x2/2 max-pool (floor),
# 'C' = 2x2/2 max-pool with ceil mode (pool3, so that 75 -> 38 for SSD300).
VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'C',
                512, 512, 512, 'M', 512, 512, 512)
CONV4_3_INDEX = 9  # conv4_3 is the 10th convolution
FC_WIDTH = 1024  # conv6 / conv7 (fc6 / fc7 reduced)


def torch_default_conv_init(fan_in):
  """PyTorch's default Conv2d init: U(+-1/sqrt(fan_in)) for kernel and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def max_pool(x, window, stride, padding=0, ceil_mode=False):
  """PyTorch-style max pooling on NHWC input (pads with -inf).

  With `ceil_mode` the output size is ceil((n + 2p - window) / stride) + 1,
  which the extra right/bottom padding provides. Non-overlapping windows
  take `_tiled_max_pool`'s gradient while the CPU kernels are on
  (`layers.cpu_kernels`), XLA's own otherwise.
  """
  pads = []
  for n in x.shape[1:3]:
    extra = 0
    if ceil_mode:
      out = -(-(n + 2 * padding - window) // stride) + 1
      extra = max((out - 1) * stride + window - (n + 2 * padding), 0)
    pads.append((padding, padding + extra))
  pads = ((0, 0), pads[0], pads[1], (0, 0))
  if window == stride and padding == 0 and layers.cpu_kernels_enabled():
    return _tiled_max_pool(x, window, pads)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                               (1, window, window, 1),
                               (1, stride, stride, 1), pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _tiled_max_pool(x, window, pads):
  """Max pooling over non-overlapping window x window tiles.

  Same values as reduce_window; its gradient goes to the first maximum of
  each tile in row-major order (as PyTorch's), computed with a one-hot
  instead of XLA's select-and-scatter, which is slow on CPU (a CPU kernel:
  see `layers.cpu_kernels`).
  """
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                               (1, window, window, 1),
                               (1, window, window, 1), pads)


def _tiled_max_pool_fwd(x, window, pads):
  return _tiled_max_pool(x, window, pads), x


def _tiled_max_pool_bwd(window, pads, x, dy):
  batch, out_h, out_w, channels = dy.shape
  padded = jnp.pad(x, pads, constant_values=-jnp.inf)
  padded = padded[:, :out_h * window, :out_w * window]
  tiles = padded.reshape(batch, out_h, window, out_w, window, channels)
  tiles = tiles.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, out_h, out_w, window * window, channels)
  first_max = jnp.argmax(tiles, axis=3)
  one_hot = (jnp.arange(window * window)[:, None] ==
             first_max[:, :, :, None, :])
  dx = jnp.where(one_hot, dy[:, :, :, None, :], 0).astype(dy.dtype)
  dx = dx.reshape(batch, out_h, out_w, window, window, channels)
  dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, out_h * window, out_w * window, channels)
  dx = jnp.pad(dx, ((0, 0), (0, _uncovered_rows(pads[1], x.shape[1], out_h,
                                            window)),
                    (0, _uncovered_rows(pads[2], x.shape[2], out_w, window)),
                    (0, 0)))
  (top, _), (left, _) = pads[1], pads[2]
  return (dx[:, top:top + x.shape[1], left:left + x.shape[2]],)


def _uncovered_rows(pad, size, out, window):
  """Rows of the padded input that no tile covers (the floor-mode remainder)."""
  return pad[0] + size + pad[1] - out * window


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


class L2Norm(nnx.Module):
  """Channel-wise L2 normalisation with a learnable per-channel scale.

  out = weight[c] * x / (sqrt(sum_c x^2) + 1e-10), computed in float32.
  """

  def __init__(self, channels, scale=20.0):
    self.weight = nnx.Param(jnp.full((channels,), scale, jnp.float32))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)) + 1e-10
    return (self.weight[...] * x32 / norm).astype(x.dtype)


class VGGBackbone(nnx.Module):
  """VGG16 convs, pool5 (3x3/1/1), conv6 (dilation 6), conv7, L2Norm(conv4_3)
  and the extra feature layers: the reference's VGG backbone.

  `vgg[i]` is the i-th convolution (13 VGG16 convs, then conv6 and conv7);
  `extras[2l]` is the 1x1 conv and `extras[2l+1]` the k x k conv of extra
  level l, the reference's `backbone.extras` numbering. `extras` holds one
  (mid_channels, out_channels, kernel, stride, padding) per extra level.
  """

  def __init__(self, *, extras, width_divisor=1, batch_norm=False,
               dtype=jnp.float32, rngs):
    self.dtype = dtype
    widths = [v // width_divisor for v in VGG16_LAYERS if not isinstance(v, str)]
    fc_width = FC_WIDTH // width_divisor
    specs = []  # (in, out, kernel, padding, dilation)
    in_ch = 3
    for w in widths:
      specs.append((in_ch, w, 3, 1, 1))
      in_ch = w
    specs.append((in_ch, fc_width, 3, 6, 6))  # conv6
    specs.append((fc_width, fc_width, 1, 0, 1))  # conv7
    self.vgg = nnx.List([
        layers.Conv(i, o, (k, k), padding=((p, p), (p, p)),
                    kernel_dilation=(d, d), dtype=dtype,
                    kernel_init=torch_default_conv_init(i * k * k),
                    bias_init=torch_default_conv_init(i * k * k), rngs=rngs)
        for i, o, k, p, d in specs])
    self.norms = nnx.List([
        nnx.BatchNorm(o, momentum=0.9, dtype=dtype, rngs=rngs)
        for _, o, _, _, _ in specs]) if batch_norm else None
    self.l2_norm = L2Norm(widths[CONV4_3_INDEX])
    self.extras = nnx.List(_extra_convs(fc_width, extras, dtype, rngs))
    self.out_channels = (widths[CONV4_3_INDEX], fc_width) + tuple(
        e[1] for e in extras)

  def _conv(self, i, x):
    x = self.vgg[i](x)
    if self.norms is not None:
      x = self.norms[i](x)
    return jax.nn.relu(x)

  def __call__(self, x):
    """[B, S, S, 3] -> [L2Norm(conv4_3), conv7, extra levels...], NHWC."""
    x = x.astype(self.dtype)
    conv_index = 0
    conv4_3 = None
    for layer in VGG16_LAYERS:
      if isinstance(layer, str):
        x = max_pool(x, 2, 2, ceil_mode=(layer == 'C'))
      else:
        x = self._conv(conv_index, x)
        if conv_index == CONV4_3_INDEX:
          conv4_3 = x
        conv_index += 1
    x = max_pool(x, 3, 1, padding=1)  # pool5
    x = self._conv(conv_index, x)  # conv6
    x = self._conv(conv_index + 1, x)  # conv7
    features = [self.l2_norm(conv4_3), x]
    for i, conv in enumerate(self.extras):
      x = jax.nn.relu(conv(x))
      if i % 2 == 1:
        features.append(x)
    return features

  def vgg_torch_entries(self, prefix):
    """The VGG convs under the reference's ModuleList indices (`prefix`N)."""
    if self.norms is not None:
      raise ValueError('PyTorch import supports the reference VGG (no '
                       'BatchNorm); set model.backbone.batch_norm=False')
    entries = {}
    for ours, theirs in enumerate(torch_vgg_indices()):
      entries.update(layers.conv_entries(f'{prefix}{theirs}', self.vgg[ours]))
    return entries

  def torch_entries(self, prefix='backbone.'):
    """{reference state-dict key: (variable, kind)} of this backbone."""
    entries = self.vgg_torch_entries(f'{prefix}vgg.')
    entries[f'{prefix}l2_norm.weight'] = (self.l2_norm.weight, 'vector')
    for i, conv in enumerate(self.extras):
      entries.update(layers.conv_entries(f'{prefix}extras.{i}', conv))
    return entries


def _extra_convs(in_channels, specs, dtype, rngs):
  """Per extra level a 1x1 conv to mid channels, then a k x k conv."""
  convs = []
  for mid, out, kernel, stride, padding in specs:
    convs.append(layers.Conv(
        in_channels, mid, (1, 1), dtype=dtype,
        kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs))
    convs.append(layers.Conv(
        mid, out, (kernel, kernel), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), dtype=dtype,
        kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs))
    in_channels = out
  return convs


def torch_vgg_indices():
  """Index of each of our `vgg[i]` convs in the reference's ModuleList.

  The reference list holds conv, ReLU and pool modules: 0, 2, 5, ..., 28 for
  the VGG16 convs, 31 for conv6 and 33 for conv7.
  """
  indices, position = [], 0
  for layer in VGG16_LAYERS:
    if isinstance(layer, str):
      position += 1  # pool
    else:
      indices.append(position)
      position += 2  # conv, relu
  position += 1  # pool5
  indices += [position, position + 2]  # conv6, relu, conv7
  return indices


def build(config, *, dtype, rngs):
  """The VGG backbone of `config.model.backbone` (the BACKBONES entry)."""
  b = config.model.backbone
  return VGGBackbone(extras=tuple(tuple(e) for e in b.extras),
                     width_divisor=b.width_divisor, batch_norm=b.batch_norm,
                     dtype=dtype, rngs=rngs)
