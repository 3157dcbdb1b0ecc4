"""EfficientNet-B3 backbone of the reference's EfficientNet-B3-SSD300.

The reference (ssd/modeling/backbone/efficient_net) is a port of the
TensorFlow EfficientNet: MBConv blocks (1x1 expansion, depthwise conv,
squeeze-excitation, 1x1 projection, identity skip with drop-connect), swish
activations, BatchNorm with TF's momentum 0.99 / epsilon 1e-3, and
convolutions padded as TF's 'SAME' (computed from the input size, the extra
row/column at the bottom/right when the padding is odd). For SSD it drops the
classifier head (no conv_head / fc), returns the outputs of blocks 7, 17 and
25 (the last block of stages 3, 5 and 7: 48, 136 and 384 channels at strides
8, 16 and 32) and adds three extra levels (1x1 conv + 3x3 conv, ReLU after
each) on top of the last block.

All modules take and return NHWC activations; kernels are HWIO (depthwise
kernels [kh, kw, 1, C] with feature_group_count = C). Initialisation as
the reference builds the model without ImageNet weights: PyTorch's default
for the EfficientNet convs, Xavier-uniform kernels and zero biases for the
extra levels, BatchNorm scale 1 and bias 0.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import layers
from ssd_jax.models import vgg


class Stage(NamedTuple):
  """One stage of EfficientNet-B0 (scaled per model by the coefficients)."""
  kernel: int
  repeats: int
  in_filters: int
  out_filters: int
  expand_ratio: int
  stride: int
  se_ratio: float


B0_STAGES = (
    Stage(3, 1, 32, 16, 1, 1, 0.25),
    Stage(3, 2, 16, 24, 6, 2, 0.25),
    Stage(5, 2, 24, 40, 6, 2, 0.25),
    Stage(3, 3, 40, 80, 6, 2, 0.25),
    Stage(5, 3, 80, 112, 6, 1, 0.25),
    Stage(5, 4, 112, 192, 6, 2, 0.25),
    Stage(3, 1, 192, 320, 6, 1, 0.25),
)
STEM_FILTERS = 32
# The stages whose last block feeds a detection head (stride 8, 16, 32).
FEATURE_STAGES = (2, 4, 6)

# EfficientNet-B3's compound-scaling coefficients and TF's BatchNorm.
B3_WIDTH_COEFFICIENT = 1.2
B3_DEPTH_COEFFICIENT = 1.4
DEPTH_DIVISOR = 8
# TF's BatchNorm decay 0.99 is PyTorch momentum 0.01 (the new batch's weight).
BN_MOMENTUM = 0.01
BN_EPSILON = 1e-3

# ImageNet weights the reference loads (EfficientNet-PyTorch's B3 file).
B3_PRETRAINED_URL = (
    'http://storage.googleapis.com/public-models/efficientnet-b3-c8376fa2.pth')


def round_filters(filters, width_coefficient, divisor=DEPTH_DIVISOR):
  """Channels scaled by the width coefficient, rounded to a multiple of 8.

  Rounds to the nearest multiple (at least `divisor`), one multiple up if
  that lost more than 10%: 32 -> 40, 320 -> 384 for B3.
  """
  scaled = filters * width_coefficient
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats, depth_coefficient):
  """Blocks per stage scaled by the depth coefficient, rounded up."""
  return int(math.ceil(depth_coefficient * repeats))


class BlockSpec(NamedTuple):
  """One MBConv block: depthwise kernel size and stride, channels in and out,
  expansion ratio, squeeze-excitation ratio (of the input channels)."""
  kernel: int
  stride: int
  in_filters: int
  out_filters: int
  expand_ratio: int
  se_ratio: float


def block_specs(width_coefficient, depth_coefficient):
  """-> (stem channels, per-block BlockSpecs, index of each stage's last block)."""
  specs, stage_ends = [], []
  for stage in B0_STAGES:
    in_filters = round_filters(stage.in_filters, width_coefficient)
    out_filters = round_filters(stage.out_filters, width_coefficient)
    for i in range(round_repeats(stage.repeats, depth_coefficient)):
      specs.append(BlockSpec(
          stage.kernel, stage.stride if i == 0 else 1,
          in_filters if i == 0 else out_filters, out_filters,
          stage.expand_ratio, stage.se_ratio))
    stage_ends.append(len(specs) - 1)
  return (round_filters(STEM_FILTERS, width_coefficient), tuple(specs),
          tuple(stage_ends))


def _batch_norm(channels, dtype):
  return layers.BatchNorm(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM,
                          dtype=dtype)


def _conv(in_channels, out_channels, kernel, stride=1, *, use_bias,
          dtype, rngs):
  """A TF-'SAME'-padded convolution with PyTorch's default initialisation."""
  fan_in = in_channels * kernel * kernel
  return layers.Conv(in_channels, out_channels, (kernel, kernel),
                     strides=(stride, stride), padding='SAME',
                     use_bias=use_bias, dtype=dtype,
                     kernel_init=vgg.torch_default_conv_init(fan_in),
                     bias_init=vgg.torch_default_conv_init(fan_in), rngs=rngs)


class MBConvBlock(nnx.Module):
  """Mobile inverted bottleneck: expand, depthwise, squeeze-excite, project.

  x [B, H, W, in] -> [B, H / stride, W / stride, out]. With stride 1 and
  in == out the input is added back, the residual branch first dropped per
  example with probability `drop_connect_rate` in training (scaled by
  1 / keep probability, as TF's drop-connect).
  """

  def __init__(self, spec, *, drop_connect_rate=0.0, dtype=jnp.float32, rngs):
    self.spec = spec
    self.dtype = dtype
    channels = spec.in_filters * spec.expand_ratio
    if spec.expand_ratio != 1:
      self.expand_conv = _conv(spec.in_filters, channels, 1, use_bias=False,
                               dtype=dtype, rngs=rngs)
      self.bn0 = _batch_norm(channels, dtype)
    else:
      self.expand_conv = self.bn0 = None
    k = spec.kernel
    self.depthwise_conv = layers.DepthwiseConv(
        channels, (k, k), strides=(spec.stride, spec.stride),
        padding='SAME', use_bias=False,
        dtype=dtype, kernel_init=vgg.torch_default_conv_init(k * k), rngs=rngs)
    self.bn1 = _batch_norm(channels, dtype)
    squeezed = max(1, int(spec.in_filters * spec.se_ratio))
    self.se_reduce = _conv(channels, squeezed, 1, use_bias=True, dtype=dtype,
                           rngs=rngs)
    self.se_expand = _conv(squeezed, channels, 1, use_bias=True, dtype=dtype,
                           rngs=rngs)
    self.project_conv = _conv(channels, spec.out_filters, 1, use_bias=False,
                              dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(spec.out_filters, dtype)
    self.has_skip = spec.stride == 1 and spec.in_filters == spec.out_filters
    # drop_connect(rate 0) is the identity, as in the reference.
    self.drop_connect = (nnx.Dropout(drop_connect_rate, broadcast_dims=(1, 2, 3))
                         if self.has_skip and drop_connect_rate > 0 else None)

  def __call__(self, inputs, *, rngs=None):
    """inputs [B, H, W, in] -> [B, H', W', out]; `rngs`: the RngStream of the
    drop-connect masks (None: no drop-connect)."""
    x = inputs
    if self.expand_conv is not None:
      x = jax.nn.swish(self.bn0(self.expand_conv(x)))
    x = jax.nn.swish(self.bn1(self.depthwise_conv(x)))
    squeezed = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32)
    squeezed = self.se_expand(jax.nn.swish(self.se_reduce(
        squeezed.astype(self.dtype))))
    x = jax.nn.sigmoid(squeezed) * x
    x = self.bn2(self.project_conv(x))
    if self.has_skip:
      if self.drop_connect is not None and rngs is not None:
        x = self.drop_connect(x, rngs=rngs)
      x = x + inputs
    return x

  def torch_entries(self, prefix):
    entries = {}
    if self.expand_conv is not None:
      entries.update(layers.conv_entries(f'{prefix}._expand_conv',
                                         self.expand_conv))
      entries.update(layers.batch_norm_entries(f'{prefix}._bn0', self.bn0))
    entries.update(layers.conv_entries(f'{prefix}._depthwise_conv',
                                       self.depthwise_conv))
    entries.update(layers.batch_norm_entries(f'{prefix}._bn1', self.bn1))
    entries.update(layers.conv_entries(f'{prefix}._se_reduce', self.se_reduce))
    entries.update(layers.conv_entries(f'{prefix}._se_expand', self.se_expand))
    entries.update(layers.conv_entries(f'{prefix}._project_conv',
                                       self.project_conv))
    entries.update(layers.batch_norm_entries(f'{prefix}._bn2', self.bn2))
    return entries


class ExtraLevel(nnx.Module):
  """One extra feature level: a 1x1 conv to `mid` channels, then a k x k conv
  (explicit symmetric padding), ReLU after each; Xavier-uniform kernels and
  zero biases (the reference's reset_parameters)."""

  def __init__(self, in_channels, mid, out, kernel, stride, padding, *,
               dtype=jnp.float32, rngs):
    conv = lambda i, o, k, s, p: layers.Conv(
        i, o, (k, k), strides=(s, s), padding=((p, p), (p, p)), dtype=dtype,
        kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.reduce = conv(in_channels, mid, 1, 1, 0)
    self.conv = conv(mid, out, kernel, stride, padding)

  def __call__(self, x):
    return jax.nn.relu(self.conv(jax.nn.relu(self.reduce(x))))

  def torch_entries(self, prefix):
    """Keys of the reference's Sequential(conv, ReLU, conv, ReLU)."""
    return {**layers.conv_entries(f'{prefix}.0', self.reduce),
            **layers.conv_entries(f'{prefix}.2', self.conv)}


class EfficientNet(nnx.Module):
  """EfficientNet stem + MBConv blocks + SSD extra layers.

  __call__(images [B, S, S, 3], mean-subtracted RGB) -> the feature maps fed
  to the heads, largest first: the outputs of the last block of stages 3, 5
  and 7 (strides 8, 16, 32), then one per extra level.
  """

  def __init__(self, *, width_coefficient=B3_WIDTH_COEFFICIENT,
               depth_coefficient=B3_DEPTH_COEFFICIENT,
               extras=((128, 256, 3, 2, 1), (128, 256, 3, 1, 0),
                       (128, 256, 3, 1, 0)),
               drop_connect_rate=0.2, dtype=jnp.float32, rngs):
    self.dtype = dtype
    stem, specs, stage_ends = block_specs(width_coefficient, depth_coefficient)
    self.feature_indices = tuple(stage_ends[s] for s in FEATURE_STAGES)
    self.conv_stem = _conv(3, stem, 3, 2, use_bias=False, dtype=dtype,
                           rngs=rngs)
    self.bn0 = _batch_norm(stem, dtype)
    # Block i drops its residual branch with rate drop_connect_rate * i / n.
    self.blocks = nnx.List([
        MBConvBlock(spec, drop_connect_rate=drop_connect_rate * i / len(specs),
                    dtype=dtype, rngs=rngs)
        for i, spec in enumerate(specs)])
    in_channels = [specs[-1].out_filters] + [e[1] for e in extras[:-1]]
    self.extras = nnx.List([
        ExtraLevel(c, *spec, dtype=dtype, rngs=rngs)
        for c, spec in zip(in_channels, extras)])
    self.out_channels = tuple(specs[i].out_filters
                              for i in self.feature_indices) + tuple(
                                  e[1] for e in extras)

  # SSD passes the train step's RngStream (drop-connect) to this backbone.
  uses_rngs = True

  def __call__(self, images, *, rngs=None):
    """`rngs`: an RngStream for drop-connect in training; None = none.

    The module holds no RNG state (every variable is a reference state-dict
    entry), so drop-connect needs the caller's stream.
    """
    x = jax.nn.swish(self.bn0(self.conv_stem(images.astype(self.dtype))))
    features = []
    for i, block in enumerate(self.blocks):
      x = block(x, rngs=rngs)
      if i in self.feature_indices:
        features.append(x)
    for extra in self.extras:
      x = extra(x)
      features.append(x)
    return features

  def torch_entries(self, prefix='backbone.'):
    """{reference state-dict key: (our variable, kind)}, BatchNorm buffers too."""
    entries = {}
    for level, extra in enumerate(self.extras):
      entries.update(extra.torch_entries(f'{prefix}extras.{level}'))
    entries[f'{prefix}_conv_stem.weight'] = (self.conv_stem.kernel, 'conv')
    entries.update(layers.batch_norm_entries(f'{prefix}_bn0', self.bn0))
    for i, block in enumerate(self.blocks):
      entries.update(block.torch_entries(f'{prefix}_blocks.{i}'))
    return entries


def build(config, *, dtype, rngs):
  """The EfficientNet backbone of `config.model.backbone`."""
  b = config.model.backbone
  return EfficientNet(width_coefficient=b.width_coefficient,
                      depth_coefficient=b.depth_coefficient,
                      extras=tuple(tuple(e) for e in b.extras),
                      drop_connect_rate=b.drop_connect_rate, dtype=dtype,
                      rngs=rngs)
