"""The eval-mode forward pass, pure and compiled.

Input contract: RGB pixel values [B,S,S,3] (uint8, or float), not
mean-subtracted; the mean (config.input.pixel_mean) is subtracted on the
device, so images cross to it as uint8. Outputs: float32 raw logits
[B,P,C] and encoded boxes [B,P,4], P the number of priors; or, with the
post-processing on the device (`test.nms_on_device`), `core.detect`'s padded
Detections.
"""

import functools

import jax.numpy as jnp

from ssd_jax.core import detect as detect_lib
from ssd_jax.core import priors as priors_lib
from ssd_jax.runtime import kernels
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib


def normalize_images(images, pixel_mean):
  """Pixel values [B,S,S,3] RGB (uint8, or float) -> float32 minus the mean.

  The model's input: what the reference's SubtractMeans + ToTensor give.
  """
  return images.astype(jnp.float32) - jnp.asarray(pixel_mean, jnp.float32)


def predict(model_def, variables, images):
  """The eval-mode forward pass: images -> (cls_logits, bbox_pred).

  Pure and not compiled, for callers that compose it into their own jitted
  or exported function; `make_predict_step` is its compiled form. `images`
  float [B,S,S,3], mean-subtracted; `variables` a ModelVariables (or any
  object with params and model_state, e.g. a TrainState). Outputs float32,
  [B,P,C] raw logits and [B,P,4] encoded boxes. The CPU kernels follow
  `layers.cpu_kernels` where the caller traces it.
  """
  cls_logits, bbox_pred = variables_lib.eval_model(model_def, variables)(images)
  return cls_logits.astype(jnp.float32), bbox_pred.astype(jnp.float32)


def pixels_to_outputs(model_def, config):
  """-> pure `fn(variables, pixels) -> (cls_logits, bbox_pred)`: mean
  subtraction and the eval forward, what every predict path compiles."""
  pixel_mean = tuple(float(v) for v in config.input.pixel_mean)

  def fn(variables, pixels):
    return predict(model_def, variables, normalize_images(pixels, pixel_mean))
  return fn


def pixels_to_detections(model_def, config):
  """-> pure `fn(variables, pixels, confidence_threshold) -> Detections`:
  `pixels_to_outputs` followed by `core.detect.detect` (the threshold may be
  a traced scalar)."""
  forward = pixels_to_outputs(model_def, config)
  priors = priors_lib.generate_priors(config)

  def fn(variables, pixels, confidence_threshold):
    cls_logits, bbox_pred = forward(variables, pixels)
    return detect_lib.detect(cls_logits, bbox_pred, priors, config,
                             confidence_threshold=confidence_threshold)
  return fn


def make_predict_step(config, model_def, mesh=None, *, platform=None,
                      cpu_kernels=None, nms_on_device=None):
  """The jit-compiled `predict_step(variables, images) -> (cls_logits, bbox_pred)`.

  `images` [B,S,S,3] RGB pixel values, uint8 (what the eval pipeline
  yields; float32 pixel values work too), NOT mean-subtracted; S =
  config.input.image_size. Eval mode (BatchNorm uses running statistics).
  Without `mesh` the outputs are placed as XLA sees fit; with it, `images`
  and the outputs are sharded along the batch axis of `mesh` (the
  variables replicated), so that each host can read the rows of its own
  images.

  `platform`: where the step runs (default: the platform of `mesh`'s
  devices, or JAX's default backend without a mesh); `cpu_kernels` as in
  `kernels.step_kernels`. `nms_on_device` (default
  `config.test.nms_on_device`): the step returns `core.detect.Detections` at
  the config's threshold instead of the raw outputs.
  """
  if platform is None and mesh is not None:
    platform = sharding.mesh_platform(mesh)
  if nms_on_device is None:
    nms_on_device = bool(config.test.get('nms_on_device', False))
  choice = kernels.step_kernels(platform, cpu_kernels)
  if nms_on_device:
    fn = functools.partial(
        pixels_to_detections(model_def, config),
        confidence_threshold=float(config.test.confidence_threshold))
  else:
    fn = pixels_to_outputs(model_def, config)
  if mesh is None:
    return choice.jit(fn)
  batch = sharding.batch_sharding(mesh)
  return choice.jit(fn, in_shardings=(sharding.replicated_sharding(mesh), batch),
                    out_shardings=batch)
