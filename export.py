"""Exports a trained workdir as a portable graph (see ssd_jax.deploy.export).

  python export.py --workdir=W --format=onnx --output=ssd.onnx
  python export.py --workdir=W --format=saved_model --output=DIR
  python export.py --workdir=W --format=stablehlo --output=ssd.stablehlo
"""

from absl import app
from absl import flags

from ssd_jax.deploy import export as export_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir written by train.py or '
                    'import_torch.py.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_enum('format', None, export_lib.FORMATS, 'Export format.')
flags.DEFINE_string('output', None, 'Output file (onnx, stablehlo) or '
                    'directory (saved_model).')
flags.DEFINE_integer('batch_size', None, 'Fixed batch size (default: '
                     'symbolic).')
flags.mark_flags_as_required(['workdir', 'format', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssd_jax.core import priors as priors_lib  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  model, config, step = inference.load_model(FLAGS.workdir, FLAGS.step)
  export_lib.export(model, config, FLAGS.format, FLAGS.output,
                    FLAGS.batch_size)
  size = config.input.image_size
  print(f'Wrote {FLAGS.output} ({FLAGS.format}): checkpoint step {step}, '
        f'images float32 [{FLAGS.batch_size or "batch"}, {size}, {size}, 3] '
        f'RGB 0..255 -> boxes [.., {priors_lib.num_priors(config)}, 4], '
        f'scores [.., {config.model.num_classes}]')


if __name__ == '__main__':
  app.run(main)
