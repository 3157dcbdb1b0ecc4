"""The training loop: the reference's log, checkpoints, resume, periodic eval.

`train_and_evaluate(config, workdir)` is what `train.py` calls. The workdir:
    W/config.json, W/log.txt, W/checkpoints/<step>/, W/tf_logs/ (TensorBoard),
    W/eval/<dataset>_<step>.json (+ <dataset>_<step>_bbox.json for COCO)
"""

import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np
from clu import metric_writers

from ssd_jax.training import checkpointing
from ssd_jax.evaluation import evaluate
from ssd_jax.training import metrics_log
from ssd_jax import models
from ssd_jax.training import optim
from ssd_jax.core import priors as priors_lib
from ssd_jax.interop import torch_import
from ssd_jax.training import train_lib

LOGGER_NAME = 'SSD.trainer'
DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'ssd_jax')


# Config fields that change the data stream or the optimizer: a run resumed
# with other values would not continue the saved one.
RESUME_FIELDS = ('seed', 'solver', 'data.train', 'data.class_names',
                 'data.max_boxes', 'data.synthetic_shapes', 'input', 'model')
# ... except these: extending a run, or where the weights came from.
RESUME_FIELDS_FREE = ('solver.max_iter', 'model.backbone.pretrained',
                      'model.backbone.pretrained_sha256')


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN or Inf."""


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


class PretrainedFileError(ValueError):
  """A pretrained-weights file is empty, truncated or has the wrong hash."""


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _check_file(path, sha256, expected_size=None):
  """Raises PretrainedFileError if `path` is empty or not the expected file."""
  size = os.path.getsize(path)
  if size == 0 or (expected_size is not None and size != expected_size):
    raise PretrainedFileError(
        f'{path} has {size} bytes'
        + (f', the server announced {expected_size}' if expected_size else '')
        + ': the file is incomplete.')
  if sha256 and _sha256(path) != sha256.lower():
    raise PretrainedFileError(
        f'{path} has sha256 {_sha256(path)}, but '
        f'model.backbone.pretrained_sha256 is {sha256}: another file, or a '
        'damaged one.')


def pretrained_path(pretrained, cache_dir=None, sha256=''):
  """A local path for `model.backbone.pretrained` (downloads a URL once).

  Safe with several processes or hosts sharing the cache: each downloads into
  its own temporary file and renames it into place when complete (atomic on
  one filesystem), so no one reads a half-written file. A cached or
  downloaded file must be non-empty, have the size the server announced and,
  when `sha256` (hex) is given, that hash; a cached file that fails the check
  is downloaded again.
  """
  if '://' not in pretrained:
    if not os.path.exists(pretrained):
      raise FileNotFoundError(
          f'model.backbone.pretrained: {pretrained} does not exist. Point '
          "it at the backbone's ImageNet weights (vgg16_reducedfc.pth for "
          'VGG), or set --config.model.backbone.'
          "pretrained='' to start from random weights.")
    _check_file(pretrained, sha256)
    return pretrained
  cache_dir = cache_dir or os.environ.get('SSD_JAX_CACHE', DEFAULT_CACHE)
  path = os.path.join(cache_dir, os.path.basename(pretrained))
  if os.path.exists(path):
    try:
      _check_file(path, sha256)
      return path
    except PretrainedFileError:
      pass  # downloaded again below
  os.makedirs(cache_dir, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=cache_dir,
                                   prefix=os.path.basename(path) + '.',
                                   suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      try:
        with urllib.request.urlopen(pretrained, timeout=60) as response:
          length = response.headers.get('Content-Length')
          shutil.copyfileobj(response, f, 1 << 20)
      except OSError as e:
        raise FileNotFoundError(
            f'Could not download the pretrained backbone {pretrained} ({e}). '
            f'Download it where you have internet and put it at {path} (or '
            'set $SSD_JAX_CACHE), pass --config.model.backbone.pretrained='
            "/path/to/the_file.pth, or use --config.model.backbone."
            "pretrained='' for random initialisation.") from e
    try:
      _check_file(temporary, sha256, int(length) if length else None)
    except PretrainedFileError as e:
      raise PretrainedFileError(
          f'Downloading {pretrained}: {e} Try again, or download it by hand '
          f'to {path}.') from e
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return path


def _prefetch(iterator, mesh, size):
  """Yields global device batches, converting `size` batches ahead in a thread.

  Also yields the seconds the consumer waited for each batch.
  """
  buffer = queue.Queue(maxsize=max(size, 1))
  done = object()

  def producer():
    try:
      for batch in iterator:
        buffer.put(train_lib.global_batch(batch, mesh))
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


def _peak_memory_mib():
  stats = jax.local_devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return round(stats['peak_bytes_in_use'] / 1024 / 1024)


def prepare_data(config, logger):
  """Generates the synthetic shapes dataset first where the config asks for it."""
  shapes_args = config.data.get('synthetic_shapes')
  if not shapes_args:
    return
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    logger.info('Shapes dataset in %s (generated on first use)',
                config.data.voc_root)
    shapes.ensure_dataset(config.data.voc_root, **shapes_args.to_dict())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('shapes dataset ready')


def train_and_evaluate(config, workdir, allow_config_change=False):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Resuming with a config that changes the data stream or the optimizer
  raises ConfigChangedError unless `allow_config_change`.

  Returns the final TrainState.
  """
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  is_main = jax.process_index() == 0
  logger = metrics_log.setup_logger(LOGGER_NAME, workdir, write_file=is_main)
  models.validate_config(config)
  logger.info('Running with config:\n%s', config)
  checkpointer = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  latest = checkpointer.latest_step()
  # A checkpoint without optimizer state (imported) starts a fine-tuning run.
  if latest is not None and checkpointer.has_opt_state(latest):
    check_resume_config(config, workdir, allow_config_change, logger)
  prepare_data(config, logger)

  mesh = train_lib.create_mesh()
  logger.info('Devices: %d x %s on %d host(s)', jax.device_count(),
              jax.devices()[0].device_kind, jax.process_count())
  check_batch_size(config.solver.batch_size, jax.device_count())
  model = models.create_model(config)
  if latest is None and config.model.backbone.pretrained:
    path = pretrained_path(config.model.backbone.pretrained,
                           sha256=config.model.backbone.get(
                               'pretrained_sha256', ''))
    logger.info('Loading pretrained backbone from %s', path)
    taken = torch_import.load_pretrained_backbone(model, path, config)
    logger.info('Pretrained backbone: %d arrays loaded', len(taken))
  tx = optim.create_optimizer(config)
  model_def, state = train_lib.create_train_state(model, tx, mesh)
  del model

  if latest is None:
    logger.info('No checkpoint found.')
  else:
    logger.info('Loading checkpoint from %s',
                os.path.join(checkpointer.directory, str(latest)))
    model_tree, opt_state = train_lib.state_to_checkpoint(state)
    has_opt_state = checkpointer.has_opt_state(latest)
    restored = checkpointer.restore(latest, model_tree,
                                    opt_state if has_opt_state else None)
    state = train_lib.state_from_checkpoint(
        state, restored['model'], restored.get('opt_state'), step=latest)
    if not has_opt_state:
      logger.info('The checkpoint has no optimizer state (a model imported '
                  'with ssd_jax.interop.torch_import?): fine-tuning with a fresh one, '
                  'learning-rate schedule at iteration %d', latest)
      state = state.replace(
          opt_state=optim.with_schedule_at(state.opt_state, latest))
  # Every dataset opened and indexed before the first step (after the
  # checkpoint, whose mismatch is the more basic error).
  _log_datasets(logger, pipeline.check_datasets(config))
  # Written once the checkpoint is known to fit, so that a run with the wrong
  # config leaves the workdir's config.json as it was.
  if is_main:
    checkpointing.save_config(workdir, config)
  start_step = int(state.step)

  priors = priors_lib.generate_priors(config)
  train_step = train_lib.make_train_step(config, model_def, tx, mesh, priors)
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tf_logs'), just_logging=not is_main)
  evaluator = evaluate.Evaluator(config, workdir, model_def, mesh, priors,
                                 writer, logger)
  max_iter = config.solver.max_iter
  train_iter = pipeline.create_train_iterator(config, start_step=start_step)
  batches = _prefetch(train_iter, mesh, config.data.prefetch)

  def save(step):
    model_tree, opt_state = train_lib.state_to_checkpoint(state)
    logger.info('Saving checkpoint to %s',
                os.path.join(checkpointer.directory, str(step)))
    checkpointer.save(step, model_tree, opt_state,
                      meta={'seed': config.seed,
                            'batch_size': config.solver.batch_size,
                            'examples_seen': step * config.solver.batch_size})

  meters = metrics_log.MetricLogger(window=config.log_step)
  pending = []  # (iteration, device metrics) not yet read back
  wait_time = 0.0
  logger.info('Start training from iteration %d', start_step)
  train_start = last_time = time.time()
  step = start_step
  try:
    for step in range(start_step + 1, max_iter + 1):
      batch, waited = next(batches)
      wait_time += waited
      state, metrics = train_step(state, batch)
      pending.append((step, metrics))
      is_save = step % config.save_step == 0 or step == max_iter
      if step % config.log_step == 0 or is_save:
        values = _read_checked(pending, checkpointer)
        now = time.time()
        per_iter = (now - last_time) / len(pending)
        last_time = now
        for it, v in values:
          meters.update(total_loss=v['total_loss'], reg_loss=v['reg_loss'],
                        cls_loss=v['cls_loss'], time=per_iter)
        pending = []
        if step % config.log_step == 0:
          _log(logger, writer, config, step, values[-1][1], meters, max_iter,
               wait_time / max(now - train_start, 1e-9),
               train_iter.stats.counts)
      if is_save:
        save(step)
      if (config.eval_step > 0 and step % config.eval_step == 0 and
          step != max_iter):
        evaluator(state, step)
  finally:
    checkpointer.wait()
  total = time.time() - train_start
  done = max(step - start_step, 1)
  logger.info('Total training time: %s (%.4f s / it)',
              metrics_log.format_duration(total), total / done)
  logger.info('Waiting for data: %.1f%% of the training time',
              100 * wait_time / max(total, 1e-9))
  logger.info('Input pipeline: %s', train_iter.stats.summary())
  evaluator(state, step)
  checkpointer.close()
  writer.close()
  return state


