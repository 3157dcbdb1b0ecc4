"""Train-step and predict throughput of every model of the zoo, side by side.

    python bench/model_zoo.py [--train_batch=8] [--predict_batch=32] \
        [--steps=10] [--configs=ssd300_voc,mobilenet_v2_ssd320_voc,...]

Runs bench/train_step.py and bench/predict_step.py on each config (the
reference's input size and heads, random weights, synthetic data), one
subprocess at a time so that each gets the machine to itself, and prints a
Markdown table (images/s; compile seconds in brackets), then one JSON line.
Configs whose file is missing (e.g. a backbone not in this checkout) are
listed as skipped.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', [
    'ssd300_voc', 'ssd512_voc', 'mobilenet_v2_ssd320_voc',
    'mobilenet_v3_ssd320_voc', 'efficientnet_b3_ssd300_voc'],
                  'Config modules under configs/.')
flags.DEFINE_integer('train_batch', 8, 'Batch of the train step.')
flags.DEFINE_integer('predict_batch', 32, 'Batch of the predict step.')
flags.DEFINE_integer('steps', 10, 'Timed steps of each (after warm-up).')
flags.DEFINE_string('dtype', 'float32', 'model.dtype.')


def _run(script, config, batch):
  args = [sys.executable, os.path.join('bench', script),
          f'--config=configs/{config}.py', f'--batch_size={batch}',
          f'--steps={FLAGS.steps}', f'--config.model.dtype={FLAGS.dtype}',
          "--config.model.backbone.pretrained="]
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  if result.returncode != 0:
    raise RuntimeError(f'{" ".join(args)} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  rows = []
  print(f'| config | train step, batch {FLAGS.train_batch} (img/s) | '
        f'predict, batch {FLAGS.predict_batch} (img/s) |')
  print('|---|---|---|')
  for config in FLAGS.configs:
    if not os.path.exists(os.path.join(ROOT, 'configs', f'{config}.py')):
      print(f'| {config} | skipped (no configs/{config}.py) | |')
      continue
    train = _run('train_step.py', config, FLAGS.train_batch)
    predict = _run('predict_step.py', config, FLAGS.predict_batch)
    rows.append({'config': config, 'train': train, 'predict': predict})
    print(f"| {config} | {train['images_per_sec']:.1f} "
          f"({train['compile_s']:.0f} s) | {predict['images_per_sec']:.1f} "
          f"({predict['compile_s']:.0f} s) |", flush=True)
  print(json.dumps({'dtype': FLAGS.dtype, 'steps': FLAGS.steps,
                    'rows': rows}))


if __name__ == '__main__':
  app.run(main)
