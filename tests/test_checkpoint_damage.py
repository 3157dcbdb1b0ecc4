"""Damaged checkpoints are skipped (moved aside on resume); failed saves
stop with one error naming the path."""

import errno
import glob
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from ssd_jax.training import checkpointing

LOGGER = logging.getLogger('test_checkpoint_damage')


def _save_steps(workdir, steps=(4, 8)):
  checkpointer = checkpointing.Checkpointer(str(workdir))
  for step in steps:
    checkpointer.save(step, {'w': jnp.arange(1000.0) * step},
                      opt_state={'m': jnp.full(50, float(step))})
  checkpointer.close()


def _largest(pattern):
  return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  open(path, 'wb').write(data)


@pytest.mark.parametrize('damage, files', [
    (_truncate, 'model/ocdbt.process_0/d/*'),   # array data
    (_garble, 'model/ocdbt.process_0/d/*'),     # one bit of array data
    (_garble, 'model/_METADATA'),
    (_truncate, 'meta/metadata'),
])
def test_resume_moves_a_damaged_latest_aside(tmp_path, caplog, damage, files):
  _save_steps(tmp_path)
  damage(_largest(str(tmp_path / 'checkpoints' / '8' / files)))
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    assert checkpointer.latest_intact_step(LOGGER, move_damaged=True) == 4
  assert f'{checkpointer.step_path(8)} is damaged' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8.damaged-1']
  assert checkpointer.latest_step() == 4
  # Step 8 is written again; the damaged copy stays.
  checkpointer.save(8, {'w': jnp.zeros(1000)})
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == [
      '4', '8', '8.damaged-1']


def test_without_a_manifest_the_checkpoint_is_read_back(tmp_path):
  _save_steps(tmp_path)
  os.remove(tmp_path / 'checkpoints' / '8' / checkpointing.MANIFEST_FILE)
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  assert checkpointer.damage(8) is None
  _truncate(_largest(str(tmp_path / 'checkpoints/8/model/ocdbt.process_0/d/*')))
  assert checkpointer.damage(8) is not None
  checkpointer.close()


def test_none_intact_is_an_error_naming_the_workdir(tmp_path):
  _save_steps(tmp_path)
  for step in (4, 8):
    _garble(str(tmp_path / 'checkpoints' / str(step) / 'model' / '_METADATA'))
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match=f'no intact checkpoint in {tmp_path}'):
    checkpointer.latest_intact_step(LOGGER, move_damaged=True)
  # Nothing deleted.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == [
      '4.damaged-1', '8.damaged-1']


def test_eval_skips_damaged_without_moving_and_refuses_a_damaged_step(
    tmp_path, caplog):
  _save_steps(tmp_path)
  _garble(_largest(str(tmp_path / 'checkpoints/8/model/ocdbt.process_0/d/*')))
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    assert checkpointer.latest_intact_step(LOGGER) == 4
  assert 'skipped' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8']
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match=r'checkpoints/8 is damaged'):
    checkpointer.check_intact(8)
  checkpointer.check_intact(4)
  checkpointer.close()


def test_a_failed_save_names_the_path_and_the_free_space(tmp_path,
                                                          monkeypatch):
  # Tests may run as root, for whom a read-only folder is writable: the
  # failure comes from the write itself.
  _save_steps(tmp_path, steps=(4,))
  checkpointer = checkpointing.Checkpointer(str(tmp_path))

  def disk_full(self, *args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

  monkeypatch.setattr(epath.Path, 'write_text', disk_full)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r'cannot save checkpoint \S+/checkpoints/8: No '
                     r'space left on device.*\(\d+\.\d\d GiB free\)'):
    checkpointer.save(8, {'w': jnp.zeros(1000)})
    checkpointer.wait()
  # Closed while the disk is still full: Orbax's other writer threads of
  # step 8 end here (with the space back, they would still finish it).
  checkpointer.close()
  monkeypatch.undo()
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [4]
  assert checkpointer.damage(4) is None
  restored = checkpointer.restore(4, {'w': jnp.zeros(1000)})
  np.testing.assert_array_equal(np.asarray(restored['model']['w']),
                                np.arange(1000.0) * 4)
  checkpointer.close()


def test_a_save_into_a_folder_gone_is_one_error(tmp_path, monkeypatch):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))

  def permission_denied(*args, **kwargs):
    del args, kwargs
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                          checkpointer.directory)

  monkeypatch.setattr(checkpointer._manager, 'save', permission_denied)  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match='cannot save checkpoint .*/4: Permission denied'):
    checkpointer.save(4, {'w': jnp.zeros(3)})


# Runs train.py with every Orbax text write into checkpoint 8 failing.
_FAILING_TRAIN = '''
import errno, os, runpy, sys
from etils import epath
write_text = epath.Path.write_text
def write_or_fail(self, *args, **kwargs):
  if '/checkpoints/8.' in str(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
  return write_text(self, *args, **kwargs)
epath.Path.write_text = write_or_fail
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
'''


def test_train_py_stops_with_one_line_on_a_failed_save(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_shapes_flags  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-c', _FAILING_TRAIN, f'--workdir={workdir}'] +
      tiny_shapes_flags(tmp_path / 'shapes') + ['--config.solver.max_iter=12'],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
      text=True)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = re.findall(r'train\.py: cannot save checkpoint (\S+): No space left '
                      r'on device.*\(\d+\.\d\d GiB free\)', result.stderr)
  assert errors == [f'{workdir}/checkpoints/8'], result.stderr[-3000:]
  # Orbax's error records keep their message but not their traceback, and
  # the writes that end after Orbax closed its event loop print nothing.
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'never awaited' not in result.stderr, result.stderr[-3000:]
  assert f'{os.sep}orbax{os.sep}' not in ''.join(
      line for line in result.stderr.splitlines()
      if line.lstrip().startswith('File "')), result.stderr[-3000:]
  checkpointer = checkpointing.Checkpointer(str(workdir))
  assert checkpointer.all_steps() == [4] and checkpointer.damage(4) is None
  checkpointer.close()
