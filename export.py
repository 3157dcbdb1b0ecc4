"""Exports a trained workdir, NMS inside, verified (see ssd_jax.deploy.export).

  python export.py --workdir=W --format=onnx --output=ssd.onnx
  python export.py --workdir=W --format=saved_model --output=DIR
  python export.py --workdir=W --format=tflite --output=ssd.tflite \
      [--quantize=float16]
  python export.py --workdir=W --format=tflite --output=ssd_int8.tflite \
      --quantize=int8 [--calibration_dir=DIR]
  python export.py --workdir=W --format=stablehlo --output=ssd.stablehlo
"""

import sys

from absl import app
from absl import flags

from ssd_jax.deploy import export as export_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir written by train.py or '
                    'import_torch.py.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_enum('format', None, export_lib.FORMATS, 'Export format.')
flags.DEFINE_string('output', None, 'Output file (onnx, tflite, stablehlo) or '
                    'directory (saved_model).')
flags.DEFINE_integer('batch_size', None, 'Fixed batch size (default: '
                     'symbolic; tflite: 1).')
flags.DEFINE_enum('quantize', 'none', export_lib.QUANTIZATIONS,
                  'TFLite: float32 (none), float16 weights, or int8 (the '
                  'network in int8, calibrated; NMS float).')
flags.DEFINE_string('calibration_dir', None, '--quantize=int8: a folder of '
                    'images to calibrate on (the first '
                    f'{export_lib.CALIBRATION_IMAGES} by name; default: '
                    f'{export_lib.CALIBRATION_IMAGES} images of the '
                    "config's first training set).")
flags.DEFINE_bool('raw_outputs', False, 'Export boxes and scores of every '
                  'prior (float32 images), without thresholds and NMS.')
flags.DEFINE_bool('verify', True, 'Run the written artifact with its runtime '
                  'and compare with the JAX model (--no_verify skips).')
flags.mark_flags_as_required(['workdir', 'format', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssd_jax.core import priors as priors_lib  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  model, config, step = inference.load_model(FLAGS.workdir, FLAGS.step)
  try:
    summary = export_lib.export(
        model, config, FLAGS.format, FLAGS.output, FLAGS.batch_size,
        quantize=FLAGS.quantize, raw=FLAGS.raw_outputs,
        verify_images=None if FLAGS.verify else False,
        calibration_dir=FLAGS.calibration_dir)
  except (export_lib.ExportError, export_lib.VerificationError,
          ValueError) as e:
    print(f'export failed: {e}', file=sys.stderr)
    sys.exit(1)
  if summary:
    print(f'Verified: {summary}')
  size = config.input.image_size
  batch = FLAGS.batch_size or ('1' if FLAGS.format == 'tflite' else 'batch')
  if FLAGS.raw_outputs:
    signature = (f'images float32 [{batch}, {size}, {size}, 3] RGB 0..255 -> '
                 f'boxes [.., {priors_lib.num_priors(config)}, 4], scores '
                 f'[.., {config.model.num_classes}]')
  else:
    signature = (f'images uint8 [{batch}, {size}, {size}, 3] RGB -> '
                 f'detection_boxes [.., {config.test.max_per_image}, 4] '
                 '(ymin, xmin, ymax, xmax in [0, 1]), detection_scores, '
                 'detection_classes, num_detections')
  print(f'Wrote {FLAGS.output} ({FLAGS.format}): checkpoint step {step}, '
        f'{signature}')


if __name__ == '__main__':
  app.run(main)
