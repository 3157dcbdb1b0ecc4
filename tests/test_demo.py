"""demo.py: a folder of images -> drawn images and detections.json."""

import json
import os
import subprocess
import sys

import numpy as np
from flax import nnx
from PIL import Image

from configs import ssd300_voc
from ssd_jax import models
from ssd_jax.deploy import inference
from tests import tiny
from tests import workdir_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEGS = os.path.join(ROOT, 'tests', 'fixtures', 'voc_tiny', 'VOC2007',
                     'JPEGImages')


def test_demo(tmp_path):
  config = tiny.tiny_config(num_classes=21)
  config.data.class_names = ssd300_voc.VOC_CLASSES
  model = models.create_model(config, nnx.Rngs(4))
  workdir = workdir_testing.save_workdir(tmp_path / 'w', config, model,
                                         step=12)
  images_dir = tmp_path / 'images'
  images_dir.mkdir()
  names = ['000323.jpg', '002627.jpg', '004165.jpg']
  for name in names:
    Image.open(os.path.join(JPEGS, name)).save(images_dir / name)
  Image.open(os.path.join(JPEGS, '005186.jpg')).convert('L').save(
      images_dir / 'gray.PNG')
  Image.open(os.path.join(JPEGS, '007199.jpg')).save(images_dir / 'b.bmp')
  (images_dir / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  (images_dir / 'notes.txt').write_text('not an image')
  readable = sorted(names + ['gray.PNG', 'b.bmp'])

  # A threshold between the images' best scores: some images get boxes,
  # at least one gets none.
  detector = inference.Detector(model, config)
  best = sorted(float(d['scores'][0]) for d in detector(
      [images_dir / name for name in readable]))
  threshold = (best[0] + best[-1]) / 2
  expected = dict(zip(readable, detector(
      [images_dir / name for name in readable], score_threshold=threshold)))
  detector.close()

  output_dir = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, 'demo.py', f'--workdir={workdir}',
       f'--images_dir={images_dir}', f'--output_dir={output_dir}',
       f'--score_threshold={threshold!r}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert any('(step 12)' in line for line in lines)
  for name in readable:
    [line] = [l for l in lines if f' {name}: objects' in l]
    assert 'load' in line and 'inference' in line and 'ms' in line
  assert any('corrupt.jpg: skipped' in line for line in lines)
  assert 'Done: 5 images' in lines[-1]
  assert '1 skipped (unreadable): corrupt.jpg' in lines[-1]

  with open(output_dir / 'detections.json') as f:
    detections = json.load(f)
  assert sorted(detections) == readable
  assert any(detections.values()) and not all(detections.values())
  for name in readable:
    ours, theirs = detections[name], expected[name]
    assert [d['label'] for d in ours] == theirs['labels'].tolist()
    assert [d['class_name'] for d in ours] == theirs['class_names']
    np.testing.assert_allclose([d['score'] for d in ours], theirs['scores'],
                               atol=1e-5)
    np.testing.assert_allclose(np.reshape([d['box'] for d in ours], (-1, 4)),
                               theirs['boxes'], atol=0.02)
    assert all(d['score'] > threshold for d in ours)
    drawn = Image.open(output_dir / name)
    assert drawn.size == Image.open(images_dir / name).size
  assert sorted(os.listdir(output_dir)) == sorted(readable +
                                                  ['detections.json'])
