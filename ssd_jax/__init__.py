"""ssd_jax: SSD object detection in JAX/Flax, faithful to lufficc/SSD.

The public API. Names are imported lazily, on first use, as optax and flax
expose theirs: `import ssd_jax` alone imports neither JAX model code nor
TensorFlow, and only the data pipeline's names (`create_train_iterator`,
`create_eval_iterator`) and the trainer (`train_and_evaluate`) bring
TensorFlow in. The modules behind these names may move; these names stay.

  import ssd_jax
  model = ssd_jax.create_model(config)
  detector = ssd_jax.Detector.from_workdir('/tmp/ssd_demo')

The parts (folders): core/ (boxes, priors, matching, loss), models/, data/
(tf.data pipelines), runtime/ (mesh, kernels, model variables, predict),
training/, evaluation/, deploy/, interop/ (PyTorch checkpoints).
"""

import importlib

# Public name -> (module, attribute in that module).
_API = {
    # core maths
    'generate_priors': ('ssd_jax.core.priors', 'generate_priors'),
    'encode_targets': ('ssd_jax.core.targets', 'encode_targets'),
    'multibox_loss': ('ssd_jax.core.losses', 'multibox_loss'),
    'encode_boxes': ('ssd_jax.core.box_ops', 'encode'),
    'decode_boxes': ('ssd_jax.core.box_ops', 'decode'),
    'box_iou': ('ssd_jax.core.box_ops', 'pairwise_iou'),
    # models
    'create_model': ('ssd_jax.models', 'create_model'),
    # runtime
    'create_mesh': ('ssd_jax.runtime.sharding', 'create_mesh'),
    'global_batch': ('ssd_jax.runtime.sharding', 'global_batch'),
    'replicate': ('ssd_jax.runtime.sharding', 'replicate'),
    'ModelVariables': ('ssd_jax.runtime.variables', 'ModelVariables'),
    'model_variables': ('ssd_jax.runtime.variables', 'model_variables'),
    'normalize_images': ('ssd_jax.runtime.predict', 'normalize_images'),
    'make_predict_step': ('ssd_jax.runtime.predict', 'make_predict_step'),
    # training
    'create_optimizer': ('ssd_jax.training.optim', 'create_optimizer'),
    'learning_rate_schedule': ('ssd_jax.training.optim',
                               'learning_rate_schedule'),
    'create_train_state': ('ssd_jax.training.train_step',
                           'create_train_state'),
    'make_train_step': ('ssd_jax.training.train_step', 'make_train_step'),
    'Checkpointer': ('ssd_jax.training.checkpointing', 'Checkpointer'),
    'train_and_evaluate': ('ssd_jax.training.trainer', 'train_and_evaluate'),
    # data (TensorFlow)
    'create_train_iterator': ('ssd_jax.data.pipeline', 'create_train_iterator'),
    'create_eval_iterator': ('ssd_jax.data.pipeline', 'create_eval_iterator'),
    # evaluation
    'detect': ('ssd_jax.evaluation.postprocess', 'detect'),
    'nms': ('ssd_jax.evaluation.postprocess', 'nms'),
    'eval_detection_voc': ('ssd_jax.evaluation.voc_eval',
                           'eval_detection_voc'),
    'evaluate_dataset': ('ssd_jax.evaluation.evaluate', 'evaluate_dataset'),
    'evaluate_workdir': ('ssd_jax.evaluation.workdir', 'evaluate_workdir'),
    # deployment
    'Detector': ('ssd_jax.deploy.inference', 'Detector'),
    'resize_for_model': ('ssd_jax.deploy.inference', 'resize_for_model'),
    'load_image': ('ssd_jax.deploy.inference', 'load_image'),
    'draw_detections': ('ssd_jax.deploy.visualize', 'draw_detections'),
    'export': ('ssd_jax.deploy.export', 'export'),
    # interop
    'load_torch_checkpoint': ('ssd_jax.interop.torch_import',
                              'load_torch_checkpoint'),
    'load_pretrained_vgg': ('ssd_jax.interop.torch_import',
                            'load_pretrained_vgg'),
}

# The names whose modules import TensorFlow (the rest never do).
TENSORFLOW_NAMES = frozenset({
    'create_train_iterator', 'create_eval_iterator', 'train_and_evaluate',
    'evaluate_workdir'})

__all__ = sorted(_API)


def __getattr__(name):
  try:
    module_name, attribute = _API[name]
  except KeyError:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}'
                         ) from None
  value = getattr(importlib.import_module(module_name), attribute)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(_API))
