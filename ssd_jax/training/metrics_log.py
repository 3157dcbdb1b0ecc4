"""The reference's training log: smoothed meters and its log line.

Example line (iteration 10 of the reference's SSD300 run):
  iter: 000010, lr: 0.00035, total_loss: 20.884 (20.884), reg_loss: 3.032
  (3.032), cls_loss: 17.852 (17.852), time: 2.668 (2.668), eta: 3 days,
  16:54:42, mem: 8288M
Each meter prints the mean of its last `window` values and, in brackets, the
mean of every value since this process started.
"""

import collections
import datetime
import logging
import os
import sys

LOG_FORMAT = '%(asctime)s %(name)s %(levelname)s: %(message)s'


class SmoothedValue:
  """A window mean and a global mean of a stream of numbers."""

  def __init__(self, window=10):
    self.window = collections.deque(maxlen=window)
    self.total = 0.0
    self.count = 0

  def update(self, value):
    self.window.append(float(value))
    self.total += float(value)
    self.count += 1

  @property
  def avg(self):
    return sum(self.window) / max(len(self.window), 1)

  @property
  def global_avg(self):
    return self.total / max(self.count, 1)


class MetricLogger:
  """Named SmoothedValues in insertion order."""

  def __init__(self, window=10):
    self._window = window
    self.meters = collections.OrderedDict()

  def update(self, **values):
    for name, value in values.items():
      self.meters.setdefault(name, SmoothedValue(self._window)).update(value)

  def __str__(self):
    return ', '.join(f'{name}: {m.avg:.3f} ({m.global_avg:.3f})'
                     for name, m in self.meters.items())


def log_line(iteration, lr, meters, eta_seconds, mem_mib=None):
  """The reference's log line for `iteration` (lr is the logged f(iteration))."""
  parts = [f'iter: {iteration:06d}', f'lr: {lr:.5f}', str(meters),
           f'eta: {datetime.timedelta(seconds=int(eta_seconds))}']
  if mem_mib is not None:
    parts.append(f'mem: {mem_mib}M')
  return ', '.join(parts)


def format_duration(seconds):
  """H:MM:SS, as str(timedelta) of whole seconds."""
  return str(datetime.timedelta(seconds=int(seconds)))


def setup_logger(name, workdir=None, write_file=True):
  """Logger writing the reference format to stdout and W/log.txt."""
  logger = logging.getLogger(name)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for handler in list(logger.handlers):
    logger.removeHandler(handler)
    handler.close()
  formatter = logging.Formatter(LOG_FORMAT)
  stream = logging.StreamHandler(sys.stdout)
  stream.setFormatter(formatter)
  logger.addHandler(stream)
  if workdir and write_file:
    os.makedirs(workdir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(workdir, 'log.txt'))
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
  return logger
