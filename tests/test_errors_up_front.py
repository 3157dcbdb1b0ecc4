"""Problems with the data, the config or the machine stop a run at its start
with a message that names the thing and the fix."""

import hashlib
import logging
import os
import subprocess
import sys
import threading

import jax
import pytest

from ssd_jax.data import pipeline
from ssd_jax.data import shapes
from ssd_jax.evaluation import postprocess
from ssd_jax.training import checkpointing
from ssd_jax.training import download
from ssd_jax.training import launch
from ssd_jax.training import resume
from ssd_jax.training import trainer
from tests.tiny import tiny_shapes_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('shapes')
  config = tiny_shapes_config(root, num_train=8, num_test=4)
  shapes.ensure_dataset(str(root), **config.data.synthetic_shapes.to_dict())
  return root


def _config(data_root):
  config = tiny_shapes_config(data_root, num_train=8, num_test=4)
  config.data.synthetic_shapes = None
  return config


def test_every_dataset_problem_in_one_message(data_root):
  config = _config(data_root)
  config.data.test = ('voc_2007_test', 'voc_2007_missing')
  empty = data_root / 'VOC2007' / 'ImageSets' / 'Main' / 'empty.txt'
  empty.write_text('')
  config.data.train = ('voc_2007_trainval', 'voc_2007_empty')
  config.model.num_classes = 21
  with pytest.raises(pipeline.DatasetError) as error:
    pipeline.check_datasets(config)
  message = str(error.value)
  assert 'model.num_classes is 21 but data.class_names has 5 names' in message
  assert '--config.model.num_classes=5' in message
  assert ("dataset 'voc_2007_missing': " in message and
          'missing.txt does not exist' in message and 'voc_root' in message)
  assert ("dataset 'voc_2007_empty' has no usable example (skipped 0 of 0 "
          'examples): check its split file' in message)
  assert "'voc_2007_test'" not in message  # the good ones are not listed


def test_unknown_class_names_are_an_error_unless_skipped(data_root):
  config = _config(data_root)
  config.data.class_names = ('__background__', 'circle', 'square', 'star',
                             'cross')
  with pytest.raises(pipeline.DatasetError,
                     match=r"dataset 'voc_2007_trainval' has objects of "
                     r"classes not in data.class_names \('triangle': \d+\): "
                     r'add them to data.class_names .*'
                     r'--config.data.skip_unknown_classes=True'):
    pipeline.check_datasets(config)
  config.data.skip_unknown_classes = True
  counts = pipeline.check_datasets(config)
  assert counts['voc_2007_trainval'].fixed['unknown_class'] > 0


def test_missing_test_set_stops_training_before_the_first_step(data_root,
                                                               tmp_path):
  config = _config(data_root)
  config.data.test = ('voc_2007_tset',)
  with pytest.raises(pipeline.DatasetError, match="dataset 'voc_2007_tset'"):
    trainer.train_and_evaluate(config, str(tmp_path))
  log = (tmp_path / 'log.txt').read_text()
  assert 'Start training from' not in log and 'iter: 0' not in log


def test_batch_size_must_split_over_the_devices(data_root, tmp_path,
                                                monkeypatch):
  with pytest.raises(ValueError, match=r'solver.batch_size=6 does not split '
                     r'over the 4 devices: use a multiple of 4, e.g. '
                     r'--config.solver.batch_size=4'):
    resume.check_batch_size(6, 4)
  resume.check_batch_size(8, 4)
  # In the trainer, before the input pipeline starts.
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  with pytest.raises(ValueError, match='solver.batch_size=4 does not split '
                     'over the 3 devices'):
    trainer.train_and_evaluate(_config(data_root), str(tmp_path))
  assert 'Start training from' not in (tmp_path / 'log.txt').read_text()


