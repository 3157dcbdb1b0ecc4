"""Fine-tuning from a workdir written by ssd_jax.interop.torch_import, and workdirs
whose checkpoints do not fit the config."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from ssd_jax import models
from ssd_jax.evaluation import workdir as workdir_eval
from ssd_jax.runtime import sharding
from ssd_jax.training import checkpointing
from ssd_jax.training import optim
from ssd_jax.training import train_step as train_step_lib
from ssd_jax.training import trainer
from tests.tiny import reference_state_dict, tiny_config, tiny_shapes_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r'iter: (\d{6}), lr: (\d\.\d{5}), total_loss: (\S+) ')
IMPORTED_STEP = 8

# The command line importer, run with torch unimportable.
_IMPORT_WITHOUT_TORCH = '''
import runpy, sys
sys.modules['torch'] = None
sys.argv = ['import_torch.py'] + sys.argv[1:]
runpy.run_path('import_torch.py', run_name='__main__')
'''


def _finetune_config(root):
  config = tiny_shapes_config(root)
  config.model.backbone.batch_norm = False  # the reference VGG
  config.solver.optimizer = 'sgd'
  config.solver.lr = 1e-3
  config.solver.warmup_iters = 10
  config.solver.lr_steps = (11,)
  config.solver.max_iter = IMPORTED_STEP + 4
  return config


def _import(tmp_path, config):
  """A reference checkpoint of `config`'s model -> the importer -> workdir."""
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'model_000008.pth')
  state_dict = {k: torch.from_numpy(v)
                for k, v in reference_state_dict(config).items()}
  torch.save({'model': state_dict, 'optimizer': {'state': {}, 'param_groups':
                                                 [{'lr': 1e-3}]},
              'iteration': IMPORTED_STEP}, path)
  config_file = tmp_path / 'config.py'
  config_file.write_text(  # the same model as `config`
      'from tests.tiny import tiny_shapes_config\n'
      'def get_config():\n'
      f'  config = tiny_shapes_config({str(tmp_path)!r})\n'
      '  config.model.backbone.batch_norm = False\n'
      '  return config\n')
  workdir = str(tmp_path / 'workdir')
  result = subprocess.run(
      [sys.executable, '-c', _IMPORT_WITHOUT_TORCH, f'--checkpoint={path}',
       f'--config={config_file}', f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _train_state_targets(config):
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  _, state = train_step_lib.create_train_state(model, tx, sharding.create_mesh())
  return train_step_lib.state_to_checkpoint(state)


def test_train_continues_from_an_imported_checkpoint(tmp_path):
  config = _finetune_config(tmp_path)
  workdir = _import(tmp_path, config)
  checkpointer = checkpointing.Checkpointer(workdir)
  assert checkpointer.all_steps() == [IMPORTED_STEP]
  assert not checkpointer.has_opt_state(IMPORTED_STEP)

  trainer.train_and_evaluate(config, workdir)

  with open(os.path.join(workdir, 'log.txt')) as f:
    log = f.read()
  assert 'has no optimizer state' in log
  assert f'Start training from iteration {IMPORTED_STEP}' in log
  lines = {int(m.group(1)): m for m in LOG_LINE.finditer(log)}
  assert sorted(lines) == [9, 10, 11, 12]
  for step, m in lines.items():
    assert np.isfinite(float(m.group(3)))
    assert m.group(2) == f'{optim.learning_rate_at(config, step):.5f}'
  checkpointer = checkpointing.Checkpointer(workdir)
  assert checkpointer.all_steps() == [IMPORTED_STEP, 12]
  assert checkpointer.has_opt_state(12)
  model_tree, opt_state = _train_state_targets(config)
  restored = checkpointer.restore(12, model_tree, opt_state)
  # The optimizer's schedule continued from the imported step: 8 + 4 updates
  # (a fresh count would stand at 4 and warm up again).
  counts = [node.count for node in jax.tree.leaves(
      restored['opt_state'],
      is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
            if isinstance(node, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [12]
  imported = checkpointer.restore(IMPORTED_STEP, model_tree)['model']
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(imported), jax.tree.leaves(restored['model']))]
  assert all(changed)


def _model_only_workdir(config, workdir):
  """A workdir holding one model-only checkpoint of `config` (step 4)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: models.create_model(config))
  tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                      nnx.to_pure_dict(nnx.state(model)))
  checkpointing.save_config(workdir, config)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(4, tree)
  checkpointer.close()


@pytest.mark.parametrize('change, expected', [
    ('num_classes', r'box_head/cls_headers/0/kernel: checkpoint '
                    r'\(3, 3, 32, 16\), config \(3, 3, 32, 24\)'),
    ('width', r'backbone/vgg/0/kernel: checkpoint \(3, 3, 3, 4\), '
              r'config \(3, 3, 3, 8\)'),
])
def test_checkpoint_of_another_model_is_one_clear_error(tmp_path, change,
                                                        expected):
  config = tiny_config(num_classes=4)
  config.model.backbone.batch_norm = False
  workdir = str(tmp_path)
  _model_only_workdir(config, workdir)
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    saved_config = f.read()
  other = tiny_config(num_classes=6 if change == 'num_classes' else 4)
  other.model.backbone.batch_norm = False
  if change == 'width':
    other.model.backbone.width_divisor = 8
    other.model.backbone.out_channels = (64, 128, 32, 32)
  for run in (trainer.train_and_evaluate, workdir_eval.evaluate_workdir):
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=expected) as error:
      run(other, workdir)
    assert 'config.json' in str(error.value)
  # The failed train.py run left the workdir's config alone.
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    assert f.read() == saved_config


def test_eval_command_reports_the_mismatch_without_a_traceback(tmp_path):
  config = tiny_config(num_classes=4)
  config.model.backbone.batch_norm = False
  workdir = str(tmp_path / 'workdir')
  _model_only_workdir(config, workdir)
  config_file = tmp_path / 'six_classes.py'
  config_file.write_text(
      'from tests.tiny import tiny_config\n'
      'def get_config():\n'
      '  config = tiny_config(num_classes=6)\n'
      '  config.model.backbone.batch_norm = False\n'
      '  return config\n')
  result = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}',
       f'--config={config_file}'],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert 'eval.py: ' in result.stderr and 'does not fit' in result.stderr
  assert 'config (3, 3, 32, 24)' in result.stderr
  assert 'Traceback' not in result.stderr
