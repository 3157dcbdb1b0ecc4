"""SIGTERM/SIGINT: the step in flight is saved, the rerun resumes exactly."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ssd_jax.training import checkpointing
from ssd_jax.training import preemption
from ssd_jax.training import trainer
from tests.test_trainer import _losses
from tests.test_trainer import _params
from tests.tiny import tiny_shapes_config
from tests.tiny import tiny_shapes_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ITER = 40
PREEMPTED = re.compile(r'preempted at iteration (\d+): checkpoint saved')
TIMEOUT = 600


def wait_for_line(path, pattern, process, timeout=TIMEOUT):
  """Waits until the file at `path` has a line matching `pattern`."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and re.search(pattern, path.read_text(), re.MULTILINE):
      return
    if process.poll() is not None:
      raise AssertionError(f'the run ended ({process.returncode}) before '
                           f'{pattern!r} appeared in {path}')
    time.sleep(0.01)
  raise AssertionError(f'{pattern!r} did not appear in {path}')


def test_stop_requests_only_set_a_flag_and_restore_the_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequests() as stop:
    assert not stop.agreed()
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)  # a second one changes nothing
    assert stop.agreed() and stop.received == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is before
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_saves_the_step_in_flight_and_resumes_exactly(
    uninterrupted_tiny_run, tiny_shapes_root, tmp_path):
  # The reference ran to 44 (conftest); its first 40 iterations are those of
  # a run to 40 (the schedule does not depend on max_iter).
  config, reference_dir = uninterrupted_tiny_run
  data_root = tiny_shapes_root

  workdir = tmp_path / 'preempted'
  args = [sys.executable, 'train.py', f'--workdir={workdir}'] + (
      tiny_shapes_flags(data_root) + [f'--config.solver.max_iter={MAX_ITER}'])
  env = dict(os.environ, PYTHONPATH=ROOT)
  process = subprocess.Popen(args, cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  try:
    wait_for_line(workdir / 'log.txt', r'iter: 000005', process)
    process.send_signal(signal.SIGTERM)
    # A second signal while the checkpoint is written must not break it.
    wait_for_line(workdir / 'log.txt', r'Saving checkpoint', process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  log = (workdir / 'log.txt').read_text()
  stops = PREEMPTED.findall(log)
  assert len(stops) == 1, log[-3000:]
  stopped_at = int(stops[0])
  assert 5 <= stopped_at < MAX_ITER
  assert max(_losses(log)) == stopped_at  # the step in flight was finished
  checkpointer = checkpointing.Checkpointer(str(workdir))
  assert checkpointer.latest_step() == stopped_at
  assert checkpointer.damage(stopped_at) is None
  assert os.path.exists(os.path.join(checkpointer.step_path(stopped_at),
                                     checkpointing.MANIFEST_FILE))
  checkpointer.close()

  # The same command resumes from the step in flight, bit-identically.
  subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
  log = (workdir / 'log.txt').read_text()
  assert f'Start training from iteration {stopped_at}' in log
  reference_losses = _losses((reference_dir / 'log.txt').read_text())
  resumed = _losses(log.split('Running with config:')[2])
  assert sorted(resumed) == list(range(stopped_at + 1, MAX_ITER + 1))
  for iteration, loss in resumed.items():
    assert loss == reference_losses[iteration], iteration
  for ours, theirs in zip(_params(workdir, MAX_ITER, config),
                          _params(reference_dir, MAX_ITER, config)):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize('signum', [signal.SIGINT])
def test_sigint_in_process_raises_preempted(tmp_path, signum, monkeypatch):
  config = tiny_shapes_config(tmp_path / 'shapes')
  config.solver.max_iter = 8
  original = trainer.save_checkpoint
  calls = []

  def save_and_signal(checkpointer, config, state, step, logger):
    calls.append(step)
    original(checkpointer, config, state, step, logger)
    if step == 4:  # a signal arrives while checkpoint 4 is being written
      signal.raise_signal(signum)

  monkeypatch.setattr(trainer, 'save_checkpoint', save_and_signal)
  with pytest.raises(preemption.Preempted) as stopped:
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert stopped.value.step == 4 and stopped.value.signal_name == 'SIGINT'
  assert calls == [4]  # the save step is not written twice
  assert checkpointing.Checkpointer(str(tmp_path / 'run')).all_steps() == [4]


def test_a_full_disk_at_the_preemption_save_keeps_the_older_checkpoint(
    tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(tmp_path / 'shapes')
  config.solver.max_iter = 12
  workdir = tmp_path / 'run'
  original_prefetch = trainer.prefetch

  def prefetch_then_signal(*args):
    for step, item in enumerate(original_prefetch(*args), start=1):
      if step == 6:  # SIGTERM arrives during step 6 (checkpoint 4 exists)
        signal.raise_signal(signal.SIGTERM)
      yield item

  write_text = epath.Path.write_text

  def write_or_fail(self, *args, **kwargs):
    if f'{os.sep}checkpoints{os.sep}6.' in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(trainer, 'prefetch', prefetch_then_signal)
  monkeypatch.setattr(epath.Path, 'write_text', write_or_fail)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r'cannot save checkpoint \S+/checkpoints/6: No '
                     r'space left on device.*GiB free'):
    trainer.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  log = (workdir / 'log.txt').read_text()
  assert 'Saving checkpoint to' in log.split('iter: 000006')[1]
  assert not PREEMPTED.search(log)  # no claim of a saved checkpoint
  checkpointer = checkpointing.Checkpointer(str(workdir))
  assert checkpointer.all_steps() == [4]
  assert checkpointer.damage(4) is None
  checkpointer.close()


def test_an_evaluation_the_preempted_run_missed_runs_on_resume(tmp_path,
                                                               monkeypatch):
  config = tiny_shapes_config(tmp_path / 'shapes')
  config.solver.max_iter = 12
  config.save_step = 6
  config.eval_step = 6
  workdir = tmp_path / 'run'
  original = trainer.save_checkpoint

  def save_and_signal(checkpointer, config, state, step, logger):
    original(checkpointer, config, state, step, logger)
    if step == 6:  # preempted at an evaluation step, before its evaluation
      signal.raise_signal(signal.SIGTERM)

  monkeypatch.setattr(trainer, 'save_checkpoint', save_and_signal)
  with pytest.raises(preemption.Preempted):
    trainer.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert not os.path.exists(workdir / 'eval' / 'voc_2007_test_6.json')
  trainer.train_and_evaluate(config, str(workdir))
  log = (workdir / 'log.txt').read_text().split('Running with config:')[2]
  assert log.index('Evaluating iteration 6') < log.index(
      'Start training from iteration 6')
  assert sorted(os.listdir(workdir / 'eval')) == [
      'voc_2007_test_12.json', 'voc_2007_test_6.json']
