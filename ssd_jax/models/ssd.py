"""The SSD detector: VGG backbone, extras and per-level prediction heads.

The model returns raw outputs only. Loss, matching, decoding and NMS live
outside it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.models import layers
from ssd_jax.models import vgg


class BoxPredictor(nnx.Module):
  """One 3x3 classification and one 3x3 regression conv per feature map.

  The two convs of a level hold separate parameters (the reference's layout)
  but run as one convolution over their concatenated output channels, which
  reads the feature map once and gives the same values.
  """

  def __init__(self, in_channels, boxes_per_location, num_classes, *,
               dtype=jnp.float32, rngs):
    def head(i, o):
      return nnx.Conv(i, o, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                      kernel_init=nnx.initializers.xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    self.dtype = dtype
    self.num_classes = num_classes
    self.cls_headers = nnx.List([
        head(c, b * num_classes)
        for c, b in zip(in_channels, boxes_per_location)])
    self.reg_headers = nnx.List([
        head(c, b * 4) for c, b in zip(in_channels, boxes_per_location)])

  def __call__(self, features):
    """Feature maps [B, H_l, W_l, C_l] -> ([B, P, num_classes], [B, P, 4]).

    The prior index runs over (level, y, x, box), the PriorBox order.
    """
    batch = features[0].shape[0]
    logits, boxes = [], []
    for cls_conv, reg_conv, feature in zip(self.cls_headers, self.reg_headers,
                                           features):
      kernel = jnp.concatenate([cls_conv.kernel[...], reg_conv.kernel[...]],
                               axis=-1).astype(self.dtype)
      bias = jnp.concatenate([cls_conv.bias[...], reg_conv.bias[...]])
      out = layers.add_bias(layers.conv(feature.astype(self.dtype), kernel),
                            bias.astype(self.dtype))
      num_cls_channels = cls_conv.kernel.shape[-1]
      logits.append(out[..., :num_cls_channels].reshape(
          batch, -1, self.num_classes))
      boxes.append(out[..., num_cls_channels:].reshape(batch, -1, 4))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(boxes, axis=1)


class SSD(nnx.Module):
  """VGG-SSD (SSD300 / SSD512 / reduced variants) from a config.

  Call on images [B, S, S, 3] (RGB, mean-subtracted, NHWC) to get
  `(cls_logits [B, P, C], bbox_pred [B, P, 4])`, in the compute dtype.
  """

  def __init__(self, config, *, rngs):
    m = config.model
    b = m.backbone
    dtype = jnp.dtype(m.dtype)
    self.backbone = vgg.VGGBackbone(width_divisor=b.width_divisor,
                                    batch_norm=b.batch_norm, dtype=dtype,
                                    rngs=rngs)
    self.extras = vgg.Extras(self.backbone.out_channels[1], b.extras,
                             dtype=dtype, rngs=rngs)
    self.box_head = BoxPredictor(b.out_channels, m.priors.boxes_per_location,
                                 m.num_classes, dtype=dtype, rngs=rngs)

  def features(self, images):
    """The feature maps fed to the heads, largest first."""
    conv4_3, conv7 = self.backbone(images)
    return [conv4_3, conv7] + self.extras(conv7)

  def __call__(self, images):
    return self.box_head(self.features(images))


def feature_map_sizes(config):
  """Spatial sizes of the feature maps the model of `config` produces."""
  b = config.model.backbone
  size = config.input.image_size
  for layer in vgg.VGG16_LAYERS[:vgg.VGG16_LAYERS.index('C') + 1]:
    if layer == 'M':
      size = size // 2
    elif layer == 'C':
      size = -(-size // 2)
  sizes = [size, size // 2]  # conv4_3, conv7 (after pool4; pool5 keeps it)
  size = size // 2
  for _, _, kernel, stride, padding in b.extras:
    size = (size + 2 * padding - kernel) // stride + 1
    sizes.append(size)
  return tuple(sizes)


def validate_config(config):
  """Raises ValueError when the priors do not fit the model's feature maps."""
  m = config.model
  p = m.priors
  b = m.backbone
  sizes = feature_map_sizes(config)
  problems = []
  if tuple(p.feature_maps) != sizes:
    problems.append(
        f'model.priors.feature_maps is {tuple(p.feature_maps)} but a '
        f'{config.input.image_size}px input gives feature maps {sizes}')
  widths = (512 // b.width_divisor, vgg.FC_WIDTH // b.width_divisor)
  channels = widths + tuple(e[1] for e in b.extras)
  if tuple(b.out_channels) != channels:
    problems.append(f'model.backbone.out_channels is {tuple(b.out_channels)} '
                    f'but the layers give {channels}')
  lengths = {name: len(getattr(p, name)) for name in (
      'feature_maps', 'strides', 'min_sizes', 'max_sizes', 'aspect_ratios',
      'boxes_per_location')}
  if len(set(lengths.values())) != 1:
    problems.append(f'model.priors lists differ in length: {lengths}')
  expected_boxes = tuple(2 + 2 * len(r) for r in p.aspect_ratios)
  if tuple(p.boxes_per_location) != expected_boxes:
    problems.append(
        f'model.priors.boxes_per_location is {tuple(p.boxes_per_location)} '
        f'but the aspect ratios give {expected_boxes}')
  if problems:
    raise ValueError('Invalid SSD config:\n  ' + '\n  '.join(problems))


def create_model(config, rngs=None):
  """Builds the SSD of `config` (validated first); rngs defaults to config.seed."""
  validate_config(config)
  if rngs is None:
    rngs = nnx.Rngs(config.seed)
  # The non-partitionable threefry draws the same kind of numbers but compiles
  # several times faster on CPU; initialisation runs unsharded anyway.
  with jax.threefry_partitionable(False):
    return SSD(config, rngs=rngs)
