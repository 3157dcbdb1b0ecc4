"""The training loop: the reference's log, checkpoints, resume, periodic eval.

`train_and_evaluate(config, workdir)` is what `train.py` calls. The workdir:
    W/config.json, W/log.txt, W/checkpoints/<step>/, W/tf_logs/ (TensorBoard),
    W/eval/<dataset>_<step>.json (+ <dataset>_<step>_bbox.json for COCO)

SIGTERM or SIGINT stops the run after the step in flight, with a checkpoint
of that step (see preemption); rerunning the same command resumes it.
"""

import os
import queue
import threading
import time

import jax
import numpy as np

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.data import prepare
from ssd_jax.evaluation import evaluator as evaluator_lib
from ssd_jax.runtime import sharding
from ssd_jax.training import checkpointing
from ssd_jax.training import metrics_log
from ssd_jax.training import optim
from ssd_jax.training import preemption
from ssd_jax.training import resume
from ssd_jax.training import train_step as train_step_lib
from ssd_jax.training import writers

LOGGER_NAME = 'SSD.trainer'


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN or Inf."""


def train_and_evaluate(config, workdir, allow_config_change=False):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Resuming with a config that changes the data stream or the optimizer
  raises resume.ConfigChangedError unless `allow_config_change`. A damaged
  latest checkpoint is moved aside and the newest intact one resumed
  (checkpointing.CheckpointDamagedError if none is intact).

  Returns the final TrainState.

  Raises:
    preemption.Preempted: SIGTERM or SIGINT arrived; the step in flight was
      finished and saved (committed), and 'preempted at iteration N:
      checkpoint saved' logged. train.py exits with
      preemption.PREEMPTED_EXIT_CODE.
    checkpointing.CheckpointSaveError: a checkpoint could not be written.
  """
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  is_main = jax.process_index() == 0
  logger = metrics_log.setup_logger(LOGGER_NAME, workdir, write_file=is_main)
  models.validate_config(config)
  logger.info('Running with config:\n%s', config)
  checkpointer = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  checkpointer.latest_intact_step(logger, move_damaged=True)
  resume.check_resumable(config, workdir, checkpointer, logger,
                         allow_config_change)
  prepare.prepare_data(config, logger)
  mesh = sharding.create_mesh()
  logger.info('Devices: %d x %s on %d host(s)', jax.device_count(),
              jax.devices()[0].device_kind, jax.process_count())
  resume.check_batch_size(config.solver.batch_size, jax.device_count())
  model_def, tx, state = resume.restore_or_init(config, mesh, checkpointer,
                                                logger)
  # Every dataset opened and indexed before the first step (after the
  # checkpoint, whose mismatch is the more basic error).
  log_datasets(logger, pipeline.check_datasets(config))
  # Written once the checkpoint is known to fit, so that a run with the wrong
  # config leaves the workdir's config.json as it was.
  if is_main:
    checkpointing.save_config(workdir, config)

  priors = priors_lib.generate_priors(config)
  train_step = train_step_lib.make_train_step(config, model_def, tx, mesh,
                                              priors)
  writer = writers.create_writer(os.path.join(workdir, 'tf_logs'),
                                 just_logging=not is_main)
  evaluator = evaluator_lib.Evaluator(config, workdir, model_def, mesh, priors,
                                 writer, logger)
  start_step = int(state.step)
  train_iter = pipeline.create_train_iterator(config, start_step=start_step)
  batches = prefetch(train_iter, mesh, config.data.prefetch)
  progress = Progress(config, logger, writer, checkpointer,
                      train_iter.stats.counts)
  max_iter = config.solver.max_iter
  if missed_evaluation(config, workdir, start_step):
    logger.info('Evaluating iteration %d, whose evaluation the stopped run '
                'did not reach', start_step)
    evaluator(state.variables, start_step)
  logger.info('Start training from iteration %d', start_step)
  step = start_step
  try:
    with preemption.StopRequests() as stop:
      for step in range(start_step + 1, max_iter + 1):
        batch, waited = next(batches)
        state, metrics = train_step(state, batch)
        progress.add(step, metrics, waited)
        is_save = step % config.save_step == 0 or step == max_iter
        is_read = step % config.log_step == 0 or is_save
        if is_read:
          progress.read(step, log=step % config.log_step == 0)
        if is_save:
          save_checkpoint(checkpointer, config, state, step, logger)
        if stop.agreed(sync_point=is_read):
          stop_preempted(checkpointer, config, state, step, progress,
                         is_save, logger, stop.received)
        if (config.eval_step > 0 and step % config.eval_step == 0 and
            step != max_iter):
          evaluator(state.variables, step)
  except BaseException:
    close_after_error(checkpointer, logger)
    raise
  checkpointer.wait()
  progress.summary(step - start_step, train_iter.stats.summary())
  evaluator(state.variables, step)
  checkpointer.close()
  writer.close()
  return state


def missed_evaluation(config, workdir, step):
  """Whether resumed iteration `step` is a periodic evaluation step without
  its evaluation JSONs (a run preempted or killed between its checkpoint
  and its evaluation). The same answer on every host (a shared workdir)."""
  if (config.eval_step <= 0 or step <= 0 or step % config.eval_step or
      step >= config.solver.max_iter):
    return False
  return not all(os.path.exists(os.path.join(workdir, 'eval',
                                             f'{name}_{step}.json'))
                 for name in config.data.test)


def close_after_error(checkpointer, logger):
  """Ends the checkpoint writes in flight on the way out of an exception.

  Closing joins Orbax's writer threads, so that none of them finishes a
  failed save later; a failure of the save in flight is logged, not raised
  over the exception on its way.
  """
  try:
    checkpointer.close()
  except checkpointing.CheckpointSaveError as e:
    logger.error('%s', e)


