"""The train state and the jit-compiled train step.

No TensorFlow here: this module runs on machines that have only JAX.

The train step is a pure function of (state, batch): it merges the model's
graph definition with the state's arrays, runs forward, on-device matching,
the MultiBox loss, backward and the optimizer update, and is jit-compiled
with the batch sharded over the mesh and the state replicated and donated.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssd_jax.core import losses
from ssd_jax.core import priors as priors_lib
from ssd_jax.core import targets
from ssd_jax.runtime import kernels
from ssd_jax.runtime import predict
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib


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

  @property
  def variables(self):
    """The model's variables (what the predict step takes)."""
    return variables_lib.ModelVariables(params=self.params,
                                        model_state=self.model_state)


def create_train_state(model, tx, mesh):
  """Splits `model`, initialises the optimizer, replicates over `mesh`.

  Returns (ModelDef, TrainState).
  """
  model_def, params, model_state = variables_lib.split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=tx.init(params))
  return model_def, jax.device_put(state, sharding.replicated_sharding(mesh))


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
  images = predict.normalize_images(batch['image'], config.input.pixel_mean)
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
  holds global arrays sharded along the batch axis (see
  `sharding.global_batch`). Metrics (losses, number of positive priors,
  gradient norm) are replicated scalars; reading them is the only host sync.

  `cpu_kernels`: None uses the CPU-only kernels and compiler options exactly
  when `mesh`'s devices are CPUs, so a GPU/TPU step is plain XLA; True /
  False forces the choice (tests, benchmarks). See `runtime.kernels`.
  """
  if priors is None:
    priors = priors_lib.generate_priors(config)
  priors = jnp.asarray(priors)

  def train_step(state, batch):
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

  choice = kernels.step_kernels(sharding.mesh_platform(mesh), cpu_kernels)
  replicated = sharding.replicated_sharding(mesh)
  return choice.jit(train_step, donate_argnums=0,
                    in_shardings=(replicated, sharding.batch_sharding(mesh)),
                    out_shardings=(replicated, replicated))


def state_to_checkpoint(state):
  """TrainState -> (model, opt_state) pytrees of arrays for Orbax.

  `model` is the pure dict of all model variables, the layout that
  torch_import writes and eval.py reads.
  """
  return variables_lib.to_pure_dict(state), state.opt_state


def state_from_checkpoint(state, model, opt_state=None, step=None):
  """The inverse of `state_to_checkpoint`, into the structure of `state`.

  `opt_state` None keeps the state's optimizer state (e.g. a checkpoint
  imported from PyTorch has none); `step` None keeps its step.
  """
  params, model_state = variables_lib.from_pure_dict(state, model)
  return state.replace(
      step=state.step if step is None else jnp.asarray(step, jnp.int32),
      params=params, model_state=model_state,
      opt_state=state.opt_state if opt_state is None else opt_state)
