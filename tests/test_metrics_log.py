import logging

from ssd_jax.training import metrics_log
from tests.tiny import tiny_config
from ssd_jax.training import optim


def test_log_line_reproduces_reference_format():
  meters = metrics_log.MetricLogger(window=10)
  meters.update(total_loss=20.884, reg_loss=3.032, cls_loss=17.852, time=2.668)
  eta = 2.668 * (120000 - 10)
  line = metrics_log.log_line(10, optim.learning_rate_at(tiny_config(), 10),
                              meters, eta, mem_mib=8288)
  assert line == ('iter: 000010, lr: 0.00035, total_loss: 20.884 (20.884), '
                  'reg_loss: 3.032 (3.032), cls_loss: 17.852 (17.852), '
                  'time: 2.668 (2.668), eta: 3 days, 16:55:33, mem: 8288M')
  assert ', mem' not in metrics_log.log_line(10, 0.001, meters, eta)


def test_window_and_global_means():
  meter = metrics_log.SmoothedValue(window=2)
  for v in (1.0, 2.0, 6.0):
    meter.update(v)
  assert meter.avg == 4.0
  assert meter.global_avg == 3.0


def test_logger_writes_reference_format_to_file(tmp_path, capsys):
  logger = metrics_log.setup_logger('SSD.test', str(tmp_path))
  logger.info('hello')
  for handler in logger.handlers:
    handler.flush()
  text = (tmp_path / 'log.txt').read_text()
  assert text.rstrip().endswith('SSD.test INFO: hello')
  assert 'SSD.test INFO: hello' in capsys.readouterr().out
  logging.getLogger('SSD.test').handlers.clear()


def test_duration_format():
  assert metrics_log.format_duration(3725.7) == '1:02:05'
