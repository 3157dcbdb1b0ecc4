"""Starting or resuming a run: the config check, a fresh or restored state.

A workdir's latest checkpoint continues its run (same data stream, same
optimizer); a checkpoint without optimizer state (as interop.torch_import
writes) starts a fine-tuning run from its weights; without a checkpoint the
model starts from its initialisation and the pretrained backbone.
"""

import os

from ssd_jax import models
from ssd_jax.interop import torch_import
from ssd_jax.training import checkpointing
from ssd_jax.training import download
from ssd_jax.training import optim
from ssd_jax.training import train_step as train_step_lib

# Config fields that change the data stream or the optimizer: a run resumed
# with other values would not continue the saved one.
RESUME_FIELDS = ('seed', 'solver', 'data.train', 'data.class_names',
                 'data.max_boxes', 'data.synthetic_shapes', 'input', 'model')
# ... except these: extending a run, or where the weights came from.
RESUME_FIELDS_FREE = ('solver.max_iter', 'model.backbone.pretrained',
                      'model.backbone.pretrained_sha256',
                      # Retired (never read): workdirs saved before keep it.
                      'model.meta_architecture')


class ConfigChangedError(ValueError):
  """Resuming a workdir with a config that would not continue its run."""


def check_resume_config(config, workdir, allow_change, logger):
  """Raises ConfigChangedError if `config` does not continue W's saved run.

  Only the RESUME_FIELDS count; with `allow_change` the differences are
  logged instead.
  """
  try:
    saved = checkpointing.load_config(workdir)
  except FileNotFoundError:
    return
  changes = checkpointing.config_changes(saved, config, RESUME_FIELDS,
                                         RESUME_FIELDS_FREE)
  if not changes:
    return
  listing = '\n  '.join(changes)
  if allow_change:
    logger.warning('Resuming with a changed config (--allow_config_change):'
                   '\n  %s', listing)
    return
  raise ConfigChangedError(
      f'{workdir} holds a run with another config; resuming it with this one '
      'would change the data stream or the optimizer:\n  ' + listing +
      '\nUse the saved values, another --workdir, or pass '
      '--allow_config_change to resume anyway.')


def check_batch_size(batch_size, num_devices):
  """Raises ValueError unless the global batch splits evenly over devices."""
  if batch_size % num_devices:
    lower = batch_size // num_devices * num_devices
    raise ValueError(
        f'solver.batch_size={batch_size} does not split over the '
        f'{num_devices} devices: use a multiple of {num_devices}, e.g. '
        f'--config.solver.batch_size={max(lower, num_devices)}.')


def initial_model(config, logger):
  """The model at initialisation, with the pretrained backbone if any."""
  model = models.create_model(config)
  if config.model.backbone.pretrained:
    path = download.pretrained_path(
        config.model.backbone.pretrained,
        sha256=config.model.backbone.get('pretrained_sha256', ''))
    logger.info('Loading pretrained backbone from %s', path)
    taken = torch_import.load_pretrained_backbone(model, path, config)
    logger.info('Pretrained backbone: %d arrays loaded', len(taken))
  return model


def restore_checkpoint(state, checkpointer, step, logger):
  """`state` with checkpoint `step` of `checkpointer` restored into it.

  A checkpoint without optimizer state keeps `state`'s fresh optimizer state
  with its learning-rate schedule moved to `step` (fine-tuning).
  """
  logger.info('Loading checkpoint from %s',
              os.path.join(checkpointer.directory, str(step)))
  model_tree, opt_state = train_step_lib.state_to_checkpoint(state)
  has_opt_state = checkpointer.has_opt_state(step)
  restored = checkpointer.restore(step, model_tree,
                                  opt_state if has_opt_state else None)
  state = train_step_lib.state_from_checkpoint(
      state, restored['model'], restored.get('opt_state'), step=step)
  if not has_opt_state:
    logger.info('The checkpoint has no optimizer state (a model imported '
                'with ssd_jax.interop.torch_import?): fine-tuning with a '
                'fresh one, learning-rate schedule at iteration %d', step)
    state = state.replace(
        opt_state=optim.with_schedule_at(state.opt_state, step))
  return state


def check_resumable(config, workdir, checkpointer, logger,
                    allow_config_change=False):
  """Raises ConfigChangedError when the latest checkpoint (with optimizer
  state) was written by a run that `config` would not continue, unless
  `allow_config_change`. An imported checkpoint (no optimizer state) starts
  a fine-tuning run and is not checked."""
  latest = checkpointer.latest_step()
  if latest is not None and checkpointer.has_opt_state(latest):
    check_resume_config(config, workdir, allow_config_change, logger)


def restore_or_init(config, mesh, checkpointer, logger):
  """The run's starting point: -> (ModelDef, optax transform, TrainState).

  The latest checkpoint of `checkpointer` if there is one, else the
  initial model (with its pretrained backbone) and a fresh optimizer.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    model = initial_model(config, logger)
  else:
    model = models.create_model(config)  # the checkpoint replaces its values
  tx = optim.create_optimizer(config)
  model_def, state = train_step_lib.create_train_state(model, tx, mesh)
  if latest is None:
    logger.info('No checkpoint found.')
  else:
    state = restore_checkpoint(state, checkpointer, latest, logger)
  return model_def, tx, state
