"""The layers of the SSD models, tuned for XLA:CPU.

Departures from nnx.Conv / plain autodiff, all for speed on CPU, all equal
to them up to float rounding, all applied only while the CPU kernels are on
(see `cpu_kernels` below; with them off every layer is plain XLA, for
GPUs/TPUs and for export):

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
* The MobileNet/EfficientNet layers: depthwise convolutions as sums of
  shifted products (`depthwise_conv`) and training-mode BatchNorm, both
  with hand-written gradients whose sums over (N, H, W) use the same order
  (the MobileNetV2-SSDLite train step at batch 32, 160 px: 10.2 -> 1.9 s).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import winograd

# None: follow jax.default_backend(); True / False: set by `cpu_kernels`.
# A JAX user context: part of jit's cache key, so a function traced with one
# setting is traced again under the other.
_CPU_KERNELS = jax.make_user_context(default_value=None)


def cpu_kernels(enabled: bool):
  """Turns the CPU-only kernels on or off for the models traced inside.

  The CPU kernels are the custom-VJP rewrites that make XLA:CPU faster:
  Winograd convolutions (`use_winograd`), the bias gradient of `add_bias`,
  the max-pool gradient of `vgg.max_pool`, the depthwise convolution
  (`depthwise_conv`) and BatchNorm's training-mode gradient. With
  `enabled=False` the model is traced with plain XLA ops only (lax
  convolutions, grouped ones included, `x + bias`, `reduce_window`, BatchNorm
  by autodiff), the graph to compile for GPUs/TPUs or to export
  (ssd_jax/deploy/export.py); the values agree up to float rounding.

  A context manager, thread-local, read when a model is traced; it is part
  of jax.jit's cache key, so a jitted function called under both settings is
  traced and compiled once for each. E.g. the plain graph for export:

    with layers.cpu_kernels(False):
      exported = jax.export.export(jax.jit(forward))(...)

  Outside any `cpu_kernels` block, the kernels are on when JAX's default
  backend is CPU (`cpu_kernels_enabled`). The train and predict steps set it
  from the platform of the devices they run on (`runtime.kernels`).
  """
  return _CPU_KERNELS(bool(enabled))


def cpu_kernels_enabled() -> bool:
  """Whether models traced now use the CPU kernels (see `cpu_kernels`)."""
  enabled = _CPU_KERNELS.value
  if enabled is None:
    return jax.default_backend() == 'cpu'
  return enabled


def add_bias(x, bias):
  """x [..., H, W, C] + bias [C]; with the CPU kernels, the fast gradient."""
  if cpu_kernels_enabled():
    return _add_bias_fast_gradient(x, bias)
  return x + bias


@jax.custom_vjp
def _add_bias_fast_gradient(x, bias):
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, dy):
  return dy, bias_gradient(dy).astype(dy.dtype)


_add_bias_fast_gradient.defvjp(_add_bias_fwd, _add_bias_bwd)


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

  With the CPU kernels on (`cpu_kernels_enabled`), in float32, for 3x3
  stride-1 convolutions padded by 1 whose channel counts have a harmonic
  mean of 80 or more: the matrix products Winograd shrinks grow with in x
  out channels, its transforms with in + out, and on SSD300's shapes it won
  forward + backward from conv2_1 (64 -> 128) on and lost on conv1_2
  (64 -> 64).
  """
  if not isinstance(padding, str):
    padding = tuple(_pair(p) for p in padding)
  _, _, channels_in, channels_out = kernel_shape
  harmonic_mean = 2 * channels_in * channels_out / (channels_in + channels_out)
  return (cpu_kernels_enabled() and
          jnp.dtype(dtype) == jnp.float32 and
          tuple(kernel_shape[:2]) == (3, 3) and
          harmonic_mean >= 80 and
          tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and
          padding == ((1, 1), (1, 1)))


