"""Train state, the jit-compiled train step and the predict step.

No TensorFlow here: this module runs on machines that have only JAX.

The model is split once into a static graph definition and array state
(`nnx.split`); the train step is a pure function of (state, batch) that merges
them back, so it can be jit-compiled with shardings and the state donated.
Data parallelism: a 1-D mesh over all devices ('data'), the batch sharded
along its first axis, the train state replicated.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssd_jax.core import losses
from ssd_jax.core import priors as priors_lib
from ssd_jax.core import targets
from ssd_jax.models import layers

DATA_AXIS = 'data'

# XLA:CPU hands convolutions and dots to YNNPACK by default. For SSD's
# convolutions, forward + backward takes 1.15-3.2x as long per layer there as
# with XLA's Eigen kernels (1.6x in sum) on the 2-core machines we measured
# (bench/conv_layers.py, BENCHMARKS.md), so compiled steps turn it off on CPU.
_CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def compiler_options(platform=None):
  """XLA options for the compiled steps on `platform` (None = defaults).

  `platform` defaults to JAX's default backend. On 'cpu': YNNPACK off, if
  this jaxlib knows the option (checked once by compiling a trivial
  function; an unknown option is left out). Other platforms ('gpu', 'tpu',
  ...) compile with XLA's defaults.
  """
  if (platform or jax.default_backend()) != 'cpu':
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(
        jax.device_put(jnp.zeros(()), jax.devices('cpu')[0])).compile()
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  return dict(_CPU_COMPILER_OPTIONS)


def mesh_platform(mesh):
  """The platform ('cpu', 'gpu', 'tpu') of `mesh`'s devices (one kind)."""
  platforms = {device.platform for device in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f'a mesh mixes device platforms {sorted(platforms)}; '
                     'build it from devices of one kind')
  return platforms.pop()


def _resolve_cpu_kernels(cpu_kernels, platform):
  """`cpu_kernels` if given, else on exactly when the step runs on CPU."""
  return platform == 'cpu' if cpu_kernels is None else bool(cpu_kernels)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  step: int32 scalar, optimizer updates done so far.
  params: nnx.State of the model's nnx.Param variables.
  model_state: nnx.State of the other variables (BatchNorm statistics).
  opt_state: the optax state of `params`.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static halves of the model: graph definitions for training and eval."""
  train: Any
  eval: Any


def create_mesh(devices=None):
  """1-D data-parallel mesh over `devices` (default: all, every host)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA_AXIS,))


def batch_sharding(mesh):
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh):
  return NamedSharding(mesh, PartitionSpec())


def split_model(model):
  """-> (ModelDef, params, model_state) of an NNX SSD in training mode."""
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  model.train()
  train_def, params, model_state = nnx.split(model, nnx.Param, ...)
  return ModelDef(train=train_def, eval=eval_def), params, model_state


def create_train_state(model, tx, mesh):
  """Splits `model`, initialises the optimizer, replicates over `mesh`."""
  model_def, params, model_state = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=tx.init(params))
  return model_def, jax.device_put(state, replicated_sharding(mesh))


