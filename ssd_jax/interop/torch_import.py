"""PyTorch checkpoints of the reference implementation -> Flax NNX models.

Two kinds of file:
  (a) a full reference checkpoint: a dict whose 'model' entry is the
      SSDDetector state dict (or that state dict itself), keys
      `backbone.*` (e.g. `backbone.vgg.N.*`, `backbone.l2_norm.weight`,
      `backbone.extras.N.*`) and `box_head.predictor.{cls,reg}_headers.N.*`;
  (b) an ImageNet backbone the reference starts from: vgg16_reducedfc.pth
      (keys `N.weight`, `N.bias` of the VGG ModuleList), torchvision's
      MobileNetV2, the MobileNetV3 of d-li14/mobilenetv3.pytorch, or the
      EfficientNet weights (see load_pretrained_backbone).
Every backbone and predictor names its variables by reference key
(`torch_entries`). Conv weights are OIHW there and HWIO here, Linear
weights [out, in] there and [in, out] here; BatchNorm running statistics are
imported, `num_batches_tracked` is ignored.

Command line (writes an Orbax checkpoint that eval.py can evaluate):
  python import_torch.py --checkpoint=F.pth --config=configs/ssd300_voc.py \
      --workdir=W
"""

import os

import jax.numpy as jnp
import numpy as np

from ssd_jax.interop import pth_reader
from ssd_jax.models import vgg as vgg_lib


def torch_vgg_indices():
  """Index of each of our `backbone.vgg[i]` convs in the reference ModuleList."""
  return vgg_lib.torch_vgg_indices()


def _convert(value, variable, kind):
  """A PyTorch-layout array -> the layout of `variable` (None if misshapen)."""
  want = tuple(variable.shape)
  if kind in ('conv', 'depthwise'):
    # OIHW -> HWIO; a depthwise [C, 1, kh, kw] becomes [kh, kw, 1, C].
    torch_shape = (want[3], want[2], want[0], want[1])
    transpose = (2, 3, 1, 0)
  elif kind == 'linear':
    torch_shape, transpose = (want[1], want[0]), (1, 0)
  elif kind == 'vector':
    torch_shape, transpose = want, None
  else:
    raise ValueError(f'unknown torch entry kind {kind!r}')
  if value.shape != torch_shape:
    return None, torch_shape
  return (value if transpose is None else value.transpose(transpose)), None


def _assign(entries, state_dict, source, strict=True):
  """Copies `state_dict` arrays into the model variables named by `entries`.

  `entries`: {state-dict key: (nnx.Variable, kind)} (see
  ssd_jax.models.backbones). Keys ending in `num_batches_tracked` are ignored.
  strict: every entry and every key must match (one KeyError names the
  missing and unexpected keys); strict=False takes the keys that both have,
  as PyTorch's load_state_dict(strict=False). Returns the keys taken.
  """
  state_dict = {k: v for k, v in state_dict.items()
                if not k.endswith('num_batches_tracked')}
  if strict:
    missing = sorted(set(entries) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(entries))
    if missing or unexpected:
      raise KeyError(
          f'{source}: state dict does not fit the model of this config. '
          f'Missing keys: {missing or "none"}; unexpected keys: '
          f'{unexpected or "none"}')
  taken = [key for key in entries if key in state_dict]
  converted = {}
  for key in taken:
    variable, kind = entries[key]
    value = np.asarray(state_dict[key], dtype=np.float32)
    converted[key], want = _convert(value, variable, kind)
    if converted[key] is None:
      raise ValueError(f'{source}: {key} has shape {value.shape}, the model '
                       f'of this config expects {want}')
  for key in taken:
    variable, _ = entries[key]
    variable.set_value(jnp.asarray(converted[key], jnp.float32))
  return taken


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
  """The object saved in a .pth file, tensors as numpy arrays.

  Read by ssd_jax.interop.pth_reader (no PyTorch needed; only tensors and plain
  values are unpickled, never code). Raises FileNotFoundError, or ValueError
  (pth_reader.PthReadError) for a file that is not a readable checkpoint.
  """
  return pth_reader.load(path)


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
  """Sets every parameter and BatchNorm statistic of `model` from a reference
  SSDDetector state dict (any backbone and predictor)."""
  _assign(model.torch_entries(), state_dict, source)
  return model


def reference_state_dict(model):
  """{reference key: float32 numpy array in its layout} of `model`.

  The inverse of `load_detector_state_dict` (conv kernels OIHW, Linear
  weights [out, in]), for comparing with reference weights.
  """
  inverse = {'conv': (3, 2, 0, 1), 'depthwise': (3, 2, 0, 1),
             'linear': (1, 0), 'vector': None}
  out = {}
  for key, (variable, kind) in model.torch_entries().items():
    value = np.asarray(variable[...], np.float32)
    out[key] = value if inverse[kind] is None else value.transpose(
        inverse[kind])
  return out


def load_vgg_state_dict(model, state_dict, source='state dict'):
  """Sets the VGG convs of `model` from a vgg16_reducedfc state dict."""
  _assign(model.backbone.vgg_torch_entries(''), state_dict, source)
  return model


def load_backbone_state_dict_non_strict(model, state_dict,
                                        source='state dict'):
  """The reference's `backbone.load_state_dict(weights, strict=False)`.

  Takes every key of `state_dict` that names a variable of `model.backbone`
  (in the reference's backbone layout, without the 'backbone.' prefix) and
  leaves the others: the ImageNet classifier's keys are skipped, the
  backbone's layers the file lacks keep their initialisation. A taken key of
  the wrong shape is an error, as in PyTorch. Returns the keys taken.
  """
  taken = _assign(model.backbone.torch_entries(''), state_dict, source,
                  strict=False)
  if not taken:
    raise ValueError(
        f'{source}: no key fits the {type(model.backbone).__name__} backbone '
        f'(first keys of the file: {sorted(state_dict)[:5]}); is it the '
        'ImageNet checkpoint of model.backbone.name?')
  return taken


def load_pretrained_backbone(model, path, config):
  """Loads the ImageNet weights at `path` as the reference does for
  `config.model.backbone.name`: vgg16_reducedfc.pth strictly into the VGG
  convs; the MobileNet and EfficientNet files non-strictly into the
  backbone. Returns the state-dict keys taken."""
  name = config.model.backbone.name
  state_dict = _to_numpy_state_dict(read_torch_file(path), path)
  if name == 'vgg':
    load_vgg_state_dict(model, state_dict, path)
    return sorted(model.backbone.vgg_torch_entries(''))
  return load_backbone_state_dict_non_strict(model, state_dict, path)


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


def import_to_workdir(checkpoint_path, config, workdir):
  """Writes a reference checkpoint as an Orbax checkpoint eval.py reads.

  The checkpoint step is the file's stored 'iteration' (0 if none); the
  config is saved next to it, as train.py saves its own.

  Returns the step written.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  model = load_torch_checkpoint(checkpoint_path, config)
  step = checkpoint_iteration(checkpoint_path)
  checkpointing.save_config(workdir, config)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(step, nnx.to_pure_dict(nnx.state(model)),
                    meta={'source': os.path.abspath(checkpoint_path)})
  checkpointer.close()
  return step
