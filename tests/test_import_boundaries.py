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
