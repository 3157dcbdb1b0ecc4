"""MobileNetV3-Large backbone with the SSDLite extra layers (the reference's).

The reference's MobileNetV3 (from d-li14/mobilenetv3.pytorch, width 1.0):
a 3x3 stem conv + h-swish, 15 inverted residual blocks (ReLU or h-swish,
some with squeeze-and-excite), a 1x1 conv to 960 channels + h-swish, and
four stride-2 inverted residual blocks (SE, h-swish) as extra levels. The
box head gets the 112-channel output of features[12] (stride 16), the
960-channel output of features[16] (stride 32) and the extra levels:
20, 10, 5, 3, 2, 1 for 320 px. NHWC, HWIO kernels.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import layers
from ssd_jax.models import mobilenet_v2

# kernel k, expansion t, output channels c, squeeze-excite, h-swish, stride s
BLOCKS = (
    (3, 1, 16, False, False, 1),
    (3, 4, 24, False, False, 2),
    (3, 3, 24, False, False, 1),
    (5, 3, 40, True, False, 2),
    (5, 3, 40, True, False, 1),
    (5, 3, 40, True, False, 1),
    (3, 6, 80, False, True, 2),
    (3, 2.5, 80, False, True, 1),
    (3, 2.3, 80, False, True, 1),
    (3, 2.3, 80, False, True, 1),
    (3, 6, 112, True, True, 1),
    (3, 6, 112, True, True, 1),
    (5, 6, 160, True, True, 2),
    (5, 6, 160, True, True, 1),
    (5, 6, 160, True, True, 1))
STEM_CHANNELS = 16
FIRST_MAP_LAYERS = 13  # features[0:13] -> the first (stride 16) feature map
# The extra levels: (in, out, expansion) stride-2 3x3 blocks with SE, h-swish.
EXTRAS = ((960, 512, 0.2), (512, 256, 0.25), (256, 256, 0.5), (256, 64, 0.25))


def make_divisible(value, divisor=8):
  """The nearest multiple of `divisor` (at least `divisor`), never more than
  10% below `value` (the TF MobileNet rounding the reference uses)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class SqueezeExcite(nnx.Module):
  """x * h_sigmoid(fc2(relu(fc1(mean over H, W of x)))), per channel."""

  def __init__(self, channels, reduction=4, *, dtype=jnp.float32, rngs):
    hidden = make_divisible(channels // reduction)
    init = dict(kernel_init=nnx.initializers.normal(0.01),
                bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                rngs=rngs)
    self.fc1 = nnx.Linear(channels, hidden, **init)
    self.fc2 = nnx.Linear(hidden, channels, **init)

  def __call__(self, x):
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    weights = layers.hard_sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))
    return x * weights[:, None, None, :].astype(x.dtype)

  def torch_entries(self, key):
    return {**layers.linear_entries(f'{key}.fc.0', self.fc1),
            **layers.linear_entries(f'{key}.fc.2', self.fc2)}


class InvertedResidual(nnx.Module):
  """MobileNetV3 block, as the reference orders it.

  hidden == in: depthwise + BN + act, SE, 1x1 projection + BN.
  otherwise:    1x1 expansion + BN + act, depthwise + BN, SE, act,
                1x1 projection + BN.
  The input is added when the stride is 1 and the channels agree.
  """

  def __init__(self, in_channels, hidden, out_channels, kernel_size, stride,
               use_se, use_hswish, *, dtype=jnp.float32, rngs):
    self.activation = layers.hard_swish if use_hswish else jax.nn.relu
    self.use_residual = stride == 1 and in_channels == out_channels
    self.expand = layers.ConvBN(
        in_channels, hidden, 1, activation=self.activation, dtype=dtype,
        rngs=rngs) if in_channels != hidden else None
    self.depthwise = layers.ConvBN(hidden, hidden, kernel_size, stride=stride,
                                   groups=hidden, dtype=dtype, rngs=rngs)
    self.se = SqueezeExcite(hidden, dtype=dtype,
                            rngs=rngs) if use_se else None
    self.project = layers.ConvBN(hidden, out_channels, 1, dtype=dtype,
                                 rngs=rngs)

  def __call__(self, x):
    y = self.depthwise(x if self.expand is None else self.expand(x))
    if self.expand is None:  # act, then SE
      y = self.activation(y)
      if self.se is not None:
        y = self.se(y)
    else:  # SE, then act
      if self.se is not None:
        y = self.se(y)
      y = self.activation(y)
    y = self.project(y)
    return x + y if self.use_residual else y

  def torch_entries(self, key):
    """Keys of the reference's `conv` Sequential under `key`."""
    if self.expand is None:  # dw 0, bn 1, act 2, se 3, pw 4, bn 5
      depthwise, se, project = 0, 3, 4
      entries = {}
    else:  # pw 0, bn 1, act 2, dw 3, bn 4, se 5, act 6, pw 7, bn 8
      depthwise, se, project = 3, 5, 7
      entries = self.expand.torch_entries(f'{key}.conv.0', f'{key}.conv.1')
    entries.update(self.depthwise.torch_entries(
        f'{key}.conv.{depthwise}', f'{key}.conv.{depthwise + 1}'))
    if self.se is not None:
      entries.update(self.se.torch_entries(f'{key}.conv.{se}'))
    entries.update(self.project.torch_entries(
        f'{key}.conv.{project}', f'{key}.conv.{project + 1}'))
    return entries


class MobileNetV3Backbone(nnx.Module):
  """`features[0]` stem, `features[1:16]` blocks, `features[16]` the 1x1 conv
  to 960 channels; `extras[0:4]` the extra levels.

  Call on [B, S, S, 3] -> the six feature maps, largest first, NHWC.
  """

  def __init__(self, *, dtype=jnp.float32, rngs):
    self.dtype = dtype
    features = [layers.ConvBN(3, STEM_CHANNELS, 3, stride=2,
                              activation=layers.hard_swish, dtype=dtype,
                              rngs=rngs)]
    channels = STEM_CHANNELS
    for k, t, c, use_se, use_hswish, s in BLOCKS:
      out = make_divisible(c)
      hidden = make_divisible(channels * t)
      features.append(InvertedResidual(channels, hidden, out, k, s, use_se,
                                       use_hswish, dtype=dtype, rngs=rngs))
      channels = out
    first_map_channels = make_divisible(BLOCKS[FIRST_MAP_LAYERS - 2][2])
    features.append(layers.ConvBN(channels, hidden, 1,
                                  activation=layers.hard_swish, dtype=dtype,
                                  rngs=rngs))
    self.features = nnx.List(features)
    self.extras = nnx.List([
        InvertedResidual(i, make_divisible(i * t), o, 3, 2, True, True,
                         dtype=dtype, rngs=rngs)
        for i, o, t in EXTRAS])
    self.out_channels = (first_map_channels, hidden) + tuple(
        e[1] for e in EXTRAS)

  def __call__(self, x):
    """[B, S, S, 3] mean-subtracted -> list of 6 feature maps, largest first."""
    return mobilenet_v2.feature_maps(x.astype(self.dtype), self.features,
                                     self.extras, FIRST_MAP_LAYERS)

  def torch_entries(self, prefix='backbone.'):
    """{reference key: (variable, kind)}; with prefix '' the keys of the
    reference's MobileNetV3 module (`features.*`, `extras.*`)."""
    return mobilenet_v2.backbone_entries(prefix, self.features, self.extras)


def build(config, *, dtype, rngs):
  """The BACKBONES entry 'mobilenet_v3' (no options: the reference's)."""
  del config
  return MobileNetV3Backbone(dtype=dtype, rngs=rngs)
