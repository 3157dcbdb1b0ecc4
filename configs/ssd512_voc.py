"""VGG16-SSD512 on PASCAL VOC07+12: the reference's vgg_ssd512_voc0712 recipe."""

from configs import ssd300_voc


def get_config():
  config = ssd300_voc.get_config()
  config.model.backbone.out_channels = (512, 1024, 512, 256, 256, 256, 256)
  config.model.backbone.extras = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1),
                                  (128, 256, 3, 2, 1), (128, 256, 3, 2, 1),
                                  (128, 256, 4, 1, 1))
  priors = config.model.priors
  priors.feature_maps = (64, 32, 16, 8, 4, 2, 1)
  priors.strides = (8, 16, 32, 64, 128, 256, 512)
  priors.min_sizes = (35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8)
  priors.max_sizes = (76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.65)
  priors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))
  priors.boxes_per_location = (4, 6, 6, 6, 6, 4, 4)
  config.input.image_size = 512
  config.solver.batch_size = 24
  config.output_dir = 'outputs/vgg_ssd512_voc0712'
  return config
