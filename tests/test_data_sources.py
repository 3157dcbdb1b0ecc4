"""Tests of ssd_jax.data.sources: VOC parsing, TFDS == folders, bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import ssd300_voc
from ssd_jax.data import records
from ssd_jax.data import shapes
from ssd_jax.data import sources
import voc_testing

FIXTURE_ROOT = os.path.join(os.path.dirname(__file__), 'fixtures', 'voc_tiny')
VOC = ssd300_voc.VOC_CLASSES


@pytest.mark.parametrize('split', ['test', 'trainval'])
def test_folder_index_equals_the_xml_minus_one(split):
  index = sources.folder_index(FIXTURE_ROOT, f'voc_2007_{split}', VOC)
  with open(os.path.join(FIXTURE_ROOT, 'VOC2007', 'ImageSets', 'Main',
                         f'{split}.txt')) as f:
    ids = f.read().split()
  assert index.image_ids.tolist() == ids
  assert index.counts.num_listed == 5 and not index.counts.num_skipped
  for i, image_id in enumerate(ids):
    image_path, xml_path = voc_testing.paths(FIXTURE_ROOT, image_id)
    expected = voc_testing.xml_boxes(xml_path)
    boxes, labels, difficult = index.objects(i)
    np.testing.assert_array_equal(boxes, [b - 1 for _, b, _ in expected])
    assert [VOC[l] for l in labels] == [n for n, _, _ in expected]
    assert difficult.tolist() == [d for _, _, d in expected]
    width, height = Image.open(image_path).size
    assert index.sizes[i].tolist() == [height, width]
    assert index.is_jpeg[i]


def test_custom_class_names_and_folder_names(tmp_path):
  voc_testing.make_shapes(tmp_path / 'shapes', num_train=5, num_test=2)
  os.rename(tmp_path / 'shapes' / 'VOC2007', tmp_path / 'shapes' / 'mine')
  index = sources.folder_index(str(tmp_path / 'shapes'), 'mine_trainval',
                               shapes.CLASS_NAMES)
  assert len(index) == 5 and len(index.labels)
  assert set(index.labels.tolist()) <= {1, 2, 3, 4}
  # With VOC names the shapes are unknown classes: dropped and counted.
  index = sources.folder_index(str(tmp_path / 'shapes'), 'mine_trainval', VOC)
  assert not len(index.labels)
  assert index.counts.fixed['unknown_class'] > 0


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(records.DatasetNotFoundError,
                     match='voc_root.*VOC2007.*TFDS'):
    sources.folder_index(str(tmp_path), 'voc_2007_trainval', VOC)
  with pytest.raises(records.DatasetNotFoundError,
                     match=r'tfds build voc/2007.*manual_dir.*voc_root'):
    sources.tfds_index('voc_2007_test', VOC, str(tmp_path / 'no_tfds'))
  with pytest.raises(ValueError, match='not in TFDS'):
    sources.tfds_index('mine_train', VOC, str(tmp_path))


def test_tfds_backend_equals_folder_backend(tmp_path, monkeypatch):
  """Builds TFDS voc/2007 offline from generated VOC tar files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.object_detection import voc  # pylint: disable=g-import-not-at-top

  root = str(tmp_path / 'VOCdevkit')
  voc_testing.make_shapes(root, num_train=10, num_test=4, seed=5)
  voc_testing.rename_to_voc(root)
  tars = voc_testing.make_voc_tars(root, str(tmp_path / 'tars'))
  # The real tar files match TFDS's registered checksums; ours are
  # registered the same way so that TFDS takes them from manual_dir.
  infos = {}
  for fname in voc.Voc.BUILDER_CONFIGS[0].filenames.values():
    info = checksums.compute_url_info(os.path.join(tars, fname))
    infos[os.path.join(voc._VOC_DATA_URL, fname)] = checksums.UrlInfo(  # pylint: disable=protected-access
        size=info.size, checksum=info.checksum, filename=fname)
  monkeypatch.setattr(voc.Voc, 'url_infos', infos)
  data_dir = str(tmp_path / 'tfds')
  tfds.builder('voc/2007', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tars))

  for split in ('trainval', 'train', 'val', 'test'):
    name = f'voc_2007_{split}'
    from_tfds = sources.tfds_index(name, VOC, data_dir)
    from_folder = sources.folder_index(root, name, VOC)
    assert len(from_folder) > 0
    np.testing.assert_array_equal(from_tfds.image_ids, from_folder.image_ids)
    for key in ('sizes', 'is_jpeg', 'row_splits', 'boxes', 'labels',
                'difficult'):
      np.testing.assert_array_equal(getattr(from_tfds, key),
                                    getattr(from_folder, key), err_msg=key)
    for i in range(len(from_folder)):  # the same encoded images
      assert from_tfds.blobs[i] == voc_testing.read(from_folder.paths[i])

  # And so the same training stream.
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ssd300_voc.get_config()
  config.data.train = ('voc_2007_trainval',)
  config.data.max_boxes = 6
  config.solver.batch_size = 4
  config.input.image_size = 64
  config.data.voc_root, config.data.tfds_data_dir = root, ''
  from_folder = next(pipeline.create_train_iterator(config, start_step=2))
  config.data.voc_root, config.data.tfds_data_dir = '', data_dir
  from_tfds = next(pipeline.create_train_iterator(config, start_step=2))
  for key in from_folder:
    np.testing.assert_array_equal(from_tfds[key], from_folder[key])


