"""PyTorch checkpoints of the reference implementation -> Flax NNX models.

Two kinds of file:
  (a) a full reference checkpoint: a dict whose 'model' entry is the
      SSDDetector state dict (or that state dict itself), keys
      `backbone.vgg.N.*`, `backbone.l2_norm.weight`, `backbone.extras.N.*`,
      `box_head.predictor.{cls,reg}_headers.N.*`;
  (b) the VGG16 reduced-fc backbone (vgg16_reducedfc.pth), keys `N.weight`,
      `N.bias` of the VGG ModuleList.
Conv weights are OIHW there and HWIO here.

Command line (writes an Orbax checkpoint that eval.py can evaluate):
  python -m ssd_jax.torch_import --checkpoint=F.pth \
      --config=configs/ssd300_voc.py --workdir=W
"""

import os

import jax.numpy as jnp
import numpy as np

from ssd_jax.models import vgg as vgg_lib


def torch_vgg_indices():
  """Index of each of our `backbone.vgg[i]` convs in the reference ModuleList.

  The reference list holds conv, ReLU and pool modules: 0, 2, 5, ..., 28 for
  the VGG16 convs, 31 for conv6 and 33 for conv7.
  """
  indices, position = [], 0
  for layer in vgg_lib.VGG16_LAYERS:
    if isinstance(layer, str):
      position += 1  # pool
    else:
      indices.append(position)
      position += 2  # conv, relu
  position += 1  # pool5
  indices += [position, position + 2]  # conv6, relu, conv7
  return indices


def _conv_entries(prefix, conv):
  return {f'{prefix}.weight': (conv.kernel, 'conv'),
          f'{prefix}.bias': (conv.bias, 'bias')}


def _backbone_entries(model, prefix):
  backbone = model.backbone
  if backbone.norms is not None:
    raise ValueError('PyTorch import supports the reference VGG (no '
                     'BatchNorm); set model.backbone.batch_norm=False')
  entries = {}
  for ours, theirs in enumerate(torch_vgg_indices()):
    entries.update(_conv_entries(f'{prefix}{theirs}', backbone.vgg[ours]))
  return entries


def _detector_entries(model):
  entries = _backbone_entries(model, 'backbone.vgg.')
  entries['backbone.l2_norm.weight'] = (model.backbone.l2_norm.weight, 'bias')
  for i, conv in enumerate(model.extras.extras):
    entries.update(_conv_entries(f'backbone.extras.{i}', conv))
  head = model.box_head
  for l, conv in enumerate(head.cls_headers):
    entries.update(_conv_entries(f'box_head.predictor.cls_headers.{l}', conv))
  for l, conv in enumerate(head.reg_headers):
    entries.update(_conv_entries(f'box_head.predictor.reg_headers.{l}', conv))
  return entries


def _assign(entries, state_dict, source):
  """Copies `state_dict` arrays into the model params named by `entries`."""
  missing = sorted(set(entries) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(entries))
  if missing or unexpected:
    raise KeyError(
        f'{source}: state dict does not fit the model of this config. '
        f'Missing keys: {missing or "none"}; unexpected keys: '
        f'{unexpected or "none"}')
  converted = {}
  for key, (param, kind) in entries.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    want = tuple(param.shape)
    if kind == 'conv':
      want = (want[3], want[2], want[0], want[1])  # HWIO -> OIHW
    if value.shape != want:
      raise ValueError(f'{source}: {key} has shape {value.shape}, the model '
                       f'of this config expects {want}')
    converted[key] = value.transpose(2, 3, 1, 0) if kind == 'conv' else value
  for key, (param, _) in entries.items():
    param.set_value(jnp.asarray(converted[key], jnp.float32))


def _to_numpy_state_dict(obj, source):
  if not isinstance(obj, dict):
    raise ValueError(f'{source}: expected a state dict, got {type(obj).__name__}')
  out = {}
  for key, value in obj.items():
    if hasattr(value, 'detach'):
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out


def read_torch_file(path):
  """torch.load of a .pth file on the CPU (tensors only, no pickled code)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'PyTorch checkpoint not found: {path}')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'Reading .pth files needs PyTorch: pip install "ssd_jax[torch]" '
        '(on a CPU machine e.g. pip install torch==2.13.0)') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: cannot be read as a PyTorch checkpoint '
                     f'({type(e).__name__}: {e})') from e


def detector_state_dict(obj, source='checkpoint'):
  """The SSDDetector state dict inside a reference checkpoint object."""
  if isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], dict):
    obj = obj['model']
  state_dict = _to_numpy_state_dict(obj, source)
  # A DistributedDataParallel state dict prefixes every key with 'module.'.
  if state_dict and all(k.startswith('module.') for k in state_dict):
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  return state_dict


def load_detector_state_dict(model, state_dict, source='state dict'):
  """Sets every parameter of `model` from a reference SSDDetector state dict."""
  _assign(_detector_entries(model), state_dict, source)
  return model


def load_vgg_state_dict(model, state_dict, source='state dict'):
  """Sets the VGG convs of `model` from a vgg16_reducedfc state dict."""
  _assign(_backbone_entries(model, ''), state_dict, source)
  return model


def load_torch_checkpoint(path, config):
  """A model of `config` holding the weights of a reference .pth checkpoint."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  obj = read_torch_file(path)
  # Every parameter comes from the file, so the model is built abstractly
  # (no random initialisation) and then filled in.
  model = nnx.eval_shape(lambda: models.create_model(config))
  return load_detector_state_dict(model, detector_state_dict(obj, path), path)


def load_pretrained_vgg(model, path):
  """Loads vgg16_reducedfc.pth (keys 0.weight ... 33.bias) into `model`."""
  obj = read_torch_file(path)
  return load_vgg_state_dict(model, _to_numpy_state_dict(obj, path), path)


def checkpoint_iteration(path):
  """The 'iteration' stored in a reference checkpoint, or 0."""
  obj = read_torch_file(path)
  if isinstance(obj, dict) and isinstance(obj.get('iteration'), int):
    return obj['iteration']
  return 0


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  model = load_torch_checkpoint(flags.FLAGS.checkpoint, config)
  step = checkpoint_iteration(flags.FLAGS.checkpoint)
  workdir = flags.FLAGS.workdir
  checkpointing.save_config(workdir, config)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(step, nnx.to_pure_dict(nnx.state(model)),
                    meta={'source': os.path.abspath(flags.FLAGS.checkpoint)})
  checkpointer.close()
  print(f'Wrote {checkpointer.directory}/{step} and '
        f'{os.path.join(workdir, checkpointing.CONFIG_FILE)} from '
        f'{flags.FLAGS.checkpoint}')


def _run():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Reference .pth checkpoint.')
  flags.DEFINE_string('workdir', None, 'Output workdir for eval.py.')
  config_flags.DEFINE_config_file('config', None, 'Model config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['checkpoint', 'workdir', 'config'])
  app.run(main)


if __name__ == '__main__':
  _run()
