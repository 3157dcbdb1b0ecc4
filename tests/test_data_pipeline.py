"""Tests of ssd_jax.data.pipeline and ssd_jax.data.shapes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import ssd300_voc
from ssd_jax.data import pipeline
from ssd_jax.data import shapes
import voc_testing

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
M = 6  # max_boxes in these tests


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shapes'))
  return shapes.ensure_dataset(root, num_train=14, num_test=7, image_size=96,
                               seed=1)


def _config(voc_root, class_names=shapes.CLASS_NAMES, batch_size=4):
  config = ssd300_voc.get_config()
  config.data.voc_root = voc_root
  config.data.class_names = class_names
  config.data.train = ('voc_2007_trainval',)
  config.data.max_boxes = M
  config.data.num_parallel_calls = 2
  config.solver.batch_size = batch_size
  config.input.image_size = 64
  config.seed = 7
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_uint8_train_images_are_the_float_images_rounded(shapes_root):
  config = _config(shapes_root)
  floats = next(pipeline.create_train_iterator(config))
  assert floats['image'].dtype == np.float32
  config.input.train_image_dtype = 'uint8'
  pixels = next(pipeline.create_train_iterator(config))
  assert pixels['image'].dtype == np.uint8
  for key in ('boxes', 'labels', 'mask'):
    np.testing.assert_array_equal(pixels[key], floats[key])
  # Pixel values (the mean colour fills the expand canvas), rounded half to
  # even and saturated; the augmentation's floats go beyond 0..255.
  expected = np.clip(np.round(floats['image']), 0, 255)
  np.testing.assert_array_equal(pixels['image'], expected.astype(np.uint8))
  assert floats['image'].mean() > 50
  config.input.train_image_dtype = 'float16'
  with pytest.raises(ValueError, match='train_image_dtype'):
    pipeline.create_train_iterator(config)


def test_train_batches_shapes_and_invariants(shapes_root):
  it = pipeline.create_train_iterator(_config(shapes_root))
  for batch in _take(it, 3):
    assert batch['image'].shape == (4, 64, 64, 3)
    assert batch['image'].dtype == np.float32  # pixel values, mean on device
    assert batch['boxes'].shape == (4, M, 4)
    assert batch['boxes'].dtype == np.float32
    assert batch['labels'].shape == (4, M)
    assert batch['labels'].dtype == np.int32
    assert batch['mask'].shape == (4, M) and batch['mask'].dtype == bool
    mask = batch['mask']
    assert np.all(batch['boxes'][mask] >= 0) and np.all(
        batch['boxes'][mask] <= 1)
    assert np.all(batch['labels'][mask] >= 1)
    assert np.all(batch['labels'][mask] < len(shapes.CLASS_NAMES))
    assert not batch['labels'][~mask].any()
  assert it.step == 3
  assert it.stats.summary().startswith('skipped 0 of 14 examples')


def test_stream_is_a_function_of_seed_and_step(shapes_root):
  config = _config(shapes_root)
  # 5 steps of 4 cross the 14-image epoch boundary.
  stream = _take(pipeline.create_train_iterator(config), 5)
  _assert_batches_equal(stream, _take(pipeline.create_train_iterator(config),
                                      5))
  resumed = _take(pipeline.create_train_iterator(config, start_step=3), 2)
  _assert_batches_equal(stream[3:], resumed)
  config.seed = 8
  other = _take(pipeline.create_train_iterator(config), 1)[0]
  assert not np.array_equal(other['image'], stream[0]['image'])


def test_epochs_are_permutations():
  examples = [pipeline.step_examples(
      tf.constant(7, tf.int64), s, global_batch=4, host_offset=0, batch=4,
      n=14)[1].numpy() for s in range(7)]
  examples = np.concatenate(examples)
  assert sorted(examples[:14]) == list(range(14))
  assert sorted(examples[14:]) == list(range(14))
  assert not np.array_equal(examples[:14], examples[14:])
  # A batch larger than the dataset spans several epochs.
  positions, examples = pipeline.step_examples(
      tf.constant(7, tf.int64), 1, global_batch=8, host_offset=0, batch=8,
      n=3)
  assert positions.numpy().tolist() == list(range(8, 16))
  assert sorted(examples.numpy()[1:4]) == [0, 1, 2]  # positions 9..11


def test_hosts_get_disjoint_slices_of_the_global_batch(shapes_root):
  config = _config(shapes_root)
  whole = _take(pipeline.TrainIterator(config, process_index=0,
                                       process_count=1), 2)
  parts = [_take(pipeline.TrainIterator(config, process_index=p,
                                        process_count=2), 2)
           for p in range(2)]
  for step in range(2):
    for key in whole[step]:
      np.testing.assert_array_equal(
          whole[step][key],
          np.concatenate([parts[0][step][key], parts[1][step][key]]),
          err_msg=key)
  with pytest.raises(ValueError, match='divisible'):
    pipeline.TrainIterator(config, process_index=0, process_count=3)


def test_eval_iterator_covers_every_image_once(shapes_root):
  config = _config(shapes_root)
  index = pipeline.load_index(config, 'voc_2007_test')
  assert pipeline.num_examples(config, 'voc_2007_test') == 7
  batches = list(pipeline.create_eval_iterator(config, 'voc_2007_test',
                                               batch_size=3))
  assert len(batches) == 3
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.tolist() == [True] * 7 + [False] * 2
  ids = np.concatenate([b['image_id'] for b in batches])[valid]
  assert ids.tolist() == index.image_ids.tolist()
  mx = index.max_objects
  for batch in batches:
    assert batch['image'].shape == (3, 64, 64, 3)
    assert batch['boxes'].shape == (3, mx, 4)
    assert batch['orig_size'].dtype == np.int32
    for row in range(3):
      if not batch['valid'][row]:
        assert not batch['mask'][row].any()
        continue
      image_id = batch['image_id'][row]
      _, xml = voc_testing.paths(shapes_root, image_id)
      want = voc_testing.xml_boxes(xml)  # all objects, difficult included
      k = batch['mask'][row].sum()
      assert k == len(want)
      np.testing.assert_array_equal(batch['boxes'][row, :k],
                                    [b - 1 for _, b, _ in want])
      assert batch['difficult'][row, :k].tolist() == [d for _, _, d in want]
      assert [shapes.CLASS_NAMES[l] for l in batch['labels'][row, :k]] == [
          n for n, _, _ in want]


def test_eval_hosts_are_disjoint_and_in_step(shapes_root):
  config = _config(shapes_root)
  seen, lengths = [], []
  for p in range(3):
    batches = list(pipeline.create_eval_iterator(
        config, 'voc_2007_test', batch_size=3, process_index=p,
        process_count=3))
    lengths.append(len(batches))
    for b in batches:
      assert b['image'].shape[0] == 1  # 3 // 3 per host
      seen += b['image_id'][b['valid']].tolist()
  assert len(set(lengths)) == 1
  assert sorted(seen) == sorted(
      pipeline.load_index(config, 'voc_2007_test').image_ids.tolist())


def test_eval_resize_matches_the_reference_inputs():
  """The reference's cv2 resize of voc_tiny's test images (fixture)."""
  ref = np.load(os.path.join(FIXTURES, 'voc_tiny_dets.npz'))
  config = _config(os.path.join(FIXTURES, 'voc_tiny'),
                   class_names=ssd300_voc.VOC_CLASSES)
  config.input.image_size = 300
  batch = next(iter(pipeline.create_eval_iterator(config, 'voc_2007_test',
                                                  batch_size=5)))
  assert batch['image_id'].tolist() == ref['image_ids'].tolist()
  np.testing.assert_array_equal(batch['orig_size'], ref['orig_hw'])
  assert batch['image'].dtype == np.uint8
  ours = batch['image'].astype(np.float32)
  diff = np.abs(ours - ref['test_inputs_uint8'].astype(np.float32))
  # cv2 rounds its fixed-point bilinear weights; TF computes in float.
  print(f'eval resize vs reference: max |diff| {diff.max()}, '
        f'{np.mean(diff > 0):.4%} of values differ')
  assert diff.max() <= 1
  assert np.mean(diff > 0) < 0.1


def test_bad_images_never_stop_training_or_eval(tmp_path):
  root = str(tmp_path)
  voc_testing.make_shapes(root, num_train=6, num_test=0, seed=2)
  voc_testing.break_jpeg_scan_header(voc_testing.paths(root, '000001')[0])
  voc_testing.reencode(voc_testing.paths(root, '000002')[0], 'L')
  voc_testing.reencode(voc_testing.paths(root, '000003')[0], 'CMYK')
  voc_testing.reencode(voc_testing.paths(root, '000004')[0], 'RGB', 'PNG')
  _, xml = voc_testing.paths(root, '000005')
  text = voc_testing.read(xml, 'r')
  voc_testing.write(xml, text[:text.index('<object>')] + '</annotation>')
  config = _config(root, batch_size=3)
  it = pipeline.create_train_iterator(config)
  failed = background = 0
  for batch in _take(it, 4):  # two epochs
    no_boxes = ~batch['mask'].any(axis=1)
    mean_grey = np.array(config.input.pixel_mean, batch['image'].dtype)
    blank = no_boxes & (batch['image'] == mean_grey).all(axis=(1, 2, 3))
    failed += blank.sum()
    background += (no_boxes & ~blank).sum()
  assert failed == 2  # the broken image, once per epoch, empty
  assert background == 2  # the image without objects, once per epoch
  summary = it.stats.summary()
  assert summary.startswith('skipped 1 of 6 examples (decode_error: 1); ')
  assert 'no_objects: 1' in summary and 'converted_to_rgb: 2' in summary
  assert 'not_jpeg: 1' in summary
  batches = list(pipeline.create_eval_iterator(config, 'voc_2007_trainval',
                                               batch_size=3))
  valid = np.concatenate([b['valid'] for b in batches])
  ids = np.concatenate([b['image_id'] for b in batches])
  assert ids[~valid].tolist() == ['000001']


def test_too_many_boxes_keep_the_first(tmp_path):
  root = str(tmp_path)
  voc_testing.make_shapes(root, num_train=3, num_test=0, seed=4)
  _, xml = voc_testing.paths(root, '000000')
  obj = ('<object><name>square</name><difficult>0</difficult><bndbox>'
         '<xmin>{0}</xmin><ymin>5</ymin><xmax>{1}</xmax><ymax>40</ymax>'
         '</bndbox></object>')
  text = voc_testing.read(xml, 'r')
  text = text[:text.index('<object>')] + ''.join(
      obj.format(2 + 4 * i, 30 + 4 * i) for i in range(M + 3)) + (
          '</annotation>')
  voc_testing.write(xml, text)
  config = _config(root, batch_size=3)
  it = pipeline.create_train_iterator(config)
  next(it)
  assert it.stats.counts.fixed['too_many_boxes'] == 1
  assert 'too_many_boxes: 1' in it.stats.summary()


def test_shapes_dataset_is_deterministic_and_idempotent(tmp_path):
  a = shapes.ensure_dataset(str(tmp_path / 'a'), num_train=6, num_test=2,
                            image_size=64, seed=3)
  b = shapes.ensure_dataset(str(tmp_path / 'b'), num_train=6, num_test=2,
                            image_size=64, seed=3)
  files = sorted(os.listdir(os.path.join(a, 'VOC2007', 'JPEGImages')))
  assert len(files) == 8
  for sub in ('JPEGImages', 'Annotations'):
    for name in os.listdir(os.path.join(a, 'VOC2007', sub)):
      assert voc_testing.read(os.path.join(a, 'VOC2007', sub, name)) == (
          voc_testing.read(os.path.join(b, 'VOC2007', sub, name)))
  mtime = os.path.getmtime(os.path.join(a, 'VOC2007', 'JPEGImages', files[0]))
  shapes.ensure_dataset(a, num_train=6, num_test=2, image_size=64, seed=3)
  assert mtime == os.path.getmtime(
      os.path.join(a, 'VOC2007', 'JPEGImages', files[0]))
  with pytest.raises(ValueError, match='made with'):
    shapes.ensure_dataset(a, num_train=7, num_test=2, image_size=64, seed=3)
  main = os.path.join(a, 'VOC2007', 'ImageSets', 'Main')
  split = lambda s: voc_testing.read(os.path.join(main, f'{s}.txt'), 'r').split()
  assert split('trainval') == split('train') + split('val')
  assert len(split('test')) == 2
  assert shapes.CLASS_NAMES[0] == '__background__'


def test_shapes_objects_are_visible_and_sized():
  for i in range(20):
    image, objects = shapes.make_image(0, i, 128)
    height, width = image.shape[:2]
    assert 1 <= len(objects) <= 5
    for obj in objects:
      x1, y1, x2, y2 = obj['bbox']
      assert 0 <= x1 < x2 <= width - 1 and 0 <= y1 < y2 <= height - 1
      if not obj['difficult']:
        assert max(x2 - x1, y2 - y1) >= 0.1 * min(width, height)
        region = image[y1:y2 + 1, x1:x2 + 1].astype(float)
        saturation = region.max(-1) - region.min(-1)
        assert saturation.max() > 80  # a colourful shape, not background


def test_shapes_cli(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, 'make_shapes.py', f'--out={tmp_path}', '--num_train=3',
       '--num_test=1', '--image_size=48', '--seed=2'],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'wrote 3 trainval + 1 test images' in result.stdout
  assert len(os.listdir(tmp_path / 'VOC2007' / 'JPEGImages')) == 4
  missing = subprocess.run([sys.executable, 'make_shapes.py'], cwd=root,
                           env=dict(os.environ, PYTHONPATH=root),
                           capture_output=True, text=True)
  assert missing.returncode != 0 and '--out' in missing.stderr


