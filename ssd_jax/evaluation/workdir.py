"""Evaluating a workdir's checkpoint: what eval.py runs."""

import os

import jax
from flax import nnx

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.data import prepare
from ssd_jax.evaluation import evaluator as evaluator_lib
from ssd_jax.runtime import sharding
from ssd_jax.runtime import variables as variables_lib
from ssd_jax.training import checkpointing
from ssd_jax.training import metrics_log
from ssd_jax.training import writers


LOGGER_NAME = 'SSD.eval'


def evaluate_workdir(config, workdir, step=None):
  """Restores a checkpoint of `workdir` (latest, or `step`) and evaluates it
  on every dataset of config.data.test.

  The latest checkpoint is the newest intact one: damaged newer ones are
  skipped with a warning (and left where they are).

  Returns {dataset name: evaluate() result}.

  Raises:
    checkpointing.CheckpointDamagedError: the requested `step` is damaged,
      or no checkpoint is intact.
  """
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  logger = metrics_log.setup_logger(LOGGER_NAME, write_file=False)
  prepare.prepare_data(config, logger)
  checkpointer = checkpointing.Checkpointer(workdir)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
  if step is None:
    step = checkpointer.latest_intact_step(logger)
  else:
    checkpointer.check_intact(step)
  model = nnx.eval_shape(lambda: models.create_model(config))
  step = checkpointing.restore_model(checkpointer, model, step)
  logger.info('Loaded checkpoint %s', os.path.join(checkpointer.directory,
                                                   str(step)))
  for name, counts in pipeline.check_datasets(config, config.data.test).items():
    logger.info('Dataset %s: %s', name, counts.summary())
  mesh = sharding.create_mesh()
  model_def, variables = variables_lib.model_variables(model)
  variables = sharding.replicate(variables, mesh)
  writer = writers.create_writer(os.path.join(workdir, 'tf_logs'),
                                 just_logging=jax.process_index() > 0)
  evaluator = evaluator_lib.Evaluator(config, workdir, model_def, mesh,
                                 priors_lib.generate_priors(config), writer,
                                 logger)
  results = evaluator(variables, step)
  writer.close()
  checkpointer.close()
  return results