def _read_checked(pending, checkpointer):
  """Fetches pending metrics; raises NonFiniteLossError naming the iteration."""
  values = jax.device_get([(it, m) for it, m in pending])
  for iteration, v in values:
    if not (np.isfinite(v['total_loss']) and np.isfinite(v['grad_norm'])):
      latest = checkpointer.latest_step()
      kept = (f'the last checkpoint (iteration {latest}) is intact'
              if latest is not None else 'no checkpoint was written yet')
      raise NonFiniteLossError(
          f'Loss is {v["total_loss"]} (gradient norm {v["grad_norm"]}) at '
          f'iteration {iteration}: stopping; {kept}. Lower solver.lr or check '
          'the data.')
  return values


def _log(logger, writer, config, step, current, meters, max_iter,
         data_wait_fraction, data_counts):
  """The reference's log line (+ skipped/fixed examples when non-zero)."""
  lr = optim.learning_rate(config, step)
  eta = meters.meters['time'].global_avg * (max_iter - step)
  line = metrics_log.log_line(step, lr, meters, eta, _peak_memory_mib())
  skipped, fixed = data_counts.num_skipped, data_counts.num_fixed
  if skipped or fixed:
    line += f', data: {skipped} skipped, {fixed} fixed'
  logger.info(line)
  writer.write_scalars(step, {
      'losses/total_loss': current['total_loss'],
      'losses/reg_loss': current['reg_loss'],
      'losses/cls_loss': current['cls_loss'],
      'lr': lr,
      'perf/data_wait_fraction': data_wait_fraction,
      'data/skipped_examples': skipped,
      'data/fixed_annotations': fixed,
  })