class BatchNorm(nnx.Module):
  """BatchNorm over the last (channel) axis with PyTorch's semantics.

  Training mode (`use_running_average=False`, what `model.train()` sets)
  normalises with the batch's mean and biased variance and updates the
  running statistics as torch.nn.BatchNorm2d does:
  running = (1 - momentum) * running + momentum * batch, with the unbiased
  variance (n / (n - 1)) in the running variance. Eval mode (`model.eval()`)
  normalises with the running statistics. `momentum` is PyTorch's (the
  weight of the new batch, 0.1 by default), not flax's decay.

  Parameters `scale`, `bias` and the nnx.BatchStat statistics `mean`, `var`
  are float32 whatever the compute dtype; statistics and the normalisation
  are computed in float32, the output is cast to `dtype`.
  """

  def __init__(self, num_features, *, eps=1e-5, momentum=0.1,
               dtype=jnp.float32, use_running_average=False, rngs=None):
    del rngs  # deterministic init: scale 1, bias 0 (PyTorch's)
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.eps = eps
    self.momentum = momentum
    self.dtype = dtype
    self.use_running_average = use_running_average

  def __call__(self, x):
    """x [..., C] -> [..., C] in `dtype`."""
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
      y = (x32 - self.mean[...]) * multiplier + self.bias[...]
      return y.astype(self.dtype)
    normalize = (_batch_norm_fast_gradient if cpu_kernels_enabled()
                 else _batch_norm_train)
    y, mean, var = normalize(x32, self.scale[...], self.bias[...], self.eps)
    count = x32.size // x32.shape[-1]
    unbiased = var * (count / max(count - 1, 1))
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(
        (1 - m) * self.mean[...] + m * mean)
    self.var[...] = jax.lax.stop_gradient(
        (1 - m) * self.var[...] + m * unbiased)
    return y.astype(self.dtype)


def _batch_norm_train(x, scale, bias, eps, channel_sum=None):
  """Training-mode batch norm of x [..., C] (float32) -> (y, batch mean,
  biased batch variance), the variance from the centred values."""
  if channel_sum is None:
    axes = tuple(range(x.ndim - 1))
    channel_sum = functools.partial(jnp.sum, axis=axes)
  count = x.size // x.shape[-1]
  mean = channel_sum(x) / count
  centered = x - mean
  var = channel_sum(jnp.square(centered)) / count
  y = centered * (scale * jax.lax.rsqrt(var + eps)) + bias
  return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_fast_gradient(x, scale, bias, eps):
  """`_batch_norm_train` for the CPU kernels: every sum over (N, H, W) in
  `bias_gradient`'s order, forward and backward (XLA:CPU's own reductions
  made BatchNorm 4-13x slower, forward + backward, on MobileNet shapes)."""
  return _batch_norm_fast_fwd(x, scale, bias, eps)[0]


def _batch_norm_fast_fwd(x, scale, bias, eps):
  y, mean, var = _batch_norm_train(x, scale, bias, eps,
                                   channel_sum=bias_gradient)
  return (y, mean, var), (x - mean, jax.lax.rsqrt(var + eps), scale)


def _batch_norm_fast_bwd(eps, residuals, cotangents):
  del eps
  centered, inverse_std, scale = residuals
  dy, dmean, dvar = cotangents
  count = centered.size // centered.shape[-1]
  normalized = centered * inverse_std
  bias_grad = bias_gradient(dy)
  scale_grad = bias_gradient(dy * normalized)
  x_grad = ((scale * inverse_std) *
            (dy - (bias_grad + normalized * scale_grad) / count) +
            dmean / count + dvar * (2 / count) * centered)
  return x_grad, scale_grad, bias_grad


_batch_norm_fast_gradient.defvjp(_batch_norm_fast_fwd, _batch_norm_fast_bwd)


def conv2d(in_channels, out_channels, kernel_size, *, stride=1, padding=None,
           groups=1, use_bias=True, dtype=jnp.float32, kernel_init=None,
           bias_init=nnx.initializers.zeros_init(), rngs):
  """A PyTorch-style Conv2d for NHWC input: `kernel` HWIO, `bias` [out].

  `padding` None = (kernel_size - 1) // 2 on every side (PyTorch's usual
  'same' for odd kernels). Grouped (e.g. depthwise: groups = in_channels)
  convolutions are an nnx.Conv with feature_group_count (kernel
  [kh, kw, in / groups, out]); the others a layers.Conv.
  """
  if padding is None:
    padding = (kernel_size - 1) // 2
  kwargs = dict(strides=(stride, stride),
                padding=((padding, padding), (padding, padding)),
                use_bias=use_bias, dtype=dtype, bias_init=bias_init, rngs=rngs)
  if kernel_init is not None:
    kwargs['kernel_init'] = kernel_init
  size = (kernel_size, kernel_size)
  if groups == 1:
    return Conv(in_channels, out_channels, size, **kwargs)
  if groups == in_channels == out_channels:
    return DepthwiseConv(in_channels, size, **kwargs)
  return nnx.Conv(in_channels, out_channels, size,
                  feature_group_count=groups, **kwargs)


