"""model.backbone.name -> the constructor of that backbone.

Every constructor is `build(config, *, dtype, rngs) -> nnx.Module` and the
module it returns keeps one contract:

* `__call__(images)`: images [B, S, S, 3], RGB, mean-subtracted, NHWC ->
  list of the feature maps fed to the box head, NHWC, largest first (the
  maps the reference's backbone returns, e.g. VGG: L2Norm(conv4_3), conv7
  and the extra levels);
* `out_channels`: tuple, the channels of those maps;
* `torch_entries(prefix='backbone.')`: {reference state-dict key:
  (nnx.Variable, kind)} for every parameter and BatchNorm statistic, kind
  'conv', 'depthwise', 'linear' or 'vector' (see layers.conv_entries);
  torch_import fills the model from these.
"""


def _vgg(config, *, dtype, rngs):
  from ssd_jax.models import vgg  # pylint: disable=g-import-not-at-top
  return vgg.build(config, dtype=dtype, rngs=rngs)


def _mobilenet_v2(config, *, dtype, rngs):
  from ssd_jax.models import mobilenet_v2  # pylint: disable=g-import-not-at-top
  return mobilenet_v2.build(config, dtype=dtype, rngs=rngs)


def _mobilenet_v3(config, *, dtype, rngs):
  from ssd_jax.models import mobilenet_v3  # pylint: disable=g-import-not-at-top
  return mobilenet_v3.build(config, dtype=dtype, rngs=rngs)


def _efficientnet_b3(config, *, dtype, rngs):
  from ssd_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  return efficientnet.build(config, dtype=dtype, rngs=rngs)


BACKBONES = {
    'vgg': _vgg,
    'mobilenet_v2': _mobilenet_v2,
    'mobilenet_v3': _mobilenet_v3,
    'efficientnet_b3': _efficientnet_b3,
}


def check_name(name):
  """Raises ValueError unless `name` is a key of BACKBONES."""
  if name not in BACKBONES:
    raise ValueError(
        f'model.backbone.name={name!r} is not a known backbone; valid names: '
        f'{", ".join(sorted(BACKBONES))}')


def build_backbone(config, *, dtype, rngs):
  """The backbone module named by `config.model.backbone.name`."""
  name = config.model.backbone.name
  check_name(name)
  return BACKBONES[name](config, dtype=dtype, rngs=rngs)
