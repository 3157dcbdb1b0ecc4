"""Two JAX processes train exactly like one process with two devices.

Both runs compile the same SPMD program for two CPU devices and the same
global batch; the two processes talk over localhost (JAX's gloo CPU
collectives), so logged losses, parameters and evaluations agree to the bit.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.training import checkpointing
from ssd_jax.training import launch
from ssd_jax.training import preemption
from tests.tiny import tiny_shapes_config
from tests.tiny import tiny_shapes_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = re.compile(r'SSD\.trainer INFO: iter: (\d{6}), lr: \S+ total_loss: '
                  r'(\d+\.\d{3})')
TIMEOUT = 600
MAX_ITER = 24


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  # The test run's compilation cache (tests/conftest.py) is kept.
  env = {k: v for k, v in os.environ.items()
         if not (k.startswith('JAX_') or k == 'XLA_FLAGS') or
         k in ('JAX_COMPILATION_CACHE_DIR',
               'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **extra)
  return env


def _start(script, args, env):
  """Starts `script`; its output goes to a file (a full pipe would block)."""
  output = tempfile.TemporaryFile('w+')
  process = subprocess.Popen([sys.executable, script] + args, cwd=ROOT,
                             env=env, stdout=output, stderr=subprocess.STDOUT,
                             text=True)
  process.output = output
  return process


def _two_processes(script, args, how):
  """Starts `script` as processes 0 and 1 on localhost, one CPU device each.

  how: 'env' (the README's way: environment + --distributed) or 'flags'.
  """
  address = f'127.0.0.1:{_free_port()}'
  processes = []
  for i in range(2):
    if how == 'env':
      processes.append(_start(script, args + ['--distributed'], _env(
          JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2',
          JAX_PROCESS_ID=str(i))))
    else:
      processes.append(_start(script, args + [
          f'--coordinator_address={address}', '--num_processes=2',
          f'--process_id={i}'], _env()))
  return processes


def _finish(processes):
  """Waits for the processes; their outputs, after checking they succeeded."""
  outputs = []
  try:
    for process in processes:
      process.wait(timeout=TIMEOUT)
      process.output.seek(0)
      outputs.append(process.output.read())
      process.output.close()
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[:3000] + '\n...\n' + output[-3000:]
  return outputs


def _losses(log_text):
  return {int(m.group(1)): m.group(2) for m in LOSS.finditer(log_text)}


def _params(workdir, step, config):
  model = nnx.eval_shape(lambda: models.create_model(config))
  checkpointing.restore_model(checkpointing.Checkpointer(str(workdir)), model,
                              step)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _evaluations(workdir):
  folder = workdir / 'eval'
  return {name: json.loads((folder / name).read_text())
          for name in sorted(os.listdir(folder))}


def _wait_for_line(path, text, processes):
  deadline = time.time() + TIMEOUT
  while not (path.exists() and text in path.read_text()):
    assert time.time() < deadline, f'{text!r} not in {path}'
    assert all(p.poll() is None for p in processes), 'a run ended early'
    time.sleep(0.01)


def _stopped(processes):
  """Waits for preempted processes; their outputs."""
  outputs = []
  try:
    for process in processes:
      process.wait(timeout=TIMEOUT)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process in processes:
    process.output.seek(0)
    outputs.append(process.output.read())
    process.output.close()
    assert process.returncode == preemption.PREEMPTED_EXIT_CODE, (
        outputs[-1][-3000:])
  return outputs


def test_two_processes_preempted_resumed_and_evaluated_like_one(tmp_path):
  """Two processes, stopped by a SIGTERM to one of them and resumed, train
  and evaluate exactly as one uninterrupted process with two devices."""
  data_root = tmp_path / 'shapes'
  # max_per_image: enough detections after a few steps for a non-zero mAP.
  common = tiny_shapes_flags(data_root) + [
      f'--config.solver.max_iter={MAX_ITER}', '--config.save_step=3',
      '--config.test.max_per_image=1000']
  one, two = tmp_path / 'one', tmp_path / 'two'

  # The shapes data first, so that the concurrent runs below find it.
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.ensure_dataset(
      str(data_root),
      **tiny_shapes_config(data_root).data.synthetic_shapes.to_dict())
  # One process with two CPU devices, uninterrupted. Alongside: two
  # processes with one CPU device each, started as the README says
  # (environment + --distributed); SIGTERM to the one not writing the log.
  single = _start('train.py', common + [f'--workdir={one}'],
                  _env(XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  pair = _two_processes('train.py', common + [f'--workdir={two}'], 'env')
  _wait_for_line(two / 'log.txt', 'iter: 000003', pair)
  pair[1].send_signal(signal.SIGTERM)
  first = _stopped(pair)
  stops = [re.findall(r'preempted at iteration (\d+): checkpoint saved', o)
           for o in first]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops
  step = int(stops[0][0])
  assert 3 <= step < MAX_ITER
  checkpointer = checkpointing.Checkpointer(str(two))
  assert checkpointer.latest_step() == step
  assert checkpointer.damage(step) is None
  checkpointer.close()
  # The same command, with the flags instead of the environment, resumes.
  second = _finish(_two_processes('train.py', common + [f'--workdir={two}'],
                                  'flags'))
  _finish([single])

  for output in first + second:
    assert 'Devices: 2 x cpu on 2 host(s)' in output, output[-3000:]
  for output in second:  # both processes resumed from the step in flight
    assert 'Loading checkpoint from' in output, output[-3000:]
    assert f'Start training from iteration {step}' in output
  one_log = (one / 'log.txt').read_text()
  two_log = (two / 'log.txt').read_text()
  assert 'Devices: 2 x cpu on 1 host(s)' in one_log
  assert two_log.count('Running with config:') == 2  # one log, two runs
  assert _losses(one_log) == _losses(two_log)
  assert sorted(_losses(two_log)) == list(range(1, MAX_ITER + 1))
  assert sorted(_losses(two_log.split('Running with config:')[2])) == list(
      range(step + 1, MAX_ITER + 1))

  config = tiny_shapes_config(data_root)
  for ours, theirs in zip(_params(two, MAX_ITER, config),
                          _params(one, MAX_ITER, config)):
    np.testing.assert_array_equal(ours, theirs)
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))

  # Every host evaluated its share; process 0 wrote the JSON.
  evaluations = _evaluations(two)
  assert list(evaluations) == [f'voc_2007_test_{MAX_ITER}.json']
  assert evaluations == _evaluations(one)
  assert evaluations[f'voc_2007_test_{MAX_ITER}.json']['map'] > 0
  assert 'voc_2007_test: skipped 0 of 8 examples' in two_log

  # eval.py on two hosts gives the same evaluation.
  os.remove(two / 'eval' / f'voc_2007_test_{MAX_ITER}.json')
  outputs = _finish(_two_processes('eval.py', [f'--workdir={two}'], 'flags'))
  assert 'mAP: ' in outputs[0] and 'mAP: ' not in outputs[1]
  assert _evaluations(two) == evaluations


def test_incomplete_settings_name_the_flags(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  monkeypatch.setattr(jax.distributed, 'initialize', _refuse)
  with pytest.raises(ValueError, match=r'--coordinator_address=HOST:PORT.*'
                     r'--num_processes=N.*--process_id=I'):
    launch.initialize_distributed(environ={'JAX_NUM_PROCESSES': '2'})
  with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID='one' is not an "
                     'integer'):
    launch.initialize_distributed(environ={'JAX_PROCESS_ID': 'one'})


def _refuse(coordinator_address=None, num_processes=None, process_id=None):
  del num_processes, process_id
  if coordinator_address is None:
    raise ValueError('coordinator_address should be defined.')


def test_settings_come_from_flags_then_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  environ = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4',
             'JAX_PROCESS_ID': '3'}
  assert not launch.initialize_distributed(environ={})
  assert launch.initialize_distributed(process_id=1, environ=environ)
  assert launch.initialize_distributed(distributed=True, environ={})
  assert calls == [
      dict(coordinator_address='h:1', num_processes=4, process_id=1),
      dict(coordinator_address=None, num_processes=None, process_id=None)]
