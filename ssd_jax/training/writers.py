"""Metric writers: TensorBoard through clu where it imports, else plain JSON.

clu's TensorBoard writer needs TensorFlow. Where TensorFlow or clu is not
installed (a GPU machine with JAX only, the benchmark modes), metrics go to
`<logdir>/scalars.jsonl` instead, one JSON line per write:
{"step": N, "scalars": {name: value}}. Images, texts and hyperparameters are
dropped there. Both writers have the same methods (clu's MetricWriter).
"""

import importlib
import json
import os

import numpy as np

SCALARS_FILE = 'scalars.jsonl'


class PlainWriter:
  """clu's MetricWriter interface, writing scalars to a JSON-lines file.

  With `logdir=None` (or just_logging) it writes nothing at all: the
  processes other than 0, and runs that only print their figures.
  """

  def __init__(self, logdir=None):
    self.path = None
    if logdir:
      os.makedirs(logdir, exist_ok=True)
      self.path = os.path.join(logdir, SCALARS_FILE)

  def write_scalars(self, step, scalars):
    if self.path is None:
      return
    record = {'step': int(step),
              'scalars': {k: float(np.asarray(v)) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def write_images(self, step, images):
    del step, images

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def tensorboard_available():
  """Whether clu's TensorBoard writer can be imported (TensorFlow and clu)."""
  try:
    importlib.import_module('clu.metric_writers')
  except ImportError:
    return False
  return True


def create_writer(logdir, *, just_logging=False, tensorboard=None):
  """The run's metric writer.

  Args:
    logdir: the TensorBoard folder (W/tf_logs).
    just_logging: write nothing to `logdir` (processes other than 0).
    tensorboard: True: clu's TensorBoard writer (ImportError without
      TensorFlow or clu); False: the plain writer; None: TensorBoard where it
      imports.

  Returns:
    An object with clu's MetricWriter methods.
  """
  if tensorboard is None:
    tensorboard = tensorboard_available()
  if not tensorboard:
    return PlainWriter(None if just_logging else logdir)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(logdir,
                                              just_logging=just_logging)
