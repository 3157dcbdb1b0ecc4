"""The profiling script of bench/ runs and reports what it claims to."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_conv_layers_profile_reports_both_frameworks():
  result = subprocess.run(
      [sys.executable, 'bench/conv_layers.py', '--batch_size=1',
       '--repeats=1', '--layers=conv5_x,fc7'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert [row['layer'] for row in report['rows']] == ['conv5_x', 'fc7']
  assert report['compiler_options'] == {
      'xla_cpu_experimental_ynn_fusion_type': ''}
  # conv5_x (512 -> 512, 3x3) runs as Winograd in the model on CPU; fc7
  # (1x1) does not.
  assert [row['winograd'] for row in report['rows']] == [True, False]
  for row in report['rows']:
    for key in ('xla_default_fwd', 'jax_fwd', 'torch_fwd',
                'xla_default_fwd_bwd', 'jax_fwd_bwd', 'torch_fwd_bwd'):
      assert row[key] > 0
  # conv5_x occurs three times in SSD300.
  assert report['totals']['jax_fwd'] == sum(
      row['count'] * row['jax_fwd'] for row in report['rows'])


def test_coco_eval_bench_compares_both_apis_on_the_same_detections():
  result = subprocess.run(
      [sys.executable, 'bench/coco_eval.py', '--num_images=40', '--pool=20'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, check=True)
  lines = result.stdout.splitlines()
  assert any(line.startswith('faster_coco_eval: COCOeval') for line in lines)
  assert any(line.startswith('pycocotools: COCOeval') for line in lines)
  assert 'largest difference of the 12 stats between the APIs: 0\n' in (
      result.stdout)


def test_trainer_bench_reads_the_training_log(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  try:
    import trainer as trainer_bench  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  log = tmp_path / 'log.txt'
  log.write_text(
      '2026-11-30 05:00:00,000 SSD.trainer INFO: Start training\n'
      '2026-11-30 05:00:40,000 SSD.trainer INFO: iter: 000010, lr: 0.00035, '
      'total_loss: 20.884 (20.884), time: 4.000 (4.000), eta: 1:00:00, '
      'mem: 8000M\n'
      '2026-11-30 05:00:42,500 SSD.trainer INFO: iter: 000020, lr: 0.00036, '
      'total_loss: 19.1 (20.0), time: 0.250 (2.125), eta: 0:30:00, '
      'mem: 8288M\n'
      '2026-11-30 05:00:43,000 SSD.trainer INFO: Waiting for data: 12.5% of '
      'the training time\n')
  result = trainer_bench.parse_log(str(log), batch_size=32)
  # Between the two iteration lines: 10 steps of 32 images in 2.5 s.
  assert result['images_per_sec'] == 128.0
  assert result['steady_iterations'] == 10
  assert result['data_wait_fraction'] == 0.125
  assert result['peak_memory_mib'] == 8288
