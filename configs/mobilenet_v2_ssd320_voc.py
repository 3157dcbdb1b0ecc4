"""MobileNetV2-SSDLite320 on PASCAL VOC07+12: the reference's
mobilenet_v2_ssd320_voc0712 recipe.

torchvision's ImageNet MobileNetV2 as backbone (its `features.*` weights
loaded non-strictly, as the reference does), the SSDLite predictor, 320-px
input and six feature maps (20, 10, 5, 3, 2, 1); the solver and everything
else as ssd300_voc.py.
"""

from configs import ssd300_voc

MOBILENET_V2_URL = (
    'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth')


def get_config():
  config = ssd300_voc.get_config()
  model = config.model
  model.box_head.predictor = 'ssdlite'
  backbone = model.backbone
  backbone.name = 'mobilenet_v2'
  backbone.out_channels = (96, 1280, 512, 256, 256, 64)
  backbone.pretrained = MOBILENET_V2_URL
  # The VGG-only options do not apply.
  del backbone['width_divisor'], backbone['batch_norm'], backbone['extras']
  priors = model.priors
  priors.feature_maps = (20, 10, 5, 3, 2, 1)
  priors.strides = (16, 32, 64, 107, 160, 320)
  priors.min_sizes = (60, 105, 150, 195, 240, 285)
  priors.max_sizes = (105, 150, 195, 240, 285, 330)
  priors.aspect_ratios = ((2, 3),) * 6
  priors.boxes_per_location = (6,) * 6
  config.input.image_size = 320
  config.output_dir = 'outputs/mobilenet_v2_ssd320_voc0712'
  return config
