"""End-to-end training: log, checkpoints, exact resume after kill -9, eval."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.training import checkpointing
from ssd_jax.training import trainer
from tests.tiny import tiny_shapes_config
from tests.tiny import tiny_shapes_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(
    r'^\S+ \S+ SSD\.trainer INFO: iter: (\d{6}), lr: (\d\.\d{5}), '
    r'total_loss: (\d+\.\d{3}) \((\d+\.\d{3})\), reg_loss: \d+\.\d{3} '
    r'\(\d+\.\d{3}\), cls_loss: \d+\.\d{3} \(\d+\.\d{3}\), time: \d+\.\d{3} '
    r'\(\d+\.\d{3}\), eta: \d+:\d\d:\d\d$')


@pytest.fixture(scope='module')
def data_root(tiny_shapes_root):
  return tiny_shapes_root


def _losses(log_text):
  """{iteration: total_loss as printed} from the log lines."""
  return {int(m.group(1)): m.group(3)
          for m in map(LINE.match, log_text.splitlines()) if m}


def _params(workdir, step, config):
  model = nnx.eval_shape(lambda: models.create_model(config))
  checkpointing.restore_model(checkpointing.Checkpointer(str(workdir)), model,
                              step)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_tiny_run):
  return uninterrupted_tiny_run


def test_log_checkpoints_and_evaluation(uninterrupted):
  config, workdir = uninterrupted
  log = (workdir / 'log.txt').read_text()
  assert 'No checkpoint found.' in log
  assert 'Running with config:' in log
  losses = _losses(log)
  assert sorted(losses) == list(range(1, 45))
  # The printed lr of iteration i is f(i): 0.00133 at 1 with warm-up over 2.
  lines = [l for l in log.splitlines() if LINE.match(l)]
  lr = config.solver.lr * (1 / 3 * 0.5 + 0.5)  # f(1), warm-up over 2
  assert LINE.match(lines[0]).group(2) == f'{lr:.5f}'
  assert re.search(r'Total training time: \d+:\d\d:\d\d \(\d+\.\d{4} s / it\)',
                   log)
  assert 'Saving checkpoint to' in log
  assert 'skipped 0 of 32 examples' in log
  assert re.search(r'mAP: \d\.\d{4}\ncircle {10}: (\d\.\d{4}|nan)', log)
  assert checkpointing.Checkpointer(str(workdir)).all_steps() == [
      28, 32, 36, 40, 44]
  with open(workdir / 'eval' / 'voc_2007_test_44.json') as f:
    result = json.load(f)
  assert result['step'] == 44 and set(result['ap']) == {
      'circle', 'square', 'triangle', 'cross'}
  assert 0 <= result['map'] <= 1
  assert os.listdir(workdir / 'tf_logs')
  saved = checkpointing.load_config(str(workdir))
  assert saved.solver.max_iter == 44
  del config


def test_resume_after_kill_is_exact_and_extends(uninterrupted, data_root,
                                                 tmp_path):
  config, reference_dir = uninterrupted
  workdir = tmp_path / 'killed'
  args = [sys.executable, 'train.py', f'--workdir={workdir}'] + (
      tiny_shapes_flags(data_root))
  # The subprocess must build exactly the in-process config.
  assert config.solver.lr == 1e-3 and config.solver.weight_decay == 5e-4
  env = dict(os.environ, PYTHONPATH=ROOT)

  # 1. Start a run to 40 and kill -9 it in the middle, once checkpoint 8 is
  # complete (Orbax renames a finished checkpoint to its step number).
  process = subprocess.Popen(args + ['--config.solver.max_iter=40'], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  log_path = workdir / 'log.txt'
  while time.time() < deadline and process.poll() is None:
    if (workdir / 'checkpoints' / '8').is_dir():
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_log = log_path.read_text()
  assert 'iter: 000008' in killed_log
  assert 'Total training time' not in killed_log  # it was killed mid-run

  # 2. The same command resumes from the last checkpoint and finishes ...
  subprocess.run(args + ['--config.solver.max_iter=40'], cwd=ROOT, env=env,
                 check=True, capture_output=True)
  log = log_path.read_text()
  assert 'Loading checkpoint from' in log
  # 3. ... and a larger max_iter extends the finished run to 44.
  subprocess.run(args + ['--config.solver.max_iter=44'], cwd=ROOT, env=env,
                 check=True, capture_output=True)
  log = log_path.read_text()
  assert 'Loading checkpoint from' in log.split('iter: 000040')[-1]

  reference_losses = _losses((reference_dir / 'log.txt').read_text())
  resumed = {}
  for chunk in log.split('Running with config:')[2:]:
    resumed.update(_losses(chunk))
  assert set(resumed) >= set(range(30, 45))
  for iteration, loss in resumed.items():
    assert loss == reference_losses[iteration], iteration
  for step in (40, 44):
    for ours, theirs in zip(_params(workdir, step, config),
                            _params(reference_dir, step, config)):
      np.testing.assert_array_equal(ours, theirs)


def test_nan_stops_the_run_and_keeps_the_checkpoint(data_root, tmp_path):
  config = tiny_shapes_config(data_root)
  config.solver.max_iter = 12
  config.solver.optimizer = 'sgd'
  config.solver.lr = 1e30
  config.solver.lr_steps = (100,)
  config.solver.warmup_iters = 0
  config.save_step = 1
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'at iteration \d+: stopping; (the last checkpoint '
                     r'\(iteration \d+\) is intact|no checkpoint)') as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = checkpointing.Checkpointer(str(tmp_path)).all_steps()
  bad = int(re.search(r'at iteration (\d+)', str(error.value)).group(1))
  assert all(step < bad for step in steps)
  if steps:
    assert all(np.all(np.isfinite(p))
               for p in _params(tmp_path, max(steps), config))


def test_bad_examples_are_skipped_and_counted(tmp_path):
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  config = tiny_shapes_config(root, num_train=16, num_test=4)
  shapes.ensure_dataset(str(root), **config.data.synthetic_shapes.to_dict())
  year = root / 'VOC2007'
  ids = (year / 'ImageSets' / 'Main' / 'trainval.txt').read_text().split()
  (year / 'JPEGImages' / f'{ids[0]}.jpg').write_bytes(b'\xff\xd8garbage')
  (year / 'Annotations' / f'{ids[1]}.xml').write_text('<annotation><object>')
  (year / 'JPEGImages' / f'{ids[2]}.jpg').unlink()
  test_ids = (year / 'ImageSets' / 'Main' / 'test.txt').read_text().split()
  (year / 'JPEGImages' / f'{test_ids[0]}.jpg').write_bytes(b'')
  config.solver.max_iter = 6
  config.save_step = 6
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  log = (tmp_path / 'run' / 'log.txt').read_text()
  assert 'iter: 000006' in log
  match = re.search(r'Input pipeline: skipped (\d+) of (\d+) examples', log)
  assert match and int(match.group(1)) >= 2, log[-2000:]
  # Counted up front, on every log line, and for the evaluation set.
  assert re.search(r'Dataset voc_2007_trainval: skipped 3 of 16 examples '
                   r'\(bad_annotation: 1, missing_image: 1, ', log), log[:3000]
  assert re.search(r'iter: 000001, .*, data: 3 skipped, \d+ fixed$', log,
                   re.MULTILINE)
  assert ('voc_2007_test: skipped 1 of 4 examples (unreadable_image: 1)'
          in log)


def test_training_report_plots_the_logs_values(uninterrupted, monkeypatch):
  from matplotlib import axes  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import report  # pylint: disable=g-import-not-at-top
  _, workdir = uninterrupted
  plotted = {}
  original = axes.Axes.plot

  def recording_plot(self, x, y, *args, label=None, **kwargs):
    plotted[label] = (list(x), list(y))
    return original(self, x, y, *args, label=label, **kwargs)

  monkeypatch.setattr(axes.Axes, 'plot', recording_plot)
  readme = report.write_report(str(workdir))
  # The log's printed window means, line by line.
  logged = [LINE.match(l) for l in (workdir / 'log.txt').read_text()
            .splitlines()]
  logged = [m for m in logged if m]
  assert plotted['total_loss'][0] == list(range(1, 45))
  assert plotted['total_loss'][1] == [float(m.group(3)) for m in logged]
  assert plotted['lr'][1] == [float(m.group(2)) for m in logged]
  with open(workdir / 'eval' / 'voc_2007_test_44.json') as f:
    final = json.load(f)
  assert plotted['voc_2007_test mAP'][1][-1] == final['map']
  for name in ('loss.png', 'lr.png', 'metrics.png'):
    assert (workdir / 'report' / name).stat().st_size > 1000
  text = open(readme).read()
  assert '![loss](loss.png)' in text and '| circle |' in text
  assert 'Iterations 1 to 44 logged' in text and 's per iteration' in text
  assert '"max_iter": 44' in text
