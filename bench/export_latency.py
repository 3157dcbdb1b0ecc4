"""Latency of the exported detectors, NMS included: ms per image at batch 1.

For ssd300_voc, mobilenet_v2_ssd320_voc and mobilenet_v3_ssd320_voc (random
weights): the JAX `inference.Detector` (batch_size=1, test.nms_on_device) on
uint8 images already at the model's size, and the files `export.export`
writes, run with their runtimes (`export.load_runner`): ONNX Runtime,
TFLite float32 and TFLite int8 (`--quantize=int8`, calibrated on 8 random
images: with random weights the ranges, not the accuracy, matter). Each at 1 and 2 threads: the whole process is pinned to that
many CPUs (`os.sched_setaffinity`, which also bounds XLA's thread pool), and
onnxruntime and TFLite get the same number of intra-op threads. Median of
`--repeats` calls after one warm-up; file sizes in MB.

  PYTHONPATH=. python bench/export_latency.py [--repeats=10] \
      [--configs=mobilenet_v2_ssd320_voc,...]
"""

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = ('ssd300_voc', 'mobilenet_v2_ssd320_voc', 'mobilenet_v3_ssd320_voc')
RUNTIMES = (('JAX Detector', None, None, 'none'),
            ('ONNX Runtime', 'onnx', 'ssd.onnx', 'none'),
            ('TFLite float32', 'tflite', 'ssd.tflite', 'none'),
            ('TFLite int8', 'tflite', 'ssd_int8.tflite', 'int8'))


def _median_ms(fn, image, repeats):
  fn(image)  # warm-up (compilation, allocation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(image)
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def measure(name, threads, repeats, workdir):
  """One config at `threads` CPUs: {runtime: (ms, size MB or None)}."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ssd_jax import models  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import export  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.backbone.pretrained = ''
  config.test.nms_on_device = True
  model = models.create_model(config, nnx.Rngs(0))
  image = export.sample_images(config, 1)
  results = {}
  for runtime, fmt, filename, quantize in RUNTIMES:
    if fmt is None:
      detector = inference.Detector(model, config, batch_size=1,
                                    num_threads=threads)
      results[runtime] = (_median_ms(lambda x: detector([x[0]]), image,
                                     repeats), None)
      detector.close()
      continue
    path = os.path.join(workdir, f'{name}_{filename}')
    if not os.path.exists(path):
      export.export(model, config, fmt, path, verify_images=False,
                    quantize=quantize,
                    calibration=export.sample_images(config, 8, seed=1))
    run = export.load_runner(fmt, path, num_threads=threads)
    results[runtime] = (_median_ms(run, image, repeats),
                        os.path.getsize(path) / 1e6)
  return results


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument('--one', help=argparse.SUPPRESS)  # name,threads,dir
  args = parser.parse_args()
  if args.one:
    name, threads, workdir = args.one.split(',')
    print(repr(measure(name, int(threads), args.repeats, workdir)))
    return
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.configs.split(','):
      for threads in (1, 2):
        # A fresh process per point: affinity and XLA's pool are per process.
        out = subprocess.run(
            [sys.executable, __file__, f'--repeats={args.repeats}',
             f'--one={name},{threads},{workdir}'], check=True,
            capture_output=True, text=True, env=dict(
                os.environ, TF_CPP_MIN_LOG_LEVEL='3')).stdout
        results = eval(out.strip().splitlines()[-1])  # pylint: disable=eval-used
        rows.append((name, threads, results))
        print(name, threads, results, file=sys.stderr, flush=True)
  print(f'{datetime.date.today()}, {platform.processor() or platform.machine()}'
        f', {os.cpu_count()} CPUs, batch 1, NMS included, median of '
        f'{args.repeats}\n')
  names = [r[0] for r in RUNTIMES]
  print('| model | threads | ' + ' | '.join(f'{n} ms' for n in names) +
        ' | ONNX MB | TFLite MB | int8 MB |')
  print('|---|---|' + '---|' * (len(names) + 3))
  for name, threads, results in rows:
    cells = [f'{results[n][0]:.1f}' for n in names]
    print(f'| {name} | {threads} | ' + ' | '.join(cells) +
          f' | {results["ONNX Runtime"][1]:.1f} | '
          f'{results["TFLite float32"][1]:.1f} | '
          f'{results["TFLite int8"][1]:.1f} |')


if __name__ == '__main__':
  main()