@pytest.fixture(scope='module')
def bad_root(tmp_path_factory):
  """A shapes dataset with one bad-input case per image (see BAD_CASES)."""
  root = str(tmp_path_factory.mktemp('bad'))
  voc_testing.make_shapes(root, num_train=16, num_test=0, seed=11)
  path = lambda i: voc_testing.paths(root, f'{i:06d}')
  image, xml = path(0)
  voc_testing.break_jpeg_scan_header(image)
  image, xml = path(1)
  data = voc_testing.read(image)
  voc_testing.write(image, data[:len(data) // 2])  # truncated
  os.remove(path(2)[0])  # missing image
  voc_testing.write(path(3)[0], np.random.default_rng(0).bytes(3000))
  image, xml = path(4)
  text = voc_testing.read(xml, 'r')
  start, end = text.index('<size>'), text.index('</size>') + len('</size>')
  voc_testing.write(xml, text[:start] + text[end:])  # no <size>
  image, xml = path(5)
  text = voc_testing.read(xml, 'r')
  start = text.index('<bndbox>')
  end = text.index('</bndbox>') + len('</bndbox>')
  voc_testing.write(xml, text[:start] + text[end:])  # first object: no box
  extra = ('<object><name>{}</name><difficult>0</difficult><bndbox>'
           '<xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>'
           '</bndbox></object>')
  image, xml = path(6)
  text = voc_testing.read(xml, 'r').replace(
      '</annotation>', extra.format('circle', 20, 20, 20, 40) +  # zero width
      extra.format('square', 50, 30, 40, 60) + '</annotation>')  # inverted
  voc_testing.write(xml, text)
  image, xml = path(7)
  width, height = Image.open(image).size
  text = voc_testing.read(xml, 'r').replace(
      '</annotation>',
      extra.format('circle', width + 5, 10, width + 30, 40) +  # outside
      extra.format('square', -9, 5, 30, height + 20) + '</annotation>')
  voc_testing.write(xml, text)
  image, xml = path(8)
  text = voc_testing.read(xml, 'r')
  voc_testing.write(xml, text[:text.index('<object>')] + '</annotation>')
  voc_testing.reencode(path(9)[0], 'L')  # grayscale JPEG
  voc_testing.reencode(path(10)[0], 'CMYK')  # CMYK JPEG
  voc_testing.reencode(path(11)[0], 'RGB', 'PNG')  # PNG named .jpg
  voc_testing.write(path(12)[1], '<annotation><object>')  # broken XML
  os.remove(path(13)[1])  # no XML
  return root


def test_bad_input_is_skipped_or_fixed_and_counted(bad_root):
  index = sources.folder_index(bad_root, 'voc_2007_trainval',
                               shapes.CLASS_NAMES)
  counts = index.counts
  assert counts.num_listed == 16
  assert dict(counts.skipped) == {
      'truncated_image': 1, 'missing_image': 1, 'unreadable_image': 1,
      'bad_annotation': 1, 'missing_annotation': 1}
  ids = index.image_ids.tolist()
  for skipped in ('000001', '000002', '000003', '000012', '000013'):
    assert skipped not in ids
  # 000000 passes the host check; it fails inside tf.data (pipeline tests).
  assert '000000' in ids
  fixed = counts.fixed
  assert fixed['size_from_image'] == 1
  assert fixed['object_without_box'] == 1
  assert fixed['box_inverted'] == 1
  assert fixed['box_outside_image'] == 1
  assert fixed['box_clipped'] == 1
  assert fixed['converted_to_rgb'] == 2  # grayscale and CMYK
  assert fixed['not_jpeg'] == 1
  assert counts.summary().startswith(
      'skipped 5 of 16 examples (bad_annotation: 1, missing_annotation: 1, '
      'missing_image: 1, truncated_image: 1, unreadable_image: 1); fixed (')

  def objects(image_id):
    return index.objects(ids.index(image_id))

  # No <size>: the size comes from the image itself.
  image = Image.open(voc_testing.paths(bad_root, '000004')[0])
  assert index.sizes[ids.index('000004')].tolist() == list(image.size[::-1])
  # The zero-width box is kept here (evaluation scores it as a 1-pixel box,
  # as the reference does); the inverted one is gone.
  boxes, _, _ = objects('000006')
  assert [19, 19, 19, 39] in boxes.tolist()
  assert [49, 29, 39, 59] not in boxes.tolist()
  # Outside: dropped; partly outside: clipped to [0, W-1] x [0, H-1].
  boxes, _, _ = objects('000007')
  width, height = Image.open(voc_testing.paths(bad_root, '000007')[0]).size
  assert [0, 4, 29, height - 1] in boxes.tolist()
  assert boxes[:, 0].max() <= width - 1
  assert not len(objects('000008')[0])  # kept, with no objects
  assert not index.is_jpeg[ids.index('000011')]
  for i in range(len(index)):  # every box inside its image
    boxes, _, _ = index.objects(i)
    h, w = index.sizes[i]
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= w - 1)
    assert np.all(boxes[:, [1, 3]] <= h - 1)
    assert np.all(boxes[:, 2:] >= boxes[:, :2])


def test_counts_summary_line():
  counts = records.Counts()
  counts.num_listed = 10
  assert counts.summary() == 'skipped 0 of 10 examples'
  counts.skipped['missing_image'] += 2
  counts.fixed['box_clipped'] += 1
  assert counts.summary() == ('skipped 2 of 10 examples (missing_image: 2); '
                              'fixed (box_clipped: 1)')
