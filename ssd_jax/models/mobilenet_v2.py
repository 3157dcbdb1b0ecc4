"""MobileNetV2 backbone with the SSDLite extra layers (the reference's).

torchvision's MobileNetV2 (width 1.0) up to its last 1x1 conv (1280
channels), ReLU6 after every conv but the projections, plus four stride-2
inverted residual blocks. The box head gets the 96-channel output of
features[13] (stride 16), the 1280-channel output of features[18]
(stride 32) and the four extra levels: 20, 10, 5, 3, 2, 1 for 320 px.
NHWC, HWIO kernels.
"""

import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import layers

# (expansion t, output channels c, repeats n, first stride s) per stage.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
FIRST_MAP_LAYERS = 14  # features[0:14] -> the first (stride 16) feature map
# The extra levels: (in, out, stride, expansion) inverted residual blocks.
EXTRAS = ((1280, 512, 2, 0.2), (512, 256, 2, 0.25), (256, 256, 2, 0.5),
          (256, 64, 2, 0.25))


def feature_maps(x, features, extras, first_map_layers):
  """A MobileNet's maps for the heads: the output of features[:first_map_layers]
  (stride 16), of all `features` (stride 32), then of each extra block."""
  maps = []
  for i, layer in enumerate(features):
    x = layer(x)
    if i == first_map_layers - 1:
      maps.append(x)
  maps.append(x)
  for block in extras:
    x = block(x)
    maps.append(x)
  return maps


def backbone_entries(prefix, features, extras):
  """A MobileNet's {reference key: (variable, kind)}: `features.i` (a
  ConvBN's conv and norm as `.0` / `.1`, blocks by their own entries), then
  `extras.i`, each under `prefix`."""
  entries = {}
  for i, layer in enumerate(features):
    key = f'{prefix}features.{i}'
    if isinstance(layer, layers.ConvBN):
      entries.update(layer.torch_entries(f'{key}.0', f'{key}.1'))
    else:
      entries.update(layer.torch_entries(key))
  for i, block in enumerate(extras):
    entries.update(block.torch_entries(f'{prefix}extras.{i}'))
  return entries


class InvertedResidual(nnx.Module):
  """1x1 expansion (skipped when the ratio is 1) + ReLU6, depthwise 3x3 +
  ReLU6, linear 1x1 projection; the input added when shapes allow."""

  def __init__(self, in_channels, out_channels, stride, expand_ratio, *,
               dtype=jnp.float32, rngs):
    hidden = int(round(in_channels * expand_ratio))
    self.use_residual = stride == 1 and in_channels == out_channels
    self.expand = layers.ConvBN(
        in_channels, hidden, 1, activation=layers.relu6, dtype=dtype,
        rngs=rngs) if expand_ratio != 1 else None
    self.depthwise = layers.ConvBN(hidden, hidden, 3, stride=stride,
                                   groups=hidden, activation=layers.relu6,
                                   dtype=dtype, rngs=rngs)
    self.project = layers.ConvBN(hidden, out_channels, 1, dtype=dtype,
                                 rngs=rngs)

  def __call__(self, x):
    y = x if self.expand is None else self.expand(x)
    y = self.project(self.depthwise(y))
    return x + y if self.use_residual else y

  def torch_entries(self, key):
    """Keys of the reference's `conv` Sequential under `key`."""
    entries, i = {}, 0
    if self.expand is not None:
      entries.update(self.expand.torch_entries(f'{key}.conv.0.0',
                                               f'{key}.conv.0.1'))
      i = 1
    entries.update(self.depthwise.torch_entries(f'{key}.conv.{i}.0',
                                                f'{key}.conv.{i}.1'))
    entries.update(self.project.torch_entries(f'{key}.conv.{i + 1}',
                                              f'{key}.conv.{i + 2}'))
    return entries


class MobileNetV2Backbone(nnx.Module):
  """`features[0]` stem conv, `features[1:18]` inverted residual blocks,
  `features[18]` the 1x1 conv to 1280; `extras[0:4]` the extra levels.

  Call on [B, S, S, 3] -> the six feature maps (strides 16, 32, 64, 128,
  256, 512 for S = 320, ceil-rounded), NHWC.
  """

  def __init__(self, *, dtype=jnp.float32, rngs):
    self.dtype = dtype
    features = [layers.ConvBN(3, STEM_CHANNELS, 3, stride=2,
                              activation=layers.relu6, dtype=dtype,
                              rngs=rngs)]
    channels = STEM_CHANNELS
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      for i in range(n):
        features.append(InvertedResidual(channels, c, s if i == 0 else 1, t,
                                         dtype=dtype, rngs=rngs))
        channels = c
    first_map_channels = features[FIRST_MAP_LAYERS - 1].project.conv.out_features
    features.append(layers.ConvBN(channels, LAST_CHANNELS, 1,
                                  activation=layers.relu6, dtype=dtype,
                                  rngs=rngs))
    self.features = nnx.List(features)
    self.extras = nnx.List([
        InvertedResidual(i, o, s, t, dtype=dtype, rngs=rngs)
        for i, o, s, t in EXTRAS])
    self.out_channels = (first_map_channels, LAST_CHANNELS) + tuple(
        e[1] for e in EXTRAS)

  def __call__(self, x):
    """[B, S, S, 3] mean-subtracted -> list of 6 feature maps, largest first."""
    return feature_maps(x.astype(self.dtype), self.features, self.extras,
                        FIRST_MAP_LAYERS)

  def torch_entries(self, prefix='backbone.'):
    """{reference key: (variable, kind)}; with prefix '' the keys of
    torchvision's MobileNetV2 state dict (`features.*`)."""
    return backbone_entries(prefix, self.features, self.extras)


def build(config, *, dtype, rngs):
  """The BACKBONES entry 'mobilenet_v2' (no options: the reference's)."""
  del config
  return MobileNetV2Backbone(dtype=dtype, rngs=rngs)
