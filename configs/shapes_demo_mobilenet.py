"""The offline demo with a light model: MobileNetV2-SSDLite on shapes data.

    python train.py --config=configs/shapes_demo_mobilenet.py

The data, solver and evaluation of shapes_demo.py; the model is the
reference's MobileNetV2-SSDLite (full width, random initialisation: the
ImageNet weights need a download) on a 160-px input, feature maps 10, 5, 3,
2, 1, 1.
"""

from configs import mobilenet_v2_ssd320_voc
from configs import shapes_demo


def get_config():
  config = shapes_demo.get_config()
  config.model = mobilenet_v2_ssd320_voc.get_config().model
  model = config.model
  model.num_classes = len(shapes_demo.SHAPES_CLASSES)
  model.backbone.pretrained = ''
  priors = model.priors
  priors.feature_maps = (10, 5, 3, 2, 1, 1)
  priors.strides = (16, 32, 53, 80, 160, 160)
  priors.min_sizes = (16, 32, 56, 80, 104, 128)
  priors.max_sizes = (32, 56, 80, 104, 128, 160)
  priors.aspect_ratios = ((2,), (2, 3), (2, 3), (2,), (2,), (2,))
  priors.boxes_per_location = (4, 6, 6, 4, 4, 4)
  config.input.image_size = 160
  config.output_dir = 'outputs/shapes_demo_mobilenet'
  return config