def relu6(x):
  return jnp.clip(x, 0, 6)


def hard_sigmoid(x):
  """relu6(x + 3) / 6, MobileNetV3's h_sigmoid."""
  return relu6(x + 3) / 6


def hard_swish(x):
  """x * relu6(x + 3) / 6, MobileNetV3's h_swish."""
  return x * hard_sigmoid(x)


# Entries of `torch_entries` methods: {PyTorch state-dict key: (variable,
# kind)}. Kinds: 'conv' (OIHW -> HWIO), 'depthwise' ([C, 1, kh, kw] -> HWIO
# [kh, kw, 1, C], the same transpose), 'linear' ([out, in] -> [in, out]),
# 'vector' (1-D, copied).


def conv_entries(key, conv):
  """A Conv2d's `key.weight` (and `key.bias` when it has one)."""
  kind = 'depthwise' if getattr(conv, 'feature_group_count', 1) > 1 else 'conv'
  entries = {f'{key}.weight': (conv.kernel, kind)}
  if conv.bias is not None:
    entries[f'{key}.bias'] = (conv.bias, 'vector')
  return entries


def batch_norm_entries(key, norm):
  """A BatchNorm2d's weight, bias, running_mean and running_var."""
  return {f'{key}.weight': (norm.scale, 'vector'),
          f'{key}.bias': (norm.bias, 'vector'),
          f'{key}.running_mean': (norm.mean, 'vector'),
          f'{key}.running_var': (norm.var, 'vector')}


def linear_entries(key, linear):
  """A Linear's `key.weight` ([out, in] there, [in, out] here) and bias."""
  entries = {f'{key}.weight': (linear.kernel, 'linear')}
  if linear.bias is not None:
    entries[f'{key}.bias'] = (linear.bias, 'vector')
  return entries


class ConvBN(nnx.Module):
  """Conv2d without bias + BatchNorm (+ an optional activation after it).

  `groups` as conv2d's (in_channels for a depthwise conv); `eps` and
  `momentum` as BatchNorm's (PyTorch's meaning); the kernel initialiser
  defaults to He normal over fan-out (PyTorch's kaiming_normal_(mode=
  'fan_out'), what the reference's MobileNets use).
  """

  def __init__(self, in_channels, out_channels, kernel_size, *, stride=1,
               padding=None, groups=1, activation=None, eps=1e-5,
               momentum=0.1, dtype=jnp.float32, kernel_init=None, rngs):
    if kernel_init is None:
      kernel_init = nnx.initializers.variance_scaling(2.0, 'fan_out',
                                                      'normal')
    self.conv = conv2d(in_channels, out_channels, kernel_size, stride=stride,
                       padding=padding, groups=groups, use_bias=False,
                       dtype=dtype, kernel_init=kernel_init, rngs=rngs)
    self.norm = BatchNorm(out_channels, eps=eps, momentum=momentum,
                          dtype=dtype)
    self.activation = activation

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return x if self.activation is None else self.activation(x)

  def torch_entries(self, conv_key, norm_key):
    return {**conv_entries(conv_key, self.conv),
            **batch_norm_entries(norm_key, self.norm)}
class DepthwiseConv(nnx.Conv):
  """Depthwise nnx.Conv (feature_group_count = channels), fast on CPU.

  Same parameters (`kernel` [kh, kw, 1, C], optional `bias` [C]) and outputs
  as nnx.Conv with feature_group_count=C; strides ints or per-axis tuples,
  padding explicit (low, high) pairs or 'SAME' / 'VALID'. On CPU it runs as
  `depthwise_conv`'s sum of shifted products: XLA:CPU's grouped convolution
  took 417 ms for a 3x3 depthwise conv on [1, 150, 150, 40], the shifted
  sum 9 ms.
  """

  def __init__(self, channels, kernel_size, **kwargs):
    super().__init__(channels, channels, kernel_size,
                     feature_group_count=channels, **kwargs)
    if self.mask is not None or _pair(self.input_dilation or 1) != (1, 1):
      raise ValueError('layers.DepthwiseConv supports neither input dilation '
                       'nor masks; use nnx.Conv')

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    y = depthwise_conv(x.astype(dtype), self.kernel[...].astype(dtype),
                       _pair(self.strides or 1), self.padding,
                       _pair(self.kernel_dilation or 1))
    if self.bias is None:
      return y
    return add_bias(y, self.bias[...].astype(dtype))


