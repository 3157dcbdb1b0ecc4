"""Writes the training report of a workdir: `python report.py --workdir=W`.

W/report/ gets loss.png, lr.png, metrics.png and README.md (see
ssd_jax.training.report); it works on a run that is still training.
train.py writes it at the end of every run.
"""

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir written by train.py.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssd_jax.training import report  # pylint: disable=g-import-not-at-top
  print(f'Wrote {report.write_report(FLAGS.workdir)}')


if __name__ == '__main__':
  app.run(main)
