"""EfficientNet-B3-SSD300 on PASCAL VOC07+12: the reference's
efficient_net_b3_ssd300_voc0712 recipe.

SSD300's priors and input size with the EfficientNet-B3 backbone (feature
maps of 48, 136 and 384 channels from blocks 7, 17 and 25, then three extra
levels of 256) and the reference's solver for it: batch 24, 160k iterations,
learning rate x0.1 at 105k and 135k.
"""

from configs import ssd300_voc
from ssd_jax.models import efficientnet


def get_config():
  config = ssd300_voc.get_config()
  backbone = config.model.backbone
  backbone.name = 'efficientnet_b3'
  backbone.out_channels = (48, 136, 384, 256, 256, 256)
  # The ImageNet weights the reference loads (non-strictly, into the blocks
  # and stem; path or URL; '' = random initialisation).
  backbone.pretrained = efficientnet.B3_PRETRAINED_URL
  # EfficientNet compound scaling (B3: width 1.2, depth 1.4); smaller values
  # give reduced models for demos and tests.
  backbone.width_coefficient = efficientnet.B3_WIDTH_COEFFICIENT
  backbone.depth_coefficient = efficientnet.B3_DEPTH_COEFFICIENT
  # Training-only: block i of n skips its residual branch for an example with
  # probability drop_connect_rate * i / n (the reference's 0.2), when the
  # caller passes an RngStream to the backbone; the train step does not yet.
  backbone.drop_connect_rate = 0.2
  # Extra levels after the last block: (mid_channels, out_channels, kernel,
  # stride, padding), a 1x1 conv then a kernel x kernel conv, ReLU after each.
  backbone.extras = ((128, 256, 3, 2, 1), (128, 256, 3, 1, 0),
                     (128, 256, 3, 1, 0))
  del backbone.width_divisor, backbone.batch_norm  # VGG-only options

  config.solver.max_iter = 160000
  config.solver.lr_steps = (105000, 135000)
  config.solver.batch_size = 24
  config.output_dir = 'outputs/efficient_net_b3_ssd300_voc0712'
  return config
