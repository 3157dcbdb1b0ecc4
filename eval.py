"""Evaluates a trained (or imported) SSD: `python eval.py --workdir=W`.

Restores the latest checkpoint in W (or `--step=N`) with the config saved in
W, evaluates every dataset of `config.data.test`, prints the reference's table
and writes W/eval/<dataset>_<step>.json and TensorBoard scalars.
Config values can be overridden, e.g. `--config.data.voc_root=DIR`; with
`--config=FILE` the config comes from FILE instead of W.

`python eval.py --config=configs/ssd300_voc.py --benchmark
[--benchmark_images=4952] [--benchmark_batch_size=N]` times the evaluation
path (forward, post-processing, VOC AP) on synthetic images instead: no
workdir, dataset or TensorFlow needed; it prints its figures and, last, one
JSON line.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ssd_jax.training import launch

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir written by train.py or '
                    'ssd_jax.interop.torch_import.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_bool('benchmark', False, 'Time the evaluation on synthetic '
                  'images (needs --config, not --workdir).')
flags.DEFINE_integer('benchmark_images', 4952, 'Images of --benchmark.')
flags.DEFINE_integer('benchmark_batch_size', None, 'Batch size of '
                     '--benchmark (default: config.test.batch_size).')
launch.define_flags()


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _define_config_flag(argv):
  """--config: a config file if given, else the config saved in the workdir."""
  if _flag_value(argv, 'config'):
    config_flags.DEFINE_config_file('config', None, 'Config file.',
                                    lock_config=True)
    return
  workdir = _flag_value(argv, 'workdir')
  if not workdir:
    sys.exit('eval.py: --workdir is required (or --config with --benchmark)')
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    config = checkpointing.load_config(workdir)
  except FileNotFoundError as e:
    sys.exit(f'eval.py: {e}')
  config_flags.DEFINE_config_dict('config', config, 'Config (from --workdir).',
                                  lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Our own log lines go through the 'SSD.*' loggers; keep absl's (clu's
  # per-scalar lines, Orbax's progress) to warnings.
  logging.set_verbosity(logging.WARNING)
  if FLAGS.benchmark:
    return run_benchmark()
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  launch.setup(FLAGS.config, FLAGS)
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from ssd_jax.evaluation import workdir as workdir_eval  # pylint: disable=g-import-not-at-top
  try:
    results = workdir_eval.evaluate_workdir(FLAGS.config, FLAGS.workdir, FLAGS.step)
  except (checkpointing.CheckpointMismatchError,
          checkpointing.CheckpointDamagedError) as e:
    sys.exit(f'eval.py: {e}')
  import jax  # pylint: disable=g-import-not-at-top
  if not results and jax.process_index() == 0:  # others report nothing
    sys.exit(1)


def run_benchmark():
  launch.setup(FLAGS.config, FLAGS)
  from ssd_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  figures = benchmark.benchmark_evaluation(
      FLAGS.config, num_images=FLAGS.benchmark_images,
      batch_size=FLAGS.benchmark_batch_size)
  print(f'eval benchmark on {figures["device"]}: {figures["num_images"]} '
        f'synthetic images at batch {figures["batch_size"]}, NMS on the '
        f'{figures["nms"]}: {figures["seconds"]:.2f} s '
        f'({figures["images_per_sec"]:.1f} images/s; forward alone '
        f'{figures["forward_images_per_sec"]:.1f} images/s; compiled in '
        f'{figures["compile_seconds"]:.1f} s)')
  print(json.dumps(figures))


if __name__ == '__main__':
  _define_config_flag(sys.argv)
  app.run(main)