def save_checkpoint(checkpointer, config, state, step, logger):
  """Saves `state` as checkpoint `step` (asynchronously; see Checkpointer)."""
  model_tree, opt_state = train_step_lib.state_to_checkpoint(state)
  logger.info('Saving checkpoint to %s',
              os.path.join(checkpointer.directory, str(step)))
  checkpointer.save(step, model_tree, opt_state,
                    meta={'seed': config.seed,
                          'batch_size': config.solver.batch_size,
                          'examples_seen': step * config.solver.batch_size})


def stop_preempted(checkpointer, config, state, step, progress, saved,
                   logger, signal_name):
  """Saves `step` (unless `saved` already), waits for the commit, logs the
  one preemption line and raises preemption.Preempted."""
  if progress.pending:
    progress.read(step, log=False)  # the NaN check before a checkpoint
  if not saved:
    save_checkpoint(checkpointer, config, state, step, logger)
  checkpointer.wait()
  logger.info('preempted at iteration %d: checkpoint saved', step)
  raise preemption.Preempted(step, signal_name)


def prefetch(iterator, mesh, size):
  """Yields global device batches, converting `size` batches ahead in a thread.

  Also yields the seconds the consumer waited for each batch.
  """
  buffer = queue.Queue(maxsize=max(size, 1))
  done = object()

  def producer():
    try:
      for batch in iterator:
        buffer.put(sharding.global_batch(batch, mesh))
    except Exception as e:  # pylint: disable=broad-except
      buffer.put(e)
    buffer.put(done)

  threading.Thread(target=producer, daemon=True).start()
  while True:
    start = time.perf_counter()
    item = buffer.get()
    waited = time.perf_counter() - start
    if item is done:
      return
    if isinstance(item, Exception):
      raise item
    yield item, waited


class Progress:
  """The metrics of the steps since the last read, and the log lines.

  The train step's metrics stay on the device until `read` (the only host
  sync of the loop), which checks them for NaN/Inf, feeds the window means
  and writes the reference's log line and the TensorBoard scalars.
  """

  def __init__(self, config, logger, writer, checkpointer=None,
               data_counts=None):
    self.config, self.logger, self.writer = config, logger, writer
    self.checkpointer = checkpointer
    self.data_counts = data_counts
    self.meters = metrics_log.MetricLogger(window=config.log_step)
    self.pending = []  # (iteration, device metrics) not yet read back
    self.wait_time = 0.0
    self.start_time = self.last_time = time.time()

  def add(self, step, metrics, waited):
    self.pending.append((step, metrics))
    self.wait_time += waited

  def read(self, step, log=True):
    """Reads the pending metrics; logs iteration `step` if `log`."""
    values = self._read_checked()
    now = time.time()
    per_iter = (now - self.last_time) / len(values)
    self.last_time = now
    for _, v in values:
      self.meters.update(total_loss=v['total_loss'], reg_loss=v['reg_loss'],
                         cls_loss=v['cls_loss'], time=per_iter)
    self.pending = []
    if log:
      self._log(step, values[-1][1],
                self.wait_time / max(now - self.start_time, 1e-9))

  def summary(self, steps_done, pipeline_summary):
    total = time.time() - self.start_time
    self.logger.info('Total training time: %s (%.4f s / it)',
                     metrics_log.format_duration(total),
                     total / max(steps_done, 1))
    self.logger.info('Waiting for data: %.1f%% of the training time',
                     100 * self.wait_time / max(total, 1e-9))
    self.logger.info('Input pipeline: %s', pipeline_summary)

  def _read_checked(self):
    """Fetches pending metrics; raises NonFiniteLossError naming the step."""
    values = jax.device_get(self.pending)
    for iteration, v in values:
      if not (np.isfinite(v['total_loss']) and np.isfinite(v['grad_norm'])):
        latest = (self.checkpointer.latest_step()
                  if self.checkpointer is not None else None)
        kept = (f'the last checkpoint (iteration {latest}) is intact'
                if latest is not None else 'no checkpoint was written yet')
        raise NonFiniteLossError(
            f'Loss is {v["total_loss"]} (gradient norm {v["grad_norm"]}) at '
            f'iteration {iteration}: stopping; {kept}. Lower solver.lr or '
            'check the data.')
    return values

  def _log(self, step, current, data_wait_fraction):
    """The reference's log line (+ skipped/fixed examples when non-zero)."""
    config = self.config
    lr = optim.learning_rate_at(config, step)
    eta = self.meters.meters['time'].global_avg * (config.solver.max_iter - step)
    line = metrics_log.log_line(step, lr, self.meters, eta, peak_memory_mib())
    counts = self.data_counts
    skipped = counts.num_skipped if counts is not None else 0
    fixed = counts.num_fixed if counts is not None else 0
    if skipped or fixed:
      line += f', data: {skipped} skipped, {fixed} fixed'
    self.logger.info(line)
    self.writer.write_scalars(step, {
        'losses/total_loss': current['total_loss'],
        'losses/reg_loss': current['reg_loss'],
        'losses/cls_loss': current['cls_loss'],
        'lr': lr,
        'perf/data_wait_fraction': data_wait_fraction,
        'data/skipped_examples': skipped,
        'data/fixed_annotations': fixed,
    })


def peak_memory_mib():
  """Peak memory of the first local device in MiB (None where unreported)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return round(stats['peak_bytes_in_use'] / 1024 / 1024)


def log_datasets(logger, counts):
  for name, dataset_counts in counts.items():
    logger.info('Dataset %s: %s', name, dataset_counts.summary())
