"""A tiny SSD config for fast tests (64px input, VGG widths / 16)."""

from configs import ssd300_voc


def tiny_config(num_classes=4):
  config = ssd300_voc.get_config()
  config.model.num_classes = num_classes
  config.model.backbone.pretrained = ''
  config.model.backbone.width_divisor = 16
  config.model.backbone.out_channels = (32, 64, 32, 32)
  config.model.backbone.extras = ((16, 32, 3, 2, 1), (16, 32, 3, 2, 1))
  p = config.model.priors
  p.feature_maps = (8, 4, 2, 1)
  p.strides = (8, 16, 32, 64)
  p.min_sizes = (10, 20, 36, 50)
  p.max_sizes = (20, 36, 50, 64)
  p.aspect_ratios = ((2,), (2, 3), (2,), (2,))
  p.boxes_per_location = (4, 6, 4, 4)
  config.input.image_size = 64
  config.data.class_names = ('__background__',) + tuple(
      f'class{i}' for i in range(1, num_classes))
  config.data.max_boxes = 8
  config.solver.batch_size = 4
  return config


def tiny_shapes_config(root, num_train=32, num_test=8):
  """tiny_config on a small generated shapes dataset under `root`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import shapes_demo  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_classes=len(shapes_demo.SHAPES_CLASSES))
  config.data.class_names = shapes_demo.SHAPES_CLASSES
  config.data.voc_root = str(root)
  config.data.synthetic_shapes = ml_collections.ConfigDict(dict(
      num_train=num_train, num_test=num_test, image_size=80, seed=0))
  config.data.train = ('voc_2007_trainval',)
  config.data.test = ('voc_2007_test',)
  config.solver.optimizer = 'adam'
  config.solver.warmup_iters = 2
  config.solver.lr_steps = (6,)
  config.test.batch_size = 4
  config.log_step = 1
  config.save_step = 4
  config.eval_step = 0
  config.keep_checkpoints = 5
  config.model.backbone.batch_norm = True
  return config


def tiny_mobilenet_config(name='mobilenet_v2', num_classes=4):
  """The reference MobileNet-SSDLite (full width) on a 64-px input: feature
  maps 4, 2, 1, 1, 1, 1, small priors; training values as tiny_config."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}_ssd320_voc')
  config = module.get_config()
  base = tiny_config(num_classes)
  config.model.num_classes = num_classes
  config.model.backbone.pretrained = ''
  p = config.model.priors
  p.feature_maps = (4, 2, 1, 1, 1, 1)
  p.strides = (16, 32, 64, 64, 64, 64)
  p.min_sizes = (10, 20, 30, 40, 50, 56)
  p.max_sizes = (20, 30, 40, 50, 56, 64)
  p.aspect_ratios = ((2,), (2, 3), (2,), (2,), (2,), (2,))
  p.boxes_per_location = (4, 6, 4, 4, 4, 4)
  config.input.image_size = 64
  config.data.class_names = base.data.class_names
  config.data.max_boxes = base.data.max_boxes
  config.solver.batch_size = base.solver.batch_size
  return config


def tiny_mobilenet_shapes_config(root, name='mobilenet_v2', num_train=32,
                                 num_test=8):
  """tiny_mobilenet_config on a small generated shapes dataset under `root`."""
  config = tiny_shapes_config(root, num_train, num_test)
  model = tiny_mobilenet_config(name, len(config.data.class_names)).model
  config.model = model
  config.input.image_size = 64
  return config