def test_resume_with_another_data_stream_or_optimizer(tmp_path, data_root):
  saved = _config(data_root)
  checkpointing.save_config(str(tmp_path), saved)
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(4, {'w': jax.numpy.zeros(2)},
                    opt_state={'m': jax.numpy.zeros(2)})
  checkpointer.close()
  config = _config(data_root)
  config.solver.batch_size = 8
  config.seed = 1
  config.solver.max_iter = 1000  # extending the run is fine
  config.test.batch_size = 2  # evaluation only: fine
  with pytest.raises(resume.ConfigChangedError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'seed: 0 -> 1\n  solver.batch_size: 4 -> 8\n' in message
  assert 'max_iter' not in message and 'test.batch_size' not in message
  assert '--allow_config_change' in message

  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger('test_resume_config')
  logger.addHandler(handler)
  resume.check_resume_config(config, str(tmp_path), True, logger)
  assert 'solver.batch_size: 4 -> 8' in records[0].getMessage()

  # An imported checkpoint (no optimizer state) starts a fine-tuning run:
  # its config is not held against the new one.
  imported = tmp_path / 'imported'
  checkpointing.save_config(str(imported), saved)
  checkpointer = checkpointing.Checkpointer(str(imported))
  checkpointer.save(4, {'w': jax.numpy.zeros(2)})
  checkpointer.close()
  with pytest.raises(checkpointing.CheckpointMismatchError):  # not {'w'}
    trainer.train_and_evaluate(config, str(imported))


def test_pretrained_download_shared_cache(tmp_path):
  source = tmp_path / 'vgg.pth'
  source.write_bytes(os.urandom(100_000))
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  url = source.as_uri()
  cache = tmp_path / 'cache'
  # Several downloaders at once: each its own temporary file, one result.
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(
      download.pretrained_path(url, str(cache), sha256=digest)))
             for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert paths == [str(cache / 'vgg.pth')] * 4
  assert os.listdir(cache) == ['vgg.pth']
  assert (cache / 'vgg.pth').read_bytes() == source.read_bytes()
  # A damaged cached file is downloaded again.
  (cache / 'vgg.pth').write_bytes(b'')
  assert download.pretrained_path(url, str(cache)) == str(cache / 'vgg.pth')
  assert (cache / 'vgg.pth').read_bytes() == source.read_bytes()
  # A file with another hash is refused, and nothing is left in the cache.
  with pytest.raises(download.PretrainedFileError,
                     match=f'sha256 {digest}, but model.backbone.pretrained'
                     '_sha256 is 00ff: another file'):
    download.pretrained_path(url, str(tmp_path / 'other'), sha256='00ff')
  assert os.listdir(tmp_path / 'other') == []
  with pytest.raises(download.PretrainedFileError, match='sha256'):
    download.pretrained_path(str(source), sha256='00ff')


def test_no_linux_only_calls_on_the_evaluation_path(monkeypatch):
  monkeypatch.delattr(os, 'sched_getaffinity')
  monkeypatch.setattr(os, 'cpu_count', lambda: 5)
  assert postprocess.available_cpus() == 5


def test_tensorflow_keeps_off_the_gpus():
  code = ('import tensorflow as tf\n'
          'import ssd_jax.data as data\n'
          'from ssd_jax.data import pipeline\n'
          'print(data._GPUS_HIDDEN, tf.config.get_visible_devices("GPU"))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip().splitlines()[-1] == 'True []'


def test_deterministic_switch_sets_xla_flags_before_the_backend():
  config = tiny_shapes_config('unused')
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  launch.set_xla_flags(config, environ)
  assert environ == {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  config.deterministic = True
  launch.set_xla_flags(config, environ)
  launch.set_xla_flags(config, environ)
  assert environ['XLA_FLAGS'] == ('--xla_dump_to=/tmp/x '
                                  '--xla_gpu_deterministic_ops=true')
  # This XLA knows the flag (an unknown flag aborts the backend's start).
  code = ('import jax, jax.numpy as jnp\n'
          'print(float(jax.jit(lambda x: x * 2)(jnp.ones(()))))\n')
  out = subprocess.run(
      [sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True,
      text=True, env=dict(os.environ,
                          XLA_FLAGS=launch.DETERMINISTIC_GPU_FLAG)).stdout
  assert out.strip() == '2.0'
