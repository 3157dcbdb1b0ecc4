"""demo.py: a folder of images -> drawn images and detections.json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
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


def _write_clip(path, num_frames=10, size=(128, 96)):
  """An .mp4 of voc_tiny photos sliding by, written with cv2.VideoWriter."""
  import cv2  # pylint: disable=g-import-not-at-top
  photo = np.asarray(Image.open(os.path.join(JPEGS, '000323.jpg')).convert(
      'RGB').resize((2 * size[0], size[1])))
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), 10.0,
                           size)
  for i in range(num_frames):
    frame = photo[:, 8 * i:8 * i + size[0]]
    writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
  writer.release()


def _read_frames(path):
  import cv2  # pylint: disable=g-import-not-at-top
  capture = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  capture.release()
  return frames


def test_video(tmp_path):
  pytest.importorskip('cv2')
  config = tiny.tiny_config(num_classes=21)
  config.data.class_names = ssd300_voc.VOC_CLASSES
  model = models.create_model(config, nnx.Rngs(4))
  workdir = workdir_testing.save_workdir(tmp_path / 'w', config, model, step=3)
  clip = tmp_path / 'clip.mp4'
  _write_clip(clip)
  frames = _read_frames(clip)
  assert len(frames) == 10
  detector = inference.Detector(model, config)
  threshold = float(np.median([d['scores'][0] for d in detector(frames)]))
  expected = detector(frames, score_threshold=threshold)
  detector.close()

  output = tmp_path / 'out' / 'clip_detections.mp4'
  result = subprocess.run(
      [sys.executable, 'demo.py', f'--workdir={workdir}', f'--video={clip}',
       f'--output={output}', f'--score_threshold={threshold!r}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Done: 10 frames' in result.stdout
  assert 'frames per second' in result.stdout
  drawn = _read_frames(output)
  assert len(drawn) == 10 and drawn[0].shape == frames[0].shape
  with open(output.with_suffix('.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['frame'] for line in lines] == list(range(10))
  np.testing.assert_allclose([line['time'] for line in lines],
                             np.arange(10) / 10.0, atol=1e-3)
  assert any(line['detections'] for line in lines)
  for line, theirs in zip(lines, expected):
    ours = line['detections']
    assert [d['label'] for d in ours] == theirs['labels'].tolist()
    np.testing.assert_allclose([d['score'] for d in ours], theirs['scores'],
                               atol=1e-5)


def test_unreadable_and_empty_videos_are_one_line_errors(tmp_path):
  pytest.importorskip('cv2')
  from ssd_jax.deploy import video  # pylint: disable=g-import-not-at-top
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(b'not a video at all' * 10)
  with pytest.raises(video.VideoError, match='cannot open .*garbage.mp4'):
    video.detect_video(None, str(garbage), str(tmp_path / 'o.mp4'),
                       str(tmp_path / 'o.jsonl'))
  empty = tmp_path / 'empty.mp4'
  _write_clip(empty, num_frames=0)
  with pytest.raises(video.VideoError, match='cannot open|no frame'):
    video.detect_video(None, str(empty), str(tmp_path / 'o.mp4'),
                       str(tmp_path / 'o.jsonl'))
