"""What train.py and eval.py do before JAX touches a device.

    launch.define_flags()                 # --distributed, --coordinator_address, ...
    ...
    launch.setup(config, FLAGS)           # XLA_FLAGS, then jax.distributed

Both steps must run before the first JAX call that starts a backend: XLA
reads XLA_FLAGS once, when the backend starts, and jax.distributed.initialize
refuses to run after it.
"""

import logging
import os
import sys
import warnings

from absl import flags
from absl import logging as absl_logging

ENV_COORDINATOR_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
DETERMINISTIC_GPU_FLAG = '--xla_gpu_deterministic_ops=true'


def define_flags():
  """Defines the multi-host flags of train.py and eval.py."""
  flags.DEFINE_bool(
      'distributed', False,
      'Multi-host run: call jax.distributed.initialize() first. Without '
      '--coordinator_address/--num_processes/--process_id (or $'
      f'{ENV_COORDINATOR_ADDRESS}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}) '
      'JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU).')
  flags.DEFINE_string(
      'coordinator_address', None,
      f'host:port of process 0 (default: ${ENV_COORDINATOR_ADDRESS}); '
      'implies --distributed.')
  flags.DEFINE_integer(
      'num_processes', None,
      f'Number of processes (default: ${ENV_NUM_PROCESSES}); implies '
      '--distributed.')
  flags.DEFINE_integer(
      'process_id', None,
      f'This process, 0 .. num_processes - 1 (default: ${ENV_PROCESS_ID}); '
      'implies --distributed.')


def _env_int(environ, name):
  value = environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name}={value!r} is not an integer') from None


def initialize_distributed(distributed=False, coordinator_address=None,
                           num_processes=None, process_id=None,
                           environ=None):
  """Starts jax.distributed when this is a multi-host run.

  Each of the three settings comes from its argument, else from its
  environment variable (JAX itself reads only the coordinator address from
  the environment). It is a multi-host run when `distributed` is set or any
  setting is given; settings left unset are detected by JAX from the cluster
  environment (SLURM, Open MPI, Cloud TPU).

  Returns:
    True if jax.distributed was initialised.

  Raises:
    ValueError: the settings are incomplete and JAX cannot detect the rest;
      the message names the flags and variables to set.
  """
  environ = os.environ if environ is None else environ
  if coordinator_address is None:
    coordinator_address = environ.get(ENV_COORDINATOR_ADDRESS) or None
  if num_processes is None:
    num_processes = _env_int(environ, ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(environ, ENV_PROCESS_ID)
  given = (coordinator_address, num_processes, process_id)
  if not distributed and all(v is None for v in given):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except ValueError as e:
    raise ValueError(
        f'Cannot start the multi-host run ({e}). Outside SLURM, Open MPI and '
        'Cloud TPU, give all three of --coordinator_address=HOST:PORT '
        '(process 0), --num_processes=N and --process_id=I on every host, or '
        f'set ${ENV_COORDINATOR_ADDRESS}, ${ENV_NUM_PROCESSES} and '
        f'${ENV_PROCESS_ID}.') from e
  return True


def set_xla_flags(config, environ=None):
  """Adds the config's XLA flags to $XLA_FLAGS (before the backend starts).

  config.deterministic (default False): XLA's deterministic GPU ops (no
  autotuned non-deterministic convolutions or atomic scatter-adds), the
  condition for bit-identical resume on GPUs. CPU runs are deterministic
  either way.
  """
  environ = os.environ if environ is None else environ
  if not config.get('deterministic', False):
    return
  current = environ.get('XLA_FLAGS', '')
  if DETERMINISTIC_GPU_FLAG not in current.split():
    environ['XLA_FLAGS'] = f'{current} {DETERMINISTIC_GPU_FLAG}'.strip()


def setup(config, flag_values):
  """Everything before JAX starts: XLA flags, then jax.distributed."""
  set_xla_flags(config)
  initialize_distributed(flag_values.distributed,
                         flag_values.coordinator_address,
                         flag_values.num_processes, flag_values.process_id)


class _WithoutOrbaxTraceback(logging.Filter):
  """Keeps the message of Orbax's error records but not their traceback."""

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      record.exc_info = None
      record.exc_text = None
    return True


def _is_closed_loop_callback(unraisable):
  """A write finishing after Orbax closed its event loop on a failed save."""
  error = unraisable.exc_value
  return (isinstance(error, RuntimeError) and
          str(error) == 'Event loop is closed')


def shorten_orbax_errors():
  """Orbax logs a failed save with several tracebacks from its threads; the
  commands report it once, as a CheckpointSaveError naming the path.

  After a failed save, Orbax closes the event loop of that save while
  TensorStore still completes its other writes; each completion then tries
  to wake the closed loop and Python prints an unraisable 'Event loop is
  closed' traceback (hundreds of them). Those, and the warning about the
  writes never awaited, carry nothing beyond the error already reported.
  """
  absl_logging.get_absl_logger().addFilter(_WithoutOrbaxTraceback())
  previous_hook = sys.unraisablehook

  def unraisable_hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = unraisable_hook
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