def _log_datasets(logger, counts):
  for name, dataset_counts in counts.items():
    logger.info('Dataset %s: %s', name, dataset_counts.summary())


def check_batch_size(batch_size, num_devices):
  """Raises ValueError unless the global batch splits evenly over devices."""
  if batch_size % num_devices:
    lower = batch_size // num_devices * num_devices
    raise ValueError(
        f'solver.batch_size={batch_size} does not split over the '
        f'{num_devices} devices: use a multiple of {num_devices}, e.g. '
        f'--config.solver.batch_size={max(lower, num_devices)}.')


def evaluate_workdir(config, workdir, step=None):
  """Restores a checkpoint of `workdir` and evaluates it (eval.py).

  Returns {dataset name: evaluate() result}.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  logger = metrics_log.setup_logger('SSD.inference', write_file=False)
  prepare_data(config, logger)
  checkpointer = checkpointing.Checkpointer(workdir)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
  model = nnx.eval_shape(lambda: models.create_model(config))
  step = checkpointing.restore_model(checkpointer, model, step)
  logger.info('Loaded checkpoint %s', os.path.join(checkpointer.directory,
                                                   str(step)))
  _log_datasets(logger, pipeline.check_datasets(config, config.data.test))
  mesh = train_lib.create_mesh()
  model_def, params, model_state = train_lib.split_model(model)
  # Through the host: every process holds the same values, which is what
  # placing them on a mesh over several processes needs.
  params, model_state = jax.device_get((params, model_state))
  state = jax.device_put(
      train_lib.TrainState(step=np.int32(step), params=params,
                           model_state=model_state, opt_state=None),
      train_lib.replicated_sharding(mesh))
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tf_logs'), just_logging=jax.process_index() > 0)
  evaluator = evaluate.Evaluator(config, workdir, model_def, mesh,
                                 priors_lib.generate_priors(config), writer,
                                 logger)
  results = evaluator(state, step)
  writer.close()
  checkpointer.close()
  return results