def reference_state_dict(config, seed=0):
  """Random weights for the model of `config` as a reference state dict.

  {key: float32 array} with the keys (the model's `torch_entries`) and the
  layouts (OIHW convs) of lufficc/SSD's SSDDetector state dict, what
  ssd_jax.interop.torch_import reads. Convs N(0, sqrt(2 / fan_in)), vectors
  N(0, 0.01), the L2Norm scale 20. Models with convs and vectors only (VGG
  without BatchNorm).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: models.create_model(config))
  rs = np.random.RandomState(seed)
  state_dict = {}
  for key, (variable, kind) in model.torch_entries().items():
    shape = tuple(variable.shape)
    if key.endswith('l2_norm.weight'):
      value = np.full(shape, 20.0)
    elif kind == 'conv':
      h, w, i, o = shape
      value = rs.normal(0, np.sqrt(2 / (h * w * i)), (o, i, h, w))
    elif kind == 'vector':
      value = rs.normal(0, 0.01, shape)
    else:
      raise ValueError(f'reference_state_dict: {key} is a {kind!r} entry')
    state_dict[key] = value.astype(np.float32)
  return state_dict


def tiny_shapes_flags(root, num_train=32, num_test=8):
  """train.py flags on configs/shapes_demo.py that build tiny_shapes_config."""
  overrides = {
      'model.num_classes': 5,
      'model.backbone.width_divisor': 16, 'model.backbone.batch_norm': True,
      'model.backbone.out_channels': '(32, 64, 32, 32)',
      'model.backbone.extras': '((16, 32, 3, 2, 1), (16, 32, 3, 2, 1))',
      'model.priors.feature_maps': '(8, 4, 2, 1)',
      'model.priors.strides': '(8, 16, 32, 64)',
      'model.priors.min_sizes': '(10, 20, 36, 50)',
      'model.priors.max_sizes': '(20, 36, 50, 64)',
      'model.priors.aspect_ratios': '((2,), (2, 3), (2,), (2,))',
      'model.priors.boxes_per_location': '(4, 6, 4, 4)',
      'input.image_size': 64, 'data.voc_root': str(root),
      'data.synthetic_shapes.num_train': num_train,
      'data.synthetic_shapes.num_test': num_test,
      'data.synthetic_shapes.image_size': 80, 'data.max_boxes': 8,
      'solver.batch_size': 4, 'solver.warmup_iters': 2,
      'solver.lr_steps': '(6,)', 'solver.lr': 1e-3,
      'solver.weight_decay': 5e-4, 'test.batch_size': 4, 'log_step': 1,
      'save_step': 4, 'eval_step': 0, 'keep_checkpoints': 5,
  }
  return ['--config=configs/shapes_demo.py'] + [
      f'--config.{key}={value}' for key, value in overrides.items()]


def assert_bfloat16_close_to_float32(model, config, images):
  """`model` (built with config.model.dtype='bfloat16') in eval mode gives
  outputs within 5% of their magnitude of the float32 model with the same
  weights and statistics; its class logits are bfloat16."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  forward = nnx.jit(lambda model, images: model(images))
  model.eval()
  low_precision = forward(model, images)
  assert low_precision[0].dtype == jnp.bfloat16
  config = config.copy_and_resolve_references()
  config.model.dtype = 'float32'
  reference = nnx.eval_shape(lambda: models.create_model(config))
  nnx.update(reference, nnx.state(model))
  reference.eval()
  for low, high in zip(low_precision, forward(reference, images)):
    scale = float(jnp.abs(high).max())
    assert float(jnp.abs(low.astype(jnp.float32) - high).max()) < 0.05 * scale


def train_and_check(config, workdir):
  """trainer.train_and_evaluate(config) into `workdir`, then checks what
  every run must leave: a finite logged loss for each iteration, a
  checkpoint every save_step, the final evaluation JSON. Returns that JSON."""
  import json  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(config, str(workdir))
  steps = config.solver.max_iter
  log = (workdir / 'log.txt').read_text()
  losses = [float(v) for v in re.findall(r'total_loss: (\S+) \(', log)]
  assert len(losses) == steps and np.isfinite(losses).all()
  assert checkpointing.Checkpointer(str(workdir)).all_steps() == list(
      range(config.save_step, steps + 1, config.save_step))
  with open(workdir / 'eval' / f'voc_2007_test_{steps}.json') as f:
    result = json.load(f)
  assert result['step'] == steps and 0 <= result['map'] <= 1
  return result
