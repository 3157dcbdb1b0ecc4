"""VGG16-SSD512 on COCO 2014: the reference's vgg_ssd512_coco_trainval35k recipe.

The SSD512 network of ssd512_voc.py with 81 classes, the COCO prior sizes and
the reference's schedule for it (batch 24, 520k iterations, steps 360k/480k).
"""

from configs import ssd300_coco
from configs import ssd512_voc


def get_config():
  config = ssd512_voc.get_config()
  config.model.num_classes = 81
  priors = config.model.priors
  priors.min_sizes = (20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8)
  priors.max_sizes = (51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72)
  config.data.train = ('coco_2014_train', 'coco_2014_valminusminival')
  config.data.test = ('coco_2014_minival',)
  config.data.class_names = ssd300_coco.COCO_CLASSES
  config.solver.max_iter = 520000
  config.solver.lr_steps = (360000, 480000)
  config.output_dir = 'outputs/vgg_ssd512_coco_trainval35k'
  return config
