"""Generates the shapes dataset (VOC format) the offline demo trains on.

  python make_shapes.py --out=DIR [--num_train=2000] [--num_test=500] \
      [--image_size=160] [--seed=0]

Writes DIR/VOC2007 (JPEGImages, Annotations, ImageSets/Main); train with
`--config.data.voc_root=DIR`. configs/shapes_demo.py generates it itself on
first use.
"""

import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder (the voc_root).')
flags.DEFINE_integer('num_train', 2000, 'Trainval images (a tenth of them '
                     'form val).')
flags.DEFINE_integer('num_test', 500, 'Test images.')
flags.DEFINE_integer('image_size', 160, 'Long side of the images in pixels.')
flags.DEFINE_integer('seed', 0, 'Random seed.')
flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.generate(FLAGS.out, num_train=FLAGS.num_train,
                  num_test=FLAGS.num_test, image_size=FLAGS.image_size,
                  seed=FLAGS.seed)
  print(f'wrote {FLAGS.num_train} trainval + {FLAGS.num_test} test images to '
        f'{os.path.join(FLAGS.out, "VOC2007")}')


if __name__ == '__main__':
  app.run(main)
