"""Stopping a run cleanly on SIGTERM or SIGINT (SLURM preemption, Ctrl-C).

    with preemption.StopRequests() as stop:
      for step in ...:
        ...train step...
        if stop.agreed():
          ...save checkpoint `step`, wait until it is committed...
          raise preemption.Preempted(step)

The signal handler only sets a flag; the loop finishes the step in flight and
asks `agreed()` after every step. A signal that arrives while the checkpoint
is being written sets the flag again and does nothing else, so it cannot
interrupt the save. The previous handlers come back when the `with` block
ends (after the save has been waited for).

With several processes (jax.distributed) every process must stop at the same
step, since saving a checkpoint is a collective operation: `agreed()` then
gathers every process's flag (a one-integer all-gather) at the loop's log
and save steps, and all stop there when any of them was signalled. JAX's own preemption service
(multihost_utils.reached_preemption_sync_point) is not used: it only listens
for SIGTERM, through a C++ handler that a Python handler would replace.
"""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL of sysexits.h: "try again later". A job script can requeue on
# it (SLURM: `scontrol requeue $SLURM_JOB_ID`), telling a preempted run, whose
# checkpoint is complete, from a failed one (1) or a process killed by a
# signal without saving (128 + the signal number).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after saving checkpoint `step`."""

  def __init__(self, step, signal_name):
    super().__init__(f'preempted at iteration {step}: checkpoint saved')
    self.step = step
    self.signal_name = signal_name


class StopRequests:
  """Context manager that turns SIGTERM and SIGINT into a stop request."""

  def __init__(self, signals=STOP_SIGNALS):
    self.signals = tuple(signals)
    self.received = None  # name of the first signal received
    self._previous = {}

  def __enter__(self):
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signal.Signals(signum).name

  def agreed(self, sync_point=True):
    """Whether to stop now: this process was signalled or, with several
    processes, any of them was. All processes must call it at the same
    steps with the same `sync_point`.

    With several processes the flags are only gathered where `sync_point`
    (the loop's log and save steps, where it reads the device anyway), so
    that the other steps keep their asynchronous dispatch; one process
    alone stops at any step.
    """
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(local))
    if np.any(flags) and self.received is None:
      self.received = 'another process'
    return bool(np.any(flags))
