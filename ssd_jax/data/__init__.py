"""Input data on the host: datasets, augmentation and the tf.data pipelines.

TensorFlow is used here only, and only on the CPU: the accelerators belong to
JAX (see `hide_gpus_from_tensorflow`).
"""

_GPUS_HIDDEN = False


def hide_gpus_from_tensorflow():
  """Keeps TensorFlow off the GPUs (it would reserve their memory).

  Called when a module of this package that uses TensorFlow is imported,
  before any TensorFlow op runs. Without GPUs, or once TensorFlow has
  initialised its devices, there is nothing to do.
  """
  global _GPUS_HIDDEN
  if _GPUS_HIDDEN:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # devices already initialised
    return
  _GPUS_HIDDEN = True
