"""Detections on images of any size, as evaluation computes them.

    detector = inference.Detector.from_workdir('outputs/ssd300_voc')
    [result] = detector(['photo.jpg'])  # or uint8 [H, W, 3] RGB arrays
    result['boxes'], result['scores'], result['labels'], result['class_names']

The path from pixels to boxes is evaluation's: the test-time resize
(`resize_for_model`, equal to the eval input pipeline's resize bit for bit),
mean subtraction, `predict_lib.predict` (the forward of eval's predict step) and
`postprocess.detect` (softmax, decode, thresholds, NMS, top-k, rescale to the
original size). So the boxes equal what eval.py scores for the same images.

Speed: the images of a call are decoded and resized by a thread pool (PIL and
numpy release the GIL) while the device runs the previous batch, and the host
post-processes batch k while the device computes batch k + 1. Batches cross to
the device as uint8 and are converted there. One compiled forward per batch
size, and only a few sizes: full batches of `batch_size`, a smaller last batch
padded up to the next power of two (never a recompile per image size).

No TensorFlow here: this module runs where only JAX is installed.
"""

import concurrent.futures
import os

import jax
import numpy as np
from flax import nnx
from PIL import Image

from ssd_jax import models
from ssd_jax.core import detect as detect_lib
from ssd_jax.core import priors as priors_lib
from ssd_jax.evaluation import postprocess
from ssd_jax.runtime import kernels
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib
from ssd_jax.training import checkpointing


def load_model(workdir, step=None):
  """The model of a workdir (train.py or ssd_jax.interop.torch_import).

  Args:
    workdir: holds config.json and checkpoints/<step>/.
    step: the checkpoint's step (None = the latest).

  Returns:
    (model, config, step): an NNX SSD with the checkpoint's variables, the
    config saved in the workdir, the step restored.
  """
  config = checkpointing.load_config(workdir)
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
    # Every variable comes from the checkpoint: no random initialisation.
    model = nnx.eval_shape(lambda: models.create_model(config))
    step = checkpointing.restore_model(checkpointer, model, step)
  finally:
    checkpointer.close()
  return model, config, step


def load_image(path):
  """An image file as uint8 [H, W, 3] RGB.

  Any format PIL reads; grayscale, palette, CMYK, RGBA (alpha dropped) and
  16-bit images come out as RGB. The EXIF orientation is not applied, as in
  evaluation and in the reference. An unreadable file raises ValueError
  naming it.
  """
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
      return np.asarray(image)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f'{path}: cannot be read as an image '
                     f'({type(e).__name__}: {e})') from e


