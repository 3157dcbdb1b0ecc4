"""VGG16-SSD300 on COCO 2014: the reference's vgg_ssd300_coco_trainval35k recipe.

81 classes (80 COCO categories + background), the COCO prior sizes and the
400k-iteration schedule; everything else as ssd300_voc.py.
"""

from configs import ssd300_voc

# The reference's COCODataset.class_names: index = contiguous label. With a
# COCO annotation file the names come from its categories (sorted by id).
COCO_CLASSES = (
    '__background__', 'person', 'bicycle', 'car', 'motorcycle', 'airplane',
    'bus', 'train', 'truck', 'boat', 'traffic light', 'fire hydrant',
    'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop',
    'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')


def get_config():
  config = ssd300_voc.get_config()
  config.model.num_classes = 81
  priors = config.model.priors
  priors.min_sizes = (21, 45, 99, 153, 207, 261)
  priors.max_sizes = (45, 99, 153, 207, 261, 315)
  config.data.train = ('coco_2014_train', 'coco_2014_valminusminival')
  config.data.test = ('coco_2014_minival',)
  config.data.class_names = COCO_CLASSES
  config.solver.max_iter = 400000
  config.solver.lr_steps = (280000, 360000)
  config.output_dir = 'outputs/vgg_ssd300_coco_trainval35k'
  return config
