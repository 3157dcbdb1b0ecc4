"""VGG16-SSD300 on PASCAL VOC07+12: the reference's vgg_ssd300_voc0712 recipe.

Every value of the reference's effective config, lower-cased and grouped as
the reference groups them, plus what JAX needs (max_boxes, dtype, seed).
Sequences that users override from the command line are tuples, e.g.
`--config.data.train="('voc_2007_trainval',)"`.
"""

import ml_collections

VOC_CLASSES = (
    '__background__', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')

VGG16_REDUCEDFC_URL = (
    'https://s3.amazonaws.com/amdegroot-models/vgg16_reducedfc.pth')


def get_config():
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.num_classes = 21
  model.threshold = 0.5
  model.neg_pos_ratio = 3
  model.center_variance = 0.1
  model.size_variance = 0.2
  # 'float32' (exact parity) or 'bfloat16' (activations; params stay float32).
  model.dtype = 'float32'

  model.backbone = backbone = ml_collections.ConfigDict()
  # 'vgg', 'mobilenet_v2', 'mobilenet_v3' or 'efficientnet_b3'
  # (ssd_jax.models.backbones.BACKBONES).
  backbone.name = 'vgg'
  backbone.out_channels = (512, 1024, 512, 256, 256, 256)
  # Path or URL of the VGG16 reduced-fc weights; '' = random initialisation.
  backbone.pretrained = VGG16_REDUCEDFC_URL
  # Expected sha256 (hex) of that file, checked when set ('' = no check; the
  # reference publishes none).
  backbone.pretrained_sha256 = ''
  # VGG16 conv widths are divided by this (1 = the real VGG16).
  backbone.width_divisor = 1
  # BatchNorm after every VGG conv: only for reduced demo models (the
  # reference VGG has none).
  backbone.batch_norm = False
  # Extra feature layers after conv7: one (mid_channels, out_channels, kernel,
  # stride, padding) per level; each is a 1x1 conv to mid_channels then a
  # kernel x kernel conv, both followed by ReLU.
  backbone.extras = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1),
                     (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))

  model.box_head = box_head = ml_collections.ConfigDict()
  box_head.name = 'SSDBoxHead'
  # 'ssd' (3x3 convs, SSDBoxPredictor) or 'ssdlite' (SSDLiteBoxPredictor).
  box_head.predictor = 'ssd'

  model.priors = priors = ml_collections.ConfigDict()
  priors.feature_maps = (38, 19, 10, 5, 3, 1)
  priors.strides = (8, 16, 32, 64, 100, 300)
  priors.min_sizes = (30, 60, 111, 162, 213, 264)
  priors.max_sizes = (60, 111, 162, 213, 264, 315)
  priors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
  priors.boxes_per_location = (4, 6, 6, 6, 4, 4)
  priors.clip = True

  config.input = inp = ml_collections.ConfigDict()
  inp.image_size = 300
  inp.pixel_mean = (123, 117, 104)  # RGB
  # Train images cross to the device as 'float32' (the reference's values,
  # which the photometric distortion takes beyond 0..255) or 'uint8' (those
  # rounded and saturated: 4x fewer bytes, ~10% of values clipped on VOC).
  # Eval images are uint8 (exact) either way.
  inp.train_image_dtype = 'float32'

  config.data = data = ml_collections.ConfigDict()
  data.train = ('voc_2007_trainval', 'voc_2012_trainval')
  data.test = ('voc_2007_test',)
  # A VOCdevkit-style folder holding VOC2007/ and VOC2012/; '' = read TFDS.
  data.voc_root = ''
  # A COCO folder holding train2014/, val2014/, train2017/, val2017/ and
  # annotations/instances_<split>.json, for the coco_* datasets; '' = read
  # TFDS coco/2017 (coco_2017_train / coco_2017_val only).
  data.coco_root = ''
  data.tfds_data_dir = ''  # '' = the TFDS default (~/tensorflow_datasets).
  data.class_names = VOC_CLASSES  # index = label, 0 = background
  # Objects of other classes: an error before training (False), or dropped
  # and counted (True, e.g. to train on a subset of the classes).
  data.skip_unknown_classes = False
  data.max_boxes = 64  # ground truth padded to this many boxes per image
  data.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
  data.prefetch = 2  # batches prefetched to the device

  config.solver = solver = ml_collections.ConfigDict()
  solver.optimizer = 'sgd'
  solver.max_iter = 120000
  solver.lr_steps = (80000, 100000)
  solver.gamma = 0.1
  solver.batch_size = 32
  solver.lr = 1e-3
  solver.momentum = 0.9
  solver.weight_decay = 5e-4
  solver.warmup_factor = 1.0 / 3
  solver.warmup_iters = 500

  config.test = test = ml_collections.ConfigDict()
  test.nms_threshold = 0.45
  test.confidence_threshold = 0.01
  test.max_per_class = -1  # not used, as in the reference
  test.max_per_image = 100
  test.batch_size = 10
  # Post-processing on the device (core/detect.py) instead of the host: the
  # Detector, eval.py and every exported graph use it. It keeps the best
  # `candidates_per_class` priors of each class for NMS; where a class has
  # more above the threshold, the rest are cut (and counted).
  test.nms_on_device = False
  test.candidates_per_class = 400

  config.seed = 0
  config.output_dir = 'outputs/vgg_ssd300_voc0712'
  config.log_step = 10
  config.save_step = 2500
  config.eval_step = 2500
  config.keep_checkpoints = 3
  # GPU: XLA's deterministic ops (--xla_gpu_deterministic_ops, slower), the
  # condition for bit-identical resume there. CPU runs are deterministic.
  config.deterministic = False
  return config
