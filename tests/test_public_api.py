"""The top-level API: every listed name resolves, lazily, and the
TensorFlow-free names keep TensorFlow out of the process."""

import json
import subprocess
import sys

import ssd_jax

_MODULES_SEEN = (
    'import json, sys\n'
    'print(json.dumps(sorted({k.split(".")[0] for k in sys.modules})))\n')


def _top_level_modules(code):
  out = subprocess.run([sys.executable, '-c', code + _MODULES_SEEN],
                       check=True, capture_output=True, text=True).stdout
  return set(json.loads(out.strip().splitlines()[-1]))


def _tensorflow_installed():
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) for m in ('tensorflow', 'clu'))


def test_every_name_resolves_to_its_object():
  names = ssd_jax.__all__
  if not _tensorflow_installed():  # the GPU machine: the TF-free names
    names = sorted(set(names) - ssd_jax.TENSORFLOW_NAMES)
  for name in names:
    value = getattr(ssd_jax, name)
    assert callable(value), name
  assert set(ssd_jax.__all__) <= set(dir(ssd_jax))
  assert ssd_jax.TENSORFLOW_NAMES <= set(ssd_jax.__all__)


def test_names_the_issue_lists_are_there():
  listed = {'create_model', 'generate_priors', 'encode_targets',
            'multibox_loss', 'create_optimizer', 'learning_rate_schedule',
            'create_mesh', 'create_train_state', 'make_train_step',
            'global_batch', 'normalize_images', 'create_train_iterator',
            'detect', 'eval_detection_voc', 'Detector', 'resize_for_model',
            'load_torch_checkpoint', 'load_pretrained_vgg'}
  assert listed <= set(ssd_jax.__all__)


def test_unknown_name_is_an_attribute_error():
  try:
    ssd_jax.no_such_name  # pylint: disable=pointless-statement
  except AttributeError as e:
    assert 'no_such_name' in str(e)
  else:
    raise AssertionError('expected AttributeError')


def test_import_alone_imports_neither_jax_nor_tensorflow():
  seen = _top_level_modules('import ssd_jax\n')
  assert not seen & {'jax', 'flax', 'tensorflow', 'tensorflow_datasets'}


def test_tensorflow_free_names_leave_tensorflow_out():
  names = sorted(set(ssd_jax.__all__) - ssd_jax.TENSORFLOW_NAMES)
  seen = _top_level_modules(
      'import ssd_jax\n'
      f'for name in {names!r}:\n'
      '  getattr(ssd_jax, name)\n')
  assert 'jax' in seen and 'flax' in seen
  assert not seen & {'tensorflow', 'tensorflow_datasets'}