def _bilinear_taps(out_size, in_size):
  """Source rows of a half-pixel bilinear resize of one axis.

  Output i samples (i + 0.5) * in / out - 0.5 between rows `low` and `high`
  (clamped to the image) with weight `frac` on `high`, in float32 and in the
  order TensorFlow's ResizeBilinear computes them (what the eval pipeline
  runs), so that the interpolated values are the same floats.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  source = ((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
            - np.float32(0.5))
  floor = np.floor(source)
  low = np.maximum(floor.astype(np.int64), 0)
  high = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
  return low, high, (source - floor).astype(np.float32)


def resize_for_model(image, size):
  """The test-time resize: uint8 [H, W, 3] -> uint8 [size, size, 3].

  Bilinear with half-pixel centres, edges clamped, no antialiasing, rounded
  half up to uint8: the eval input pipeline's resize
  (`data.augment.eval_transform`) to the bit,
  and OpenCV's cv2.resize (the reference's) up to the rounding of a few
  values. Only the 2 x size rows and columns it samples are read, so the
  cost does not grow with the image.
  """
  height, width = image.shape[:2]
  y_low, y_high, y_frac = _bilinear_taps(size, height)
  x_low, x_high, x_frac = _bilinear_taps(size, width)
  rows = image[np.concatenate([y_low, y_high])]
  corners = rows[:, np.concatenate([x_low, x_high])].astype(np.float32)
  top_left, top_right = corners[:size, :size], corners[:size, size:]
  bottom_left, bottom_right = corners[size:, :size], corners[size:, size:]
  x_frac = x_frac[None, :, None]
  top = top_left + (top_right - top_left) * x_frac
  bottom = bottom_left + (bottom_right - bottom_left) * x_frac
  pixels = top + (bottom - top) * y_frac[:, None, None]
  return np.clip(np.floor(pixels + np.float32(0.5)), 0, 255).astype(np.uint8)


def _as_rgb_array(image, index):
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(
        f'image {index}: expected a uint8 [H, W, 3] RGB array or a file '
        f'path, got {image.dtype} {image.shape} (convert it, e.g. with '
        'PIL.Image.fromarray(x).convert("RGB"))')
  if not (image.shape[0] and image.shape[1]):
    raise ValueError(f'image {index}: empty image of shape {image.shape}')
  return image


def _default_threads():
  if hasattr(os, 'sched_getaffinity'):
    return max(1, min(8, len(os.sched_getaffinity(0))))
  return max(1, min(8, os.cpu_count() or 1))


class Detector:
  """A trained SSD applied to images of any size; see the module docstring.

  Call it on a list of images (uint8 [H, W, 3] RGB arrays and/or file paths)
  to get one dict per image: 'boxes' float32 [K, 4] (xmin, ymin, xmax, ymax)
  in the original image's pixels, unclipped (the reference's convention);
  'scores' float32 [K], descending; 'labels' int64 [K], 1-based class
  indices; 'class_names' the K labels' names. K <= config.test.max_per_image.
  """

  def __init__(self, model, config, *, batch_size=8, num_threads=None):
    """
    Args:
      model: an NNX SSD of `config` (BatchNorm is used in eval mode).
      config: its experiment config (`input`, `model`, `test`,
        `data.class_names`).
      batch_size: images per forward pass; rounded up to a multiple of the
        number of local devices, over which each batch is split.
      num_threads: threads that decode and resize images (None: the CPUs
        available, at most 8).
    """
    self.config = config
    self.class_names = tuple(config.data.class_names)
    self.image_size = int(config.input.image_size)
    self.priors = priors_lib.generate_priors(config)
    devices = jax.local_devices()
    self._mesh = sharding.create_mesh(devices)
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    # Batch sizes compiled for: batch_size, and smaller powers of two (times
    # the device count) for the last batch of a call.
    self._sizes = sorted({self.batch_size} | {
        len(devices) * 2**k for k in range(32)
        if len(devices) * 2**k < self.batch_size})
    model_def, variables = variables_lib.model_variables(model)
    self._state = jax.device_put(variables,
                                 sharding.replicated_sharding(self._mesh))
    # uint8 [B, S, S, 3] resized images -> (cls_logits, bbox_pred), or with
    # test.nms_on_device (images, threshold) -> core.detect.Detections.
    self.nms_on_device = bool(config.test.get('nms_on_device', False))
    forward = (predict_lib.pixels_to_detections if self.nms_on_device
               else predict_lib.pixels_to_outputs)(model_def, config)
    self._forward = kernels.step_kernels(
        sharding.mesh_platform(self._mesh)).jit(forward)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_threads or _default_threads(), thread_name_prefix='ssd_detector')
    self.step = None

  @classmethod
  def from_workdir(cls, workdir, step=None, **kwargs):
    """The detector of a workdir's latest checkpoint (or of `step`)."""
    model, config, step = load_model(workdir, step)
    detector = cls(model, config, **kwargs)
    detector.step = step
    return detector

  @classmethod
  def from_torch(cls, path, config, **kwargs):
    """The detector of a reference (lufficc/SSD) .pth checkpoint."""
    from ssd_jax.interop import torch_import  # pylint: disable=g-import-not-at-top
    return cls(torch_import.load_torch_checkpoint(path, config), config,
               **kwargs)

  def preprocess(self, image, index=0):
    """An image (array or path) -> (uint8 [S, S, 3] network input, (h, w))."""
    image = _as_rgb_array(image, index)
    return resize_for_model(image, self.image_size), image.shape[:2]

  def _padded_size(self, count):
    return next(size for size in self._sizes if size >= count)

  def _dispatch(self, prepared, config):
    """Starts the forward pass of up to batch_size preprocessed images."""
    size = self._padded_size(len(prepared))
    batch = np.zeros((size, self.image_size, self.image_size, 3), np.uint8)
    for i, (pixels, _) in enumerate(prepared):
      batch[i] = pixels
    batch = jax.device_put(batch, sharding.batch_sharding(self._mesh))
    if self.nms_on_device:
      return self._forward(self._state, batch,
                           np.float32(config.test.confidence_threshold))
    return self._forward(self._state, batch)  # returns before it is done

  def _finish(self, prepared, outputs, config):
    count = len(prepared)
    orig_sizes = np.array([hw for _, hw in prepared], np.int64)
    if self.nms_on_device:
      outputs = detect_lib.Detections(*(np.asarray(x)[:count]
                                        for x in outputs))
      detections = detect_lib.to_host_detections(outputs, orig_sizes,
                                                 self.image_size)
    else:
      cls_logits, bbox_pred = (np.asarray(x)[:count] for x in outputs)
      detections = postprocess.detect(cls_logits, bbox_pred, self.priors,
                                      orig_sizes, config)
    for det in detections:
      det['class_names'] = [self.class_names[label] for label in det['labels']]
    return detections

  def __call__(self, images, score_threshold=0.01):
    """Detections for each image; see the class docstring.

    Args:
      images: a list of uint8 [H, W, 3] RGB arrays and/or image file paths.
      score_threshold: keep (prior, class) pairs scoring above this before
        NMS; the config's `test.confidence_threshold` (0.01) gives exactly
        evaluation's detections, a higher one the subset of those scoring
        above it.

    Returns:
      A list with one dict per image, in order.
    """
    images = list(images)
    config = self.config.copy_and_resolve_references()
    config.test.confidence_threshold = float(score_threshold)
    chunks = [range(i, min(i + self.batch_size, len(images)))
              for i in range(0, len(images), self.batch_size)]

    def submit(chunk):
      return [self._pool.submit(self.preprocess, images[i], i) for i in chunk]

    results = []
    pending = None
    loading = submit(chunks[0]) if chunks else None
    for k in range(len(chunks)):
      prepared = [future.result() for future in loading]
      if k + 1 < len(chunks):  # decode the next batch during this one
        loading = submit(chunks[k + 1])
      outputs = self._dispatch(prepared, config)
      if pending is not None:
        results.extend(self._finish(*pending, config))
      pending = (prepared, outputs)
    if pending is not None:
      results.extend(self._finish(*pending, config))
    return results

  def close(self):
    """Stops the preprocessing threads."""
    self._pool.shutdown(wait=False, cancel_futures=True)
