"""The reference fixtures' deterministic weights ("weight recipes").

Rebuild, with numpy only, the PyTorch state dicts that produced the fixtures
(see fixtures/README.md and fixtures/models/README.md):

* `recipe_state_dict()`: the SSD300 recipe of model_ref.npz,
  postprocess.npz and voc_tiny_dets.npz: keys sorted by string order, key k
  drawn from RandomState(5000 + k); conv weights N(0, sqrt(2 / fan_in)) (the
  first conv scaled by 0.02), biases N(0, 0.01), the L2Norm scale 20.
* `model_recipe_state_dict(name)`: the weights of fixtures/models/NAME.npz:
  the same VGG recipe with seed base 4000 for the vgg_* configs, the generic
  recipe (`generic_recipe_state_dict`, BatchNorm statistics included) for
  the others.
* `model_input(name)`: the NHWC input of fixtures/models/NAME.npz.
"""

import json
import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
MODEL_FIXTURES = os.path.join(FIXTURES, 'models')


def _load_shapes(path):
  with open(path) as f:
    return json.load(f)  # keeps the reference's module order


def model_shapes(name):
  """{key: shape} of fixtures/models/NAME_shapes.json, in module order."""
  return _load_shapes(os.path.join(MODEL_FIXTURES, f'{name}_shapes.json'))


def recipe_state_dict(shapes=None, seed_base=5000):
  """{key: float32 array in PyTorch layout (OIHW)} of the VGG-SSD recipe.

  shapes: {key: shape} in module order (default: the SSD300 state dict of
  fixtures/state_dict_shapes.json).
  """
  if shapes is None:
    shapes = _load_shapes(os.path.join(FIXTURES, 'state_dict_shapes.json'))
  state_dict = {}
  for k, key in enumerate(sorted(shapes)):
    shape = tuple(shapes[key])
    rs = np.random.RandomState(seed_base + k)
    if key == 'backbone.l2_norm.weight':
      value = np.full(shape, 20.0)
    elif key.endswith('.weight'):
      fan_in = shape[1] * shape[2] * shape[3]
      std = np.sqrt(2.0 / fan_in)
      if key == 'backbone.vgg.0.weight':
        std *= 0.02
      value = rs.normal(0.0, std, size=shape)
    else:
      value = rs.normal(0.0, 0.01, size=shape)
    state_dict[key] = value.astype(np.float32)
  # Keep the reference's module order (the JSON's insertion order).
  return {key: state_dict[key] for key in shapes}


def generic_recipe_state_dict(shapes, seed_base=4000):
  """The recipe of fixtures/models/README.md for the non-VGG configs.

  shapes: {key: shape} in module order. Key k of the sorted keys draws from
  RandomState(seed_base + k): running means N(0, 0.1), running variances
  U(0.5, 1.5), 1-D weights U(0.5, 1.5) (20 for an L2Norm), other weights
  N(0, sqrt(1 / fan_in)) (x0.02 for the first 4-D key in module order),
  biases N(0, 0.01); num_batches_tracked 0.
  """
  first_conv = next(key for key, shape in shapes.items() if len(shape) == 4)
  state_dict = {}
  for k, key in enumerate(sorted(shapes)):
    shape = tuple(shapes[key])
    rs = np.random.RandomState(seed_base + k)
    if key.endswith('num_batches_tracked'):
      state_dict[key] = np.zeros(shape, np.int64)
      continue
    if key.endswith('running_mean'):
      value = rs.normal(0.0, 0.1, shape)
    elif key.endswith('running_var'):
      value = rs.uniform(0.5, 1.5, shape)
    elif key.endswith('.weight') and len(shape) == 1:
      value = (np.full(shape, 20.0) if 'l2_norm' in key
               else rs.uniform(0.5, 1.5, shape))
    elif key.endswith('.weight'):
      std = np.sqrt(1.0 / np.prod(shape[1:]))
      if key == first_conv:
        std *= 0.02
      value = rs.normal(0.0, std, shape)
    else:
      value = rs.normal(0.0, 0.01, shape)
    state_dict[key] = value.astype(np.float32)
  return {key: state_dict[key] for key in shapes}


def model_recipe_state_dict(name):
  """The state dict behind fixtures/models/NAME.npz (reference layout)."""
  shapes = model_shapes(name)
  if name.startswith('vgg_'):
    return recipe_state_dict(shapes, seed_base=4000)
  return generic_recipe_state_dict(shapes)


def model_input(name, image_size):
  """The [1, S, S, 3] float32 NHWC input of fixtures/models/NAME.npz."""
  with np.load(os.path.join(MODEL_FIXTURES, f'{name}.npz')) as ref:
    seed = int(ref['input_seed'])
  images = np.random.RandomState(seed).normal(
      0, 50, (1, 3, image_size, image_size)).astype(np.float32)
  return images.transpose(0, 2, 3, 1)


def torch_shape(variable, kind):
  """The PyTorch-layout shape of a `torch_entries` variable."""
  shape = tuple(variable.shape)
  if kind in ('conv', 'depthwise'):
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == 'linear':
    return (shape[1], shape[0])
  return shape


def recipe_model(config, seed_base=4000):
  """The model of `config`, built abstractly and filled with the generic
  recipe over its reference keys (fast: no random initialisation runs)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  from ssd_jax.interop import torch_import  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: models.create_model(config))
  shapes = {key: torch_shape(variable, kind)
            for key, (variable, kind) in model.torch_entries().items()}
  torch_import.load_detector_state_dict(
      model, generic_recipe_state_dict(shapes, seed_base))
  return model


def import_recipe_checkpoint(tmp_path, config_file, *flags):
  """The recipe state dict saved by torch as a reference checkpoint (step
  120000), imported by `python import_torch.py --config=config_file
  *flags` into tmp_path/'imported'; returns that workdir."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  checkpoint = tmp_path / 'model_final.pth'
  torch.save({'model': {k: torch.from_numpy(v)
                        for k, v in recipe_state_dict().items()},
              'iteration': 120000}, str(checkpoint))
  workdir = tmp_path / 'imported'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, 'import_torch.py',
                  f'--checkpoint={checkpoint}', f'--config={config_file}',
                  *flags, f'--workdir={workdir}'],
                 cwd=root, env=dict(os.environ, PYTHONPATH=root), check=True,
                 capture_output=True)
  return workdir