def global_batch(batch, mesh):
  """Host-local numpy batch -> global jax arrays sharded along axis 0.

  Each host passes its own slice (batch_size / process_count images); on one
  host this is a plain device_put with the batch sharding.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def normalize_images(images, pixel_mean):
  """Pixel values [B,S,S,3] RGB (uint8, or float) -> float32 minus the mean.

  The model's input: what the reference's SubtractMeans + ToTensor give.
  Done on the device, so that images cross to it as uint8.
  """
  return images.astype(jnp.float32) - jnp.asarray(pixel_mean, jnp.float32)


def loss_and_targets(model, batch, priors, config, rngs=None):
  """Forward, on-device matching and MultiBox loss for one train batch.

  Args:
    model: an NNX SSD.
    batch: dict with 'image' [B,S,S,3] RGB pixel values (uint8, or float),
      not mean-subtracted (config.input.pixel_mean is subtracted here),
      'boxes' [B,M,4] corner form in [0,1], 'labels' [B,M] int, 'mask'
      [B,M] bool.
    priors: [P,4] center-form priors.
    config: the experiment config.
    rngs: an RngStream for the model's stochastic layers (drop-connect),
      or None.

  Returns:
    (total_loss, {'reg_loss', 'cls_loss', 'total_loss', 'num_positives'}).
  """
  m = config.model
  images = normalize_images(batch['image'], config.input.pixel_mean)
  cls_logits, bbox_pred = model(images, rngs=rngs)
  loc_targets, cls_targets = targets.encode_targets(
      batch['boxes'], batch['labels'], batch['mask'], priors,
      iou_threshold=m.threshold, center_variance=m.center_variance,
      size_variance=m.size_variance)
  reg_loss, cls_loss = losses.multibox_loss(
      cls_logits, bbox_pred, cls_targets, loc_targets,
      neg_pos_ratio=m.neg_pos_ratio)
  total = reg_loss + cls_loss
  return total, {'reg_loss': reg_loss, 'cls_loss': cls_loss,
                 'total_loss': total,
                 'num_positives': jnp.sum(cls_targets > 0)}


def make_train_step(config, model_def, tx, mesh, priors=None,
                    cpu_kernels=None):
  """The jit-compiled `train_step(state, batch) -> (state, metrics)`.

  The state is donated (its buffers are reused for the new state). `batch`
  holds global arrays sharded along the batch axis (see `global_batch`).
  Metrics (losses, number of positive priors, gradient norm) are replicated
  scalars; reading them is the only host sync.

  `cpu_kernels` (see `layers.cpu_kernels`): None uses the CPU-only kernels
  and compiler options exactly when `mesh`'s devices are CPUs, so a GPU/TPU
  step is plain XLA; True / False forces the choice (tests, benchmarks).
  """
  if priors is None:
    priors = priors_lib.generate_priors(config)
  priors = jnp.asarray(priors)
  platform = mesh_platform(mesh)
  use_cpu_kernels = _resolve_cpu_kernels(cpu_kernels, platform)

  def train_step(state, batch):
    with layers.cpu_kernels(use_cpu_kernels):
      return _train_step(state, batch)

  def _train_step(state, batch):
    # Stochastic layers (EfficientNet's drop-connect) draw from a key that is
    # a function of (seed, step) alone, so a resumed run draws the same.
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
      model = nnx.merge(model_def.train, params, state.model_state, copy=True)
      # Built inside the differentiated function: an RngStream's counter
      # must be mutated at the trace level that created it.
      rngs = nnx.Rngs(dropout=dropout_key).dropout
      total, metrics = loss_and_targets(model, batch, priors, config, rngs)
      return total, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
        state.params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  replicated = replicated_sharding(mesh)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(replicated, batch_sharding(mesh)),
                 out_shardings=(replicated, replicated),
                 compiler_options=compiler_options(platform))


def predict(model_def, state, images):
  """The eval-mode forward pass: images -> (cls_logits, bbox_pred).

  Pure and not compiled, for callers that compose it into their own jitted
  or exported function (inference.py, export.py); `make_predict_step` is
  its compiled form. `images` float [B,S,S,3], mean-subtracted; outputs are
  float32, [B,P,C] raw logits and [B,P,4] encoded boxes. The CPU kernels
  follow `layers.cpu_kernels` where the caller traces it.
  """
  model = nnx.merge(model_def.eval, state.params, state.model_state)
  cls_logits, bbox_pred = model(images)
  return cls_logits.astype(jnp.float32), bbox_pred.astype(jnp.float32)


def make_predict_step(config, model_def, mesh=None, *, platform=None,
                      cpu_kernels=None):
  """The jit-compiled `predict_step(state, images) -> (cls_logits, bbox_pred)`.

  Input contract: `images` [B,S,S,3] RGB pixel values, uint8 (what the eval
  pipeline yields; float32 pixel values work too), NOT mean-subtracted:
  the step subtracts config.input.pixel_mean on the device
  (`normalize_images`). S = config.input.image_size.

  Eval mode (BatchNorm uses running statistics); outputs are float32,
  [B,P,C] raw logits and [B,P,4] encoded boxes. Without `mesh` the outputs
  are placed as XLA sees fit; with it, `images` and the outputs are sharded
  along the batch axis of `mesh` (the state replicated), so that each host
  can read the rows of its own images.

  `platform`: where the step runs (default: the platform of `mesh`'s
  devices, or JAX's default backend without a mesh); `cpu_kernels` as in
  `make_train_step` (None: on exactly on CPU).
  """
  if platform is None:
    platform = (mesh_platform(mesh) if mesh is not None
                else jax.default_backend())
  use_cpu_kernels = _resolve_cpu_kernels(cpu_kernels, platform)
  pixel_mean = tuple(float(v) for v in config.input.pixel_mean)

  def predict_step(state, images):
    with layers.cpu_kernels(use_cpu_kernels):
      return predict(model_def, state, normalize_images(images, pixel_mean))

  if mesh is None:
    return jax.jit(predict_step, compiler_options=compiler_options(platform))
  batch = batch_sharding(mesh)
  return jax.jit(predict_step,
                 in_shardings=(replicated_sharding(mesh), batch),
                 out_shardings=(batch, batch),
                 compiler_options=compiler_options(platform))


def state_to_checkpoint(state):
  """TrainState -> (model, opt_state) pytrees of arrays for Orbax.

  `model` is the pure dict of all model variables, the layout that
  torch_import writes and eval.py reads.
  """
  model = nnx.to_pure_dict(nnx.merge_state(state.params, state.model_state))
  return model, state.opt_state


def state_from_checkpoint(state, model, opt_state=None, step=None):
  """The inverse of `state_to_checkpoint`, into the structure of `state`.

  `opt_state` None keeps the state's optimizer state (e.g. a checkpoint
  imported from PyTorch has none); `step` None keeps its step.
  """
  variables = nnx.merge_state(state.params, state.model_state)
  nnx.replace_by_pure_dict(variables, model)
  params, model_state = nnx.split_state(variables, nnx.Param, ...)
  return state.replace(
      step=state.step if step is None else jnp.asarray(step, jnp.int32),
      params=params, model_state=model_state,
      opt_state=state.opt_state if opt_state is None else opt_state)
