"""The SSD detector: a backbone from the BACKBONES table and a box predictor.

The model returns raw outputs only. Loss, matching, decoding and NMS live
outside it.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ssd_jax.models import backbones
from ssd_jax.models import layers


def _flatten_level(out, batch, num_cls_channels, num_classes):
  """A level's [B, H, W, b * (C + 4)] output -> ([B, H*W*b, C], [B, H*W*b, 4])."""
  return (out[..., :num_cls_channels].reshape(batch, -1, num_classes),
          out[..., num_cls_channels:].reshape(batch, -1, 4))


class BoxPredictor(nnx.Module):
  """One 3x3 classification and one 3x3 regression conv per feature map.

  The reference's SSDBoxPredictor. The two convs of a level hold separate
  parameters (the reference's layout) but run as one convolution over their
  concatenated output channels, which reads the feature map once and gives
  the same values.
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
      level_logits, level_boxes = _flatten_level(
          out, batch, cls_conv.kernel.shape[-1], self.num_classes)
      logits.append(level_logits)
      boxes.append(level_boxes)
    return jnp.concatenate(logits, axis=1), jnp.concatenate(boxes, axis=1)

  def torch_entries(self, prefix='box_head.predictor.'):
    entries = {}
    for name in ('cls_headers', 'reg_headers'):
      for level, conv in enumerate(getattr(self, name)):
        entries.update(layers.conv_entries(f'{prefix}{name}.{level}', conv))
    return entries


class SeparableConv(nnx.Module):
  """Depthwise 3x3 conv (with bias) + BatchNorm + ReLU6 + 1x1 conv.

  The reference's SeparableConv2d as its SSDLite predictor uses it.
  """

  def __init__(self, in_channels, out_channels, *, dtype=jnp.float32, rngs):
    init = nnx.initializers.xavier_uniform()
    self.depthwise = layers.conv2d(in_channels, in_channels, 3,
                                   groups=in_channels, dtype=dtype,
                                   kernel_init=init, rngs=rngs)
    self.norm = layers.BatchNorm(in_channels, dtype=dtype)
    self.pointwise = layers.conv2d(in_channels, out_channels, 1, dtype=dtype,
                                   kernel_init=init, rngs=rngs)

  def __call__(self, x):
    return self.pointwise(layers.relu6(self.norm(self.depthwise(x))))

  def torch_entries(self, key):
    return {**layers.conv_entries(f'{key}.conv.0', self.depthwise),
            **layers.batch_norm_entries(f'{key}.conv.1', self.norm),
            **layers.conv_entries(f'{key}.conv.3', self.pointwise)}


class SSDLitePredictor(nnx.Module):
  """The reference's SSDLiteBoxPredictor: a SeparableConv classification and
  regression head per feature map, plain 1x1 convs on the last one."""

  def __init__(self, in_channels, boxes_per_location, num_classes, *,
               dtype=jnp.float32, rngs):
    last = len(in_channels) - 1

    def head(level, i, o):
      if level == last:
        return layers.conv2d(i, o, 1, dtype=dtype,
                             kernel_init=nnx.initializers.xavier_uniform(),
                             rngs=rngs)
      return SeparableConv(i, o, dtype=dtype, rngs=rngs)

    self.dtype = dtype
    self.num_classes = num_classes
    specs = list(enumerate(zip(in_channels, boxes_per_location)))
    self.cls_headers = nnx.List([head(l, c, b * num_classes)
                                 for l, (c, b) in specs])
    self.reg_headers = nnx.List([head(l, c, b * 4) for l, (c, b) in specs])

  def __call__(self, features):
    """Feature maps [B, H_l, W_l, C_l] -> ([B, P, num_classes], [B, P, 4])."""
    batch = features[0].shape[0]
    logits, boxes = [], []
    for cls_head, reg_head, feature in zip(self.cls_headers, self.reg_headers,
                                           features):
      feature = feature.astype(self.dtype)
      logits.append(cls_head(feature).reshape(batch, -1, self.num_classes))
      boxes.append(reg_head(feature).reshape(batch, -1, 4))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(boxes, axis=1)

  def torch_entries(self, prefix='box_head.predictor.'):
    entries = {}
    for name in ('cls_headers', 'reg_headers'):
      for level, head in enumerate(getattr(self, name)):
        key = f'{prefix}{name}.{level}'
        if isinstance(head, SeparableConv):
          entries.update(head.torch_entries(key))
        else:
          entries.update(layers.conv_entries(key, head))
    return entries


# model.box_head.predictor -> predictor class (the reference's
# SSDBoxPredictor and SSDLiteBoxPredictor).
PREDICTORS = {'ssd': BoxPredictor, 'ssdlite': SSDLitePredictor}


class SSD(nnx.Module):
  """SSD from a config: `backbone` (BACKBONES[model.backbone.name]) and
  `box_head` (PREDICTORS[model.box_head.predictor]).

  Call on images [B, S, S, 3] (RGB, mean-subtracted, NHWC) to get
  `(cls_logits [B, P, C], bbox_pred [B, P, 4])`, in the compute dtype.
  """

  def __init__(self, config, *, rngs):
    m = config.model
    dtype = jnp.dtype(m.dtype)
    self.backbone = backbones.build_backbone(config, dtype=dtype, rngs=rngs)
    predictor = PREDICTORS[_predictor_name(config)]
    self.box_head = predictor(self.backbone.out_channels,
                              m.priors.boxes_per_location, m.num_classes,
                              dtype=dtype, rngs=rngs)

  def features(self, images, *, rngs=None):
    """The feature maps fed to the heads, largest first.

    `rngs`: an RngStream for the backbone's stochastic layers in training
    (EfficientNet's drop-connect, backbones with `uses_rngs`); others ignore
    it.
    """
    if rngs is not None and getattr(self.backbone, 'uses_rngs', False):
      return self.backbone(images, rngs=rngs)
    return self.backbone(images)

  def __call__(self, images, *, rngs=None):
    return self.box_head(self.features(images, rngs=rngs))

  def torch_entries(self):
    """{reference SSDDetector state-dict key: (variable, kind)}."""
    return {**self.backbone.torch_entries('backbone.'),
            **self.box_head.torch_entries('box_head.predictor.')}


def _predictor_name(config):
  box_head = config.model.get('box_head')
  name = 'ssd' if box_head is None else box_head.predictor
  if name not in PREDICTORS:
    raise ValueError(
        f'model.box_head.predictor={name!r} is not a known predictor; valid '
        f'names: {", ".join(sorted(PREDICTORS))}')
  return name


def feature_map_shapes(config):
  """((size, channels), ...) of the feature maps the backbone of `config`
  gives: its forward pass traced abstractly (jax.eval_shape, no weights are
  created or run), once per distinct model config and input size."""
  backbones.check_name(config.model.backbone.name)
  return _feature_map_shapes(
      ml_collections.ConfigDict(config.to_dict()).to_json_best_effort(
          sort_keys=True))


@functools.lru_cache(maxsize=64)
def _feature_map_shapes(config_json):
  config = ml_collections.ConfigDict(json.loads(config_json))
  size = config.input.image_size

  def features():
    backbone = backbones.build_backbone(config, dtype=jnp.float32,
                                        rngs=nnx.Rngs(0))
    return backbone(jnp.zeros((1, size, size, 3), jnp.float32))

  return tuple((s.shape[1], s.shape[3]) for s in jax.eval_shape(features))


def feature_map_sizes(config):
  """Spatial sizes of the feature maps the model of `config` produces."""
  return tuple(size for size, _ in feature_map_shapes(config))


def validate_config(config):
  """Raises ValueError when the config names an unknown backbone or
  predictor, or when the priors do not fit the model's feature maps."""
  m = config.model
  p = m.priors
  b = m.backbone
  _predictor_name(config)
  shapes = feature_map_shapes(config)
  sizes = tuple(s for s, _ in shapes)
  channels = tuple(c for _, c in shapes)
  problems = []
  if tuple(p.feature_maps) != sizes:
    problems.append(
        f'model.priors.feature_maps is {tuple(p.feature_maps)} but a '
        f'{config.input.image_size}px input gives feature maps {sizes} '
        f'with backbone {b.name!r}')
  if tuple(b.out_channels) != channels:
    problems.append(f'model.backbone.out_channels is {tuple(b.out_channels)} '
                    f'but the layers of backbone {b.name!r} give {channels}')
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
  """Builds the SSD of `config` (validated first); rngs defaults to config.seed.

  The whole initialisation is one compiled program (on this CPU 2
  compilations instead of ~60 op-by-op ones): the module's structure comes
  from an abstract build (`nnx.eval_shape`), its values from one jitted
  build with the same rngs, so the values are those an eager build draws
  (same initialisers, same keys) and `rngs` advances as it would.
  """
  validate_config(config)
  if isinstance(jnp.zeros(()) + 0, jax.core.Tracer):
    # Under a trace already (nnx.eval_shape, jit): build inline.
    with jax.threefry_partitionable(False):
      return SSD(config, rngs=rngs if rngs is not None
                 else nnx.Rngs(config.seed))
  if rngs is None:  # made inside the jitted build: no compilations of its own
    rngs_def, rngs_state = None, jnp.int32(config.seed)
  else:
    rngs_def, rngs_state = nnx.split(rngs)

  def build(rngs_state):
    stream = (nnx.Rngs(jax.random.key(rngs_state)) if rngs_def is None
              else nnx.merge(rngs_def, rngs_state))
    # The non-partitionable threefry draws the same numbers the eager build
    # always drew, and compiles several times faster; initialisation runs
    # unsharded anyway.
    with jax.threefry_partitionable(False):
      model = SSD(config, rngs=stream)
    return nnx.state(model), nnx.state(stream)

  abstract = nnx.eval_shape(lambda: SSD(config, rngs=nnx.Rngs(0)))
  # Runs once: compiling fast matters more than running fast.
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  model_state, new_rngs_state = jax.jit(build, compiler_options=options)(
      rngs_state)
  if rngs is not None:
    nnx.update(rngs, new_rngs_state)
  return nnx.merge(nnx.graphdef(abstract), model_state)
