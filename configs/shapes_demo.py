"""The offline demo: a reduced SSD trained on the generated shapes dataset.

    python train.py --config=configs/shapes_demo.py

The dataset (ssd_jax.data.shapes: circles, squares, triangles and crosses on
textured backgrounds, VOC2007 layout) is written to data.voc_root on first
use. The model is VGG16-SSD with every width divided by 8, BatchNorm after
each VGG conv, a 128-px input and five feature maps (16, 8, 4, 2, 1); the
rest (matching, loss, augmentation, evaluation) is the reference's.
"""

import ml_collections

from configs import ssd300_voc

SHAPES_CLASSES = ('__background__', 'circle', 'square', 'triangle', 'cross')


def get_config():
  config = ssd300_voc.get_config()
  model = config.model
  model.num_classes = len(SHAPES_CLASSES)
  backbone = model.backbone
  backbone.pretrained = ''
  backbone.width_divisor = 8
  backbone.batch_norm = True
  backbone.extras = ((32, 64, 3, 2, 1), (16, 32, 3, 2, 1), (16, 32, 3, 2, 1))
  backbone.out_channels = (64, 128, 64, 32, 32)
  priors = model.priors
  priors.feature_maps = (16, 8, 4, 2, 1)
  priors.strides = (8, 16, 32, 64, 128)
  priors.min_sizes = (13, 26, 48, 70, 92)
  priors.max_sizes = (26, 48, 70, 92, 115)
  priors.aspect_ratios = ((2,), (2, 3), (2, 3), (2,), (2,))
  priors.boxes_per_location = (4, 6, 6, 4, 4)
  config.input.image_size = 128

  data = config.data
  data.voc_root = 'datasets/shapes'
  # Generated into voc_root on first use (ssd_jax.data.shapes.ensure_dataset).
  data.synthetic_shapes = ml_collections.ConfigDict(dict(
      num_train=2000, num_test=500, image_size=160, seed=0))
  data.train = ('voc_2007_trainval',)
  data.test = ('voc_2007_test',)
  data.class_names = SHAPES_CLASSES
  data.max_boxes = 16

  solver = config.solver
  solver.optimizer = 'adam'
  solver.lr = 2e-3
  solver.batch_size = 32
  solver.max_iter = 680
  solver.lr_steps = (510, 620)
  solver.warmup_iters = 50
  solver.weight_decay = 5e-5

  config.test.batch_size = 50
  config.output_dir = 'outputs/shapes_demo'
  config.log_step = 20
  config.save_step = 340
  config.eval_step = 0  # evaluate at the end only
  return config
