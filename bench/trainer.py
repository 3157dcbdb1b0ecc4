r"""End-to-end training throughput: `train.py` itself, input pipeline included.

Generates (once) a VOC-format shapes dataset (ssd_jax.data.shapes, images
with a long side of --image_size pixels, JPEG), then runs

  python train.py --config=configs/ssd300_voc.py --workdir=W \
      --config.solver.max_iter=STEPS ... (the shapes' 4 classes, no
      pretrained backbone, no evaluation before the end)

as its own process and reads W/log.txt: steady-state images/s (between the
first and the last log line, so compilation is left out), the fraction of
the training time spent waiting for data (the trainer's own figure, whole
run) and the device's peak memory (the log lines' `mem:`). Prints one JSON
line last.

  python bench/trainer.py [--steps 60] [--batch_size 32] [--image_size 400]
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LINE = re.compile(r'^(\S+ \S+) SSD\S* INFO: iter: (\d+),.*?(?:mem: (\d+)M)?$')
SHAPES_CLASSES = ('__background__', 'circle', 'square', 'triangle', 'cross')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--log_step', type=int, default=10)
  parser.add_argument('--image_size', type=int, default=400,
                      help='long side of the generated images')
  parser.add_argument('--num_train', type=int, default=512)
  parser.add_argument('--num_test', type=int, default=16)
  parser.add_argument('--data', default='/tmp/ssd_jax_bench_shapes')
  parser.add_argument('--workdir', default=None,
                      help='default: a fresh folder under /tmp')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--python', default=sys.executable)
  return parser.parse_args()


def parse_log(path, batch_size):
  """Steady-state images/s, data-wait fraction and peak memory of a log."""
  points, mem = [], []
  wait = None
  with open(path) as f:
    for line in f:
      line = line.rstrip('\n')
      match = LINE.match(line)
      if match:
        stamp = datetime.datetime.strptime(match.group(1),
                                           '%Y-%m-%d %H:%M:%S,%f')
        points.append((int(match.group(2)), stamp.timestamp()))
        if match.group(3):
          mem.append(int(match.group(3)))
      found = re.search(r'Waiting for data: ([\d.]+)%', line)
      if found:
        wait = float(found.group(1)) / 100
  if len(points) < 2:
    raise ValueError(f'{path}: fewer than two iteration log lines; raise '
                     '--steps or lower --log_step')
  (first_iter, first_time), (last_iter, last_time) = points[0], points[-1]
  return {
      'images_per_sec': batch_size * (last_iter - first_iter) /
                        max(last_time - first_time, 1e-9),
      'steady_iterations': last_iter - first_iter,
      'data_wait_fraction': wait,
      'peak_memory_mib': max(mem) if mem else None,
  }


def main():
  args = parse_args()
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  shapes.ensure_dataset(args.data, num_train=args.num_train,
                        num_test=args.num_test, image_size=args.image_size,
                        seed=0)
  generate_seconds = time.perf_counter() - start
  workdir = args.workdir or os.path.join(
      '/tmp', f'ssd_jax_bench_trainer_{os.getpid()}')
  names = ','.join(f"'{n}'" for n in SHAPES_CLASSES)
  command = [
      args.python, os.path.join(ROOT, 'train.py'),
      f'--config={os.path.join(ROOT, "configs", "ssd300_voc.py")}',
      f'--workdir={workdir}',
      f'--config.data.voc_root={args.data}',
      f'--config.data.class_names=({names})',
      "--config.data.train=('voc_2007_trainval',)",
      "--config.data.test=('voc_2007_test',)",
      f'--config.model.num_classes={len(SHAPES_CLASSES)}',
      "--config.model.backbone.pretrained=",
      f'--config.model.dtype={args.dtype}',
      f'--config.solver.batch_size={args.batch_size}',
      f'--config.solver.max_iter={args.steps}',
      f'--config.log_step={args.log_step}',
      f'--config.save_step={args.steps}',
      '--config.eval_step=0',
  ]
  print(' '.join(command), file=sys.stderr)
  start = time.perf_counter()
  subprocess.run(command, check=True, cwd=ROOT)
  wall = time.perf_counter() - start
  result = parse_log(os.path.join(workdir, 'log.txt'), args.batch_size)
  result.update({
      'framework': 'jax', 'what': 'train.py end to end',
      'config': 'ssd300_voc (4 shape classes)', 'dtype': args.dtype,
      'batch_size': args.batch_size, 'steps': args.steps,
      'image_size': args.image_size, 'num_train': args.num_train,
      'wall_seconds': round(wall, 1),
      'dataset_generation_seconds': round(generate_seconds, 1),
      'cpu_count': os.cpu_count(),
  })
  print(json.dumps(result))


if __name__ == '__main__':
  main()
