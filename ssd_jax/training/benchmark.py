"""train.py --benchmark: the training loop timed on synthetic batches.

The config's real train step (matching, mining, loss, optimizer; sharded
over every device as in training), the trainer's prefetching thread and its
log lines, fed with synthetic batches of the real shapes and dtypes (images
[B, S, S, 3], padded boxes, labels and masks; `synthetic.synthetic_batch`)
instead of a dataset. No dataset, evaluation, checkpoint, TensorFlow or clu
is touched. It reports the steady-state images/s, step-time percentiles,
the compile time and peak device memory (the runtime's peak and the
compiled step's memory analysis), and a fingerprint of the final parameters
and losses, so that two runs can be compared bit for bit
(`config.deterministic`).
"""

import hashlib
import itertools
import time

import jax
import numpy as np
from flax import nnx

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.runtime import sharding
from ssd_jax.training import optim
from ssd_jax.training import resume
from ssd_jax.training import synthetic
from ssd_jax.training import train_step as train_step_lib
from ssd_jax.training import trainer
from ssd_jax.training import writers

# Distinct synthetic batches, cycled (making them is not what is timed).
_POOL = 4


def synthetic_train_batches(config, seed=0):
  """This host's share of every global batch, forever: numpy dicts with the
  train pipeline's keys, shapes and image dtype."""
  local = config.solver.batch_size // jax.process_count()
  dtype = np.dtype(config.input.get('train_image_dtype', 'float32'))
  pool = []
  for k in range(_POOL):
    batch = synthetic.synthetic_batch(
        config, local, seed=seed * 1000 + k * jax.process_count()
        + jax.process_index())
    batch['image'] = batch['image'].astype(dtype)
    pool.append(batch)
  return itertools.cycle(pool)


def _memory_analysis_mib(compiled):
  """The compiled step's memory analysis (MiB), or None where unreported."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  if analysis is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes',
            'alias_size_in_bytes')
  sizes = {f[:-len('_size_in_bytes')]: getattr(analysis, f, None)
           for f in fields}
  if all(v is None for v in sizes.values()):
    return None
  mib = {k: round(v / 2**20, 1) for k, v in sizes.items() if v is not None}
  # Aliased (donated) buffers are counted in the arguments and the outputs.
  mib['total'] = round(sum(v for k, v in mib.items() if k != 'alias')
                       - mib.get('alias', 0), 1)
  return mib


def fingerprint(tree):
  """sha256 of the bytes of every array of `tree`, in leaf order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def benchmark_training(config, *, steps=50, warmup=5, logger=None):
  """Runs `warmup` + `steps` iterations and returns the figures.

  Args:
    config: the experiment config (`solver.batch_size` is the global batch).
    steps: timed iterations, after the warm-up.
    warmup: untimed iterations (the first compiles).
    logger: where the trainer's log lines go (default: a stdout logger).

  Returns:
    A dict: 'images_per_sec' (global batch x timed steps / their wall time),
    'step_ms' {p50, p90, p99, mean} over the timed steps, 'compile_seconds',
    'peak_memory_mib' (the runtime's peak on device 0, None where the
    backend does not report it), 'compiled_memory_mib' (the step's memory
    analysis), 'batch_size', 'dtype', 'devices', 'device', 'losses' (every
    iteration's total loss), 'fingerprint' (the final parameters and the
    losses).
  """
  from ssd_jax.training import metrics_log  # pylint: disable=g-import-not-at-top
  logger = logger or metrics_log.setup_logger('SSD.benchmark')
  models.validate_config(config)
  mesh = sharding.create_mesh()
  resume.check_batch_size(config.solver.batch_size, jax.device_count())
  model = models.create_model(config, nnx.Rngs(config.seed))
  tx = optim.create_optimizer(config)
  model_def, state = train_step_lib.create_train_state(model, tx, mesh)
  del model
  priors = priors_lib.generate_priors(config)
  train_step = train_step_lib.make_train_step(config, model_def, tx, mesh,
                                              priors)
  batches = trainer.prefetch(synthetic_train_batches(config, config.seed),
                             mesh, config.data.get('prefetch', 2))
  first, _ = next(batches)
  start = time.perf_counter()
  compiled = train_step.lower(state, first).compile()
  compile_seconds = time.perf_counter() - start
  progress = trainer.Progress(config, logger, writers.PlainWriter(None))

  loss_refs, completions = [], []
  previous = None
  batch = first
  total = warmup + steps
  logger.info('Benchmark: %d warm-up + %d timed iterations of batch %d on '
              '%d x %s', warmup, steps, config.solver.batch_size,
              jax.device_count(), jax.devices()[0].device_kind)
  for step in range(1, total + 1):
    state, metrics = compiled(state, batch)
    progress.add(step, metrics, 0.0)
    loss_refs.append(metrics['total_loss'])
    # One step in flight: wait for the previous one, so the completion
    # times give the step times without draining the device queue.
    if previous is not None:
      jax.block_until_ready(previous)
      completions.append(time.perf_counter())
    previous = metrics['total_loss']
    if step % config.log_step == 0 or step == total:
      progress.read(step)
    if step < total:
      batch, _ = next(batches)
  jax.block_until_ready(previous)
  completions.append(time.perf_counter())
  losses = [float(v) for v in jax.device_get(loss_refs)]
  timed = np.diff(completions[warmup - 1:]) if warmup >= 1 else np.diff(
      completions)
  images = config.solver.batch_size * len(timed)
  wall = float(completions[-1] - completions[max(warmup - 1, 0)])
  step_ms = 1000 * timed
  figures = {
      'images_per_sec': images / wall if wall > 0 else None,
      'step_ms': {'p50': float(np.percentile(step_ms, 50)),
                  'p90': float(np.percentile(step_ms, 90)),
                  'p99': float(np.percentile(step_ms, 99)),
                  'mean': float(np.mean(step_ms))},
      'compile_seconds': compile_seconds,
      'peak_memory_mib': trainer.peak_memory_mib(),
      'compiled_memory_mib': _memory_analysis_mib(compiled),
      'batch_size': int(config.solver.batch_size),
      'dtype': str(config.model.get('dtype', 'float32')),
      'steps': steps, 'warmup': warmup,
      'devices': jax.device_count(),
      'device': jax.devices()[0].device_kind,
      'losses': losses,
      'fingerprint': fingerprint((state.params, state.model_state,
                                  np.asarray(losses, np.float64))),
  }
  logger.info(
      'Benchmark: %.1f images/s, step p50 %.1f ms (p90 %.1f, p99 %.1f), '
      'compiled in %.1f s, peak memory %s MiB (compiled step: %s MiB)',
      figures['images_per_sec'] or 0, figures['step_ms']['p50'],
      figures['step_ms']['p90'], figures['step_ms']['p99'], compile_seconds,
      figures['peak_memory_mib'],
      (figures['compiled_memory_mib'] or {}).get('total'))
  return figures
