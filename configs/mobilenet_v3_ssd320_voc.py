"""MobileNetV3-SSDLite320 on PASCAL VOC07+12: the reference's
mobilenet_v3_ssd320_voc0712 recipe.

The reference's MobileNetV3-Large (ImageNet weights of
d-li14/mobilenetv3.pytorch, loaded non-strictly as the reference does), the
SSDLite predictor and the priors of mobilenet_v2_ssd320_voc.py.
"""

from configs import mobilenet_v2_ssd320_voc

MOBILENET_V3_URL = (
    'https://github.com/d-li14/mobilenetv3.pytorch/raw/master/pretrained/'
    'mobilenetv3-large-1cd25616.pth')


def get_config():
  config = mobilenet_v2_ssd320_voc.get_config()
  backbone = config.model.backbone
  backbone.name = 'mobilenet_v3'
  backbone.out_channels = (112, 960, 512, 256, 256, 64)
  backbone.pretrained = MOBILENET_V3_URL
  config.output_dir = 'outputs/mobilenet_v3_ssd320_voc0712'
  return config