def depthwise_conv(x, kernel, strides=(1, 1), padding='SAME',
                   dilation=(1, 1)):
  """x [N, H, W, C] * kernel [kh, kw, 1, C] per channel -> [N, H', W', C].

  XLA's grouped convolution, except with the CPU kernels on
  (`cpu_kernels_enabled`), where it is the sum over kernel taps of strided
  slices of the padded input times that tap's weights, with a hand-written
  gradient (`_depthwise_taps`): XLA:CPU's grouped convolution is 10-45x
  slower (a MobileNetV2 block's 3x3 at [32, 20, 20, 576], forward +
  backward: 10 s against 0.26 s).
  """
  channels = x.shape[-1]
  if not cpu_kernels_enabled():
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=channels)
  kh, kw = kernel.shape[:2]
  pads = jax.lax.padtype_to_pads(
      x.shape[1:3], ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1),
      strides, padding) if isinstance(padding, str) else padding
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  return _depthwise_taps(x, kernel, tuple(strides), pads, tuple(dilation))


def _tap_sum(padded, kernel, out_size, strides, dilation, flip=False):
  """-> [N, *out_size, C]: the sum over taps (i, j) of `_tap(padded, i, j)`
  times kernel[i, j, 0] (kernel[kh-1-i, kw-1-j, 0] with `flip`)."""
  kh, kw = kernel.shape[:2]
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = _tap(padded, i, j, out_size, strides, dilation)
      weight = kernel[kh - 1 - i, kw - 1 - j, 0] if flip else kernel[i, j, 0]
      out = tap * weight if out is None else out + tap * weight
  return out


def _tap(padded, i, j, out_size, strides, dilation):
  """The [N, *out_size, C] window of `padded` that kernel tap (i, j) reads."""
  top, left = i * dilation[0], j * dilation[1]
  return jax.lax.slice(
      padded, (0, top, left, 0),
      (padded.shape[0], top + (out_size[0] - 1) * strides[0] + 1,
       left + (out_size[1] - 1) * strides[1] + 1, padded.shape[3]),
      (1, strides[0], strides[1], 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_taps(x, kernel, strides, pads, dilation):
  """The CPU depthwise convolution; `pads` explicit ((top, bottom), (left,
  right)). Its gradient is written out: autodiff of the strided slices gives
  one zero-padded full-size array per tap (the backward pass was 40x the
  forward); here the input gradient is again a sum of shifted slices, of the
  stride-dilated output gradient with the flipped kernel, and each tap's
  kernel gradient one channel sum (`bias_gradient`'s fast order)."""
  return _depthwise_taps_fwd(x, kernel, strides, pads, dilation)[0]


def _depthwise_taps_fwd(x, kernel, strides, pads, dilation):
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_size = tuple((padded.shape[1 + a] - (k - 1) * dilation[a] - 1)
                   // strides[a] + 1 for a, k in enumerate((kh, kw)))
  return _tap_sum(padded, kernel, out_size, strides, dilation), (padded,
                                                                 kernel)


def _depthwise_taps_bwd(strides, pads, dilation, residuals, dy):
  padded, kernel = residuals
  kh, kw = kernel.shape[:2]
  out_size = dy.shape[1:3]
  kernel_grad = jnp.stack([
      bias_gradient(_tap(padded, i, j, out_size, strides, dilation) * dy)
      for i in range(kh) for j in range(kw)]).reshape(kh, kw, 1, -1)
  # d padded[p] = sum_i dy_dilated[p - i*d] * kernel[i]: dy dilated by the
  # stride, padded by (k - 1) * d (and the rows/columns of `padded` that no
  # output reads), correlated with the flipped kernel.
  edges = []
  for a, k in enumerate((kh, kw)):
    reach = (k - 1) * dilation[a]
    unread = padded.shape[1 + a] - ((out_size[a] - 1) * strides[a] + 1 + reach)
    edges.append((reach, reach + unread, strides[a] - 1))
  dy_padded = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                          ((0, 0, 0), edges[0], edges[1], (0, 0, 0)))
  padded_grad = _tap_sum(dy_padded, kernel, padded.shape[1:3], (1, 1),
                         dilation, flip=True)
  (top, bottom), (left, right) = pads
  x_grad = padded_grad[:, top:padded.shape[1] - bottom,
                       left:padded.shape[2] - right]
  return x_grad, kernel_grad.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)
