"""The training report from a workdir's own files, mid-run and odd ones."""

import json

from ssd_jax.training import metrics_log
from ssd_jax.training import report


def _write_log(workdir, iterations, extra=''):
  lines = ['2026-12-01 10:00:00,000 SSD.trainer INFO: Start training']
  meters = metrics_log.MetricLogger()
  for i in iterations:
    meters.update(total_loss=10.0 / i, reg_loss=3.0 / i, cls_loss=7.0 / i,
                  time=0.5)
    lines.append(f'2026-12-01 10:{i // 60:02d}:{i % 60:02d},000 SSD.trainer '
                 f'INFO: {metrics_log.log_line(i, 1e-3 * i, meters, 60)}')
  (workdir / 'log.txt').write_text('\n'.join(lines) + '\n' + extra)


def test_a_run_still_training_without_evaluations(tmp_path):
  _write_log(tmp_path, range(10, 130, 10), extra='mAP table line\n')
  log = report.read_log(str(tmp_path / 'log.txt'))
  assert log.iterations == list(range(10, 130, 10))
  assert log.lr == [float(f'{1e-3 * i:.5f}') for i in log.iterations]
  assert log.last_line.endswith('eta: 0:01:00')  # not the untimestamped line
  assert (log.end - log.start).total_seconds() == 120
  text = open(report.write_report(str(tmp_path))).read()
  assert 'Iterations 10 to 120 logged (12 log lines).' in text
  assert 'Total time 0:02:00' in text and '1.091 s per iteration' in text
  assert (tmp_path / 'report' / 'metrics.png').exists()


def test_eval_files_voc_and_coco_and_a_damaged_one(tmp_path):
  _write_log(tmp_path, [10, 20])
  (tmp_path / 'eval').mkdir()
  for step, m in ((20, 0.25), (10, 0.125)):
    (tmp_path / 'eval' / f'voc_2007_test_{step}.json').write_text(json.dumps(
        {'step': step, 'map': m, 'map_area': m,
         'ap': {'cat': m, 'dog': None}}))
  (tmp_path / 'eval' / 'coco_2014_minival_20.json').write_text(json.dumps(
      {'step': 20, 'AP': 0.1, 'AP50': 0.2}))
  (tmp_path / 'eval' / 'coco_2014_minival_20_bbox.json').write_text('[]')
  (tmp_path / 'eval' / 'voc_2012_val_20.json').write_text('{"step": 2')
  evaluations = report.read_evaluations(str(tmp_path))
  assert sorted(evaluations) == ['coco_2014_minival', 'voc_2007_test']
  assert [r['step'] for r in evaluations['voc_2007_test']] == [10, 20]
  text = open(report.write_report(str(tmp_path))).read()
  assert '| 20 | 0.2500 |' in text and '| dog | - |' in text
  assert '| iteration | AP |' in text and 'AP50 0.200' in text


def test_tensorboard_scalars_when_there_is_no_eval_json(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(str(tmp_path / 'tf_logs'))
  writer.write_scalars(100, {'metrics/voc_2007_test/mAP': 0.5})
  writer.write_scalars(200, {'metrics/voc_2007_test/mAP': 0.75})
  writer.close()
  evaluations = report.read_evaluations(str(tmp_path))
  assert [(r['step'], r['map']) for r in evaluations['voc_2007_test']] == [
      (100, 0.5), (200, 0.75)]
  text = open(report.write_report(str(tmp_path))).read()
  assert 'No iteration logged yet.' in text and '| 200 | 0.7500 |' in text
