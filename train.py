"""Trains an SSD: `python train.py --config=configs/ssd300_voc.py [--workdir=W]`.

Config values are overridden with flags such as `--config.solver.batch_size=8`.
Running the same command again resumes from the latest checkpoint in W.

`python train.py --config=configs/ssd300_voc.py --benchmark
[--benchmark_steps=50] [--benchmark_warmup=5]` runs the real train step,
loop, prefetching and log lines on synthetic batches of the config's shapes
instead (no dataset, workdir, evaluation, TensorFlow or clu) and prints
images/s, step-time percentiles, compile time and peak memory, then one
JSON line.

SIGTERM or SIGINT (SLURM preemption, Ctrl-C) finishes the step in flight,
saves it and exits with --preempted_exit_code (default 75, EX_TEMPFAIL: "try
again"), so that a job script can requeue on it; the same command resumes.
A checkpoint that cannot be written, or a workdir whose checkpoints are all
damaged, stops the run with one line naming the path (exit status 1).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ssd_jax.training import launch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Output directory (default: config.output_dir).')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume even if the config differs from the saved one in '
                  'a field that changes the data stream or the optimizer.')
flags.DEFINE_bool('benchmark', False, 'Time the training loop on synthetic '
                  'batches (no dataset, no checkpoints).')
flags.DEFINE_integer('benchmark_steps', 50, 'Timed iterations of --benchmark.')
flags.DEFINE_integer('benchmark_warmup', 5, 'Untimed first iterations of '
                     '--benchmark (the first compiles).')
flags.DEFINE_integer('preempted_exit_code', 75,
                     'Exit status after SIGTERM/SIGINT once the checkpoint of '
                     'the step in flight is saved (75: EX_TEMPFAIL).')
launch.define_flags()
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Our own log lines go through the 'SSD.*' loggers; keep absl's (clu's
  # per-scalar lines, Orbax's progress) to warnings.
  logging.set_verbosity(logging.WARNING)
  launch.shorten_orbax_errors()
  launch.setup(FLAGS.config, FLAGS)
  if FLAGS.benchmark:
    from ssd_jax.training import benchmark  # pylint: disable=g-import-not-at-top
    figures = benchmark.benchmark_training(
        FLAGS.config, steps=FLAGS.benchmark_steps,
        warmup=FLAGS.benchmark_warmup)
    print(json.dumps(figures))
    return
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import preemption  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import resume  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = FLAGS.workdir or FLAGS.config.output_dir
  try:
    trainer.train_and_evaluate(FLAGS.config, workdir,
                               allow_config_change=FLAGS.allow_config_change)
  except preemption.Preempted:
    sys.exit(FLAGS.preempted_exit_code)
  except (checkpointing.CheckpointMismatchError,
          checkpointing.CheckpointDamagedError,
          checkpointing.CheckpointSaveError,
          resume.ConfigChangedError) as e:
    sys.exit(f'train.py: {e}')
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    from ssd_jax.training import report  # pylint: disable=g-import-not-at-top
    print(f'Training report: {report.write_report(workdir)}')


if __name__ == '__main__':
  app.run(main)
