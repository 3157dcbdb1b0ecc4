import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.interop import torch_import
from ssd_jax.models import layers
from ssd_jax.training import checkpointing
from tests.recipe import recipe_state_dict
from tests.reference_data import load_fixture
from tests.tiny import tiny_config

torch = pytest.importorskip('torch')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def recipe_checkpoint(tmp_path_factory):
  """A reference-style training checkpoint holding the recipe weights."""
  path = str(tmp_path_factory.mktemp('torch') / 'model_000500.pth')
  state_dict = {k: torch.from_numpy(v) for k, v in recipe_state_dict().items()}
  torch.save({'model': state_dict, 'optimizer': {'state': {}},
              'iteration': 500}, path)
  return path


@pytest.fixture(scope='module')
def imported_model(recipe_checkpoint, ssd300_config):
  return torch_import.load_torch_checkpoint(recipe_checkpoint, ssd300_config)


@nnx.jit(static_argnums=2)
def _forward_with_features(model, images, cpu_kernels):
  with layers.cpu_kernels(cpu_kernels):
    return model(images), model.features(images)


def test_vgg_indices_follow_reference_module_list():
  assert torch_import.torch_vgg_indices() == [
      0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]


# Both paths: with the CPU kernels (Winograd etc.) and plain XLA (GPU/export).
@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_forward_with_imported_weights_equals_reference(imported_model,
                                                        cpu_kernels):
  ref = load_fixture('model_ref.npz')
  images = jnp.asarray(ref['input'].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  with jax.default_matmul_precision('highest'):
    (cls_logits, bbox_pred), features = _forward_with_features(
        imported_model, images, cpu_kernels)
  np.testing.assert_allclose(np.asarray(cls_logits), ref['cls_logits'],
                             atol=1e-3, rtol=0)
  np.testing.assert_allclose(np.asarray(bbox_pred), ref['bbox_pred'],
                             atol=1e-3, rtol=0)
  for level, feature in enumerate(features):
    expected = ref[f'feat{level}_chsum']
    np.testing.assert_allclose(np.asarray(feature).sum(-1), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_reference_state_dict_inverts_the_import(ssd300_config):
  state_dict = recipe_state_dict()
  model = nnx.eval_shape(lambda: models.create_model(ssd300_config))
  torch_import.load_detector_state_dict(model, state_dict)
  exported = torch_import.reference_state_dict(model)
  assert list(exported) == list(model.torch_entries())
  assert set(exported) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_bare_and_ddp_state_dicts_are_accepted(ssd300_config):
  state_dict = recipe_state_dict()
  model = nnx.eval_shape(lambda: models.create_model(ssd300_config))
  ddp = {'module.' + k: v for k, v in state_dict.items()}
  found = torch_import.detector_state_dict(ddp)
  assert set(found) == set(state_dict)
  torch_import.load_detector_state_dict(model, found)
  np.testing.assert_array_equal(
      np.asarray(model.box_head.reg_headers[2].kernel[...]),
      state_dict['box_head.predictor.reg_headers.2.weight'].transpose(2, 3, 1, 0))


def test_pretrained_vgg_file_loads_into_the_backbone(tmp_path, ssd300_config):
  state_dict = recipe_state_dict()
  vgg = {k[len('backbone.vgg.'):]: torch.from_numpy(v)
         for k, v in state_dict.items() if k.startswith('backbone.vgg.')}
  assert len(vgg) == 30
  path = str(tmp_path / 'vgg16_reducedfc.pth')
  torch.save(vgg, path)
  model = nnx.eval_shape(lambda: models.create_model(ssd300_config))
  torch_import.load_pretrained_vgg(model, path)
  np.testing.assert_array_equal(
      np.asarray(model.backbone.vgg[13].kernel[...]),  # conv6 = key 31
      state_dict['backbone.vgg.31.weight'].transpose(2, 3, 1, 0))


def test_clear_errors(tmp_path, ssd300_config):
  model = nnx.eval_shape(lambda: models.create_model(ssd300_config))
  state_dict = recipe_state_dict()
  with pytest.raises(FileNotFoundError, match='not found'):
    torch_import.load_pretrained_vgg(model, str(tmp_path / 'missing.pth'))
  incomplete = dict(state_dict)
  del incomplete['backbone.extras.3.bias']
  with pytest.raises(KeyError, match=r'Missing keys: \[.backbone.extras.3.bias'):
    torch_import.load_detector_state_dict(model, incomplete)
  extra = dict(state_dict, **{'backbone.extras.99.weight': np.zeros(1)})
  with pytest.raises(KeyError, match='unexpected keys: .*extras.99'):
    torch_import.load_detector_state_dict(model, extra)
  wrong = dict(state_dict)
  wrong['box_head.predictor.cls_headers.0.weight'] = np.zeros((8, 512, 3, 3))
  with pytest.raises(ValueError, match='cls_headers.0.weight has shape'):
    torch_import.load_detector_state_dict(model, wrong)
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='not a PyTorch checkpoint'):
    torch_import.read_torch_file(str(garbage))


def test_batch_norm_models_cannot_take_reference_weights():
  config = tiny_config()
  config.model.backbone.batch_norm = True
  model = nnx.eval_shape(lambda: models.create_model(config))
  with pytest.raises(ValueError, match='BatchNorm'):
    torch_import.load_detector_state_dict(model, {})


def test_command_writes_a_restorable_workdir(tmp_path, recipe_checkpoint,
                                             imported_model):
  workdir = str(tmp_path / 'imported')
  subprocess.run(
      [sys.executable, 'import_torch.py',
       f'--checkpoint={recipe_checkpoint}',
       f'--config={os.path.join(ROOT, "configs/ssd300_voc.py")}',
       f'--workdir={workdir}'],
      check=True, cwd=ROOT, capture_output=True)
  config = checkpointing.load_config(workdir)
  assert config.model.priors.aspect_ratios == ((2,), (2, 3), (2, 3), (2, 3),
                                               (2,), (2,))
  checkpointer = checkpointing.Checkpointer(workdir)
  assert checkpointer.latest_step() == 500
  target = nnx.to_pure_dict(nnx.state(imported_model))
  restored = checkpointer.restore(None, target)
  assert restored['meta']['step'] == 500
  for a, b in zip(jax.tree.leaves(restored['model']), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
