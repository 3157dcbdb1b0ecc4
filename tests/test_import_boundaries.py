"""The core never imports TensorFlow (the GPU machines have JAX but no TF)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ['ssd_jax.core.box_ops', 'ssd_jax.core.priors', 'ssd_jax.core.targets',
        'ssd_jax.core.losses', 'ssd_jax.models', 'ssd_jax.training.optim',
        'ssd_jax.training.checkpointing', 'ssd_jax.interop.torch_import']
OPTIONAL_CORE = ['ssd_jax.training.train_step', 'ssd_jax.runtime.sharding',
                 'ssd_jax.runtime.kernels', 'ssd_jax.runtime.variables',
                 'ssd_jax.runtime.predict', 'ssd_jax.evaluation.postprocess',
                 'ssd_jax.evaluation.voc_eval', 'ssd_jax.deploy.inference',
                 'ssd_jax.deploy.export']


def _imports_tensorflow(modules):
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n'
          'print(sorted(k for k in sys.modules if k.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return out.strip()


def test_core_modules_leave_tensorflow_out():
  assert _imports_tensorflow(CORE) == '[]'


@pytest.mark.parametrize('module', OPTIONAL_CORE)
def test_step_and_host_eval_modules_leave_tensorflow_out(module):
  path = os.path.join(ROOT, *module.split('.')) + '.py'
  if not os.path.exists(path):
    pytest.skip(f'{module} not written yet')
  assert _imports_tensorflow([module]) == '[]'


# Part -> the parts of ssd_jax it may import (besides itself).
ALLOWED_PARTS = {
    'core': set(),
    'models': {'core'},
    'data': {'core'},
    'runtime': {'core', 'models'},
}


def _ssd_jax_imports(path):
  """Top-level part names of the ssd_jax modules a file imports."""
  import ast  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    tree = ast.parse(f.read())
  parts = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'ssd_jax':
        names = [alias.name for alias in node.names]
      else:
        names = [node.module[len('ssd_jax.'):]] if node.module.startswith(
            'ssd_jax.') else []
    elif isinstance(node, ast.Import):
      names = [alias.name[len('ssd_jax.'):] for alias in node.names
               if alias.name.startswith('ssd_jax.')]
    parts.update(name.split('.')[0] for name in names)
  return parts


@pytest.mark.parametrize('part', sorted(ALLOWED_PARTS))
def test_lower_parts_never_import_upward(part):
  folder = os.path.join(ROOT, 'ssd_jax', part)
  for name in sorted(os.listdir(folder)):
    if name.endswith('.py'):
      imported = _ssd_jax_imports(os.path.join(folder, name)) - {part}
      assert imported <= ALLOWED_PARTS[part], (
          f'ssd_jax/{part}/{name} imports {sorted(imported)}')
