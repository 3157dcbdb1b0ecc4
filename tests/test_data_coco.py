"""Tests of ssd_jax.data.coco: the reference's COCO rules, TFDS == folders,
bad input, and the num_classes check."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import ssd300_coco
from configs import ssd300_voc
from ssd_jax.data import coco
from ssd_jax.data import pipeline
from ssd_jax.data import records
from ssd_jax.data import sources
import coco_testing
import voc_testing

COCO_TINY = os.path.join(os.path.dirname(__file__), 'fixtures', 'coco_tiny',
                         'coco')
ANN_FILE = os.path.join(COCO_TINY, 'annotations', 'instances_minival2014.json')


def _json(path=ANN_FILE):
  with open(path) as f:
    return json.load(f)


def test_coco_tiny_follows_the_reference_rules():
  data = _json()
  index = coco.folder_index(COCO_TINY, 'coco_2014_minival', training=False)
  info = index.coco
  # Sorted category ids -> labels 1..20, names from the json.
  ids = sorted(c['id'] for c in data['categories'])
  assert info.category_ids.tolist() == [0] + ids
  by_id = {c['id']: c['name'] for c in data['categories']}
  assert info.class_names == ('__background__',) + tuple(by_id[i]
                                                         for i in ids)
  # Every image kept for evaluation (the last one has no annotation), in id
  # order, with the COCO ids.
  assert index.image_ids.tolist() == [str(i['id']) for i in data['images']]
  assert index.counts.num_listed == 5 and not index.counts.num_skipped
  assert index.counts.fixed['crowd'] == 1
  for i, image in enumerate(data['images']):
    anns = [a for a in data['annotations'] if a['image_id'] == image['id']
            and not a['iscrowd']]
    boxes, labels, difficult = index.objects(i)
    expected = [[x, y, x + w, y + h] for x, y, w, h in
                (a['bbox'] for a in anns)]
    np.testing.assert_array_equal(boxes, np.array(expected,
                                                  np.float32).reshape(-1, 4))
    assert labels.tolist() == [ids.index(a['category_id']) + 1 for a in anns]
    assert not difficult.any()
    width, height = Image.open(os.path.join(COCO_TINY, 'val2014',
                                            image['file_name'])).size
    assert index.sizes[i].tolist() == [height, width]
  assert not len(index.objects(4)[0])
  # The ground truth for COCOeval keeps the crowd box and the json's areas.
  gt = info.annotations
  assert len(gt.ids) == len(data['annotations'])
  assert gt.iscrowd.sum() == 1
  np.testing.assert_array_equal(gt.areas, [a['area'] for a in
                                           data['annotations']])
  # Training: the image without annotations is left out and counted; the
  # second image keeps its non-crowd boxes.
  train = coco.folder_index(COCO_TINY, 'coco_2014_minival', training=True)
  assert train.image_ids.tolist() == index.image_ids.tolist()[:4]
  assert train.counts.skipped == {'no_annotations': 1}
  assert train.coco.annotations is None
  np.testing.assert_array_equal(train.boxes, index.boxes)


def test_zero_area_boxes_unknown_ids_and_bad_images(tmp_path):
  root = str(tmp_path / 'coco')
  shutil.copytree(COCO_TINY, root)
  path = os.path.join(root, 'annotations', 'instances_minival2014.json')
  data = _json(path)
  anns = data['annotations']
  anns[0]['bbox'][2] = 0  # zero width
  anns[1]['bbox'] = [1, 2, 'x', 4]  # not a box
  anns.append(dict(anns[2], id=900, image_id=424242))  # unknown image
  anns.append(dict(anns[2], id=901, category_id=8))  # unknown category
  images = data['images']
  with open(path, 'w') as f:
    json.dump(data, f)
  image_path = lambda k: os.path.join(root, 'val2014', images[k]['file_name'])
  voc_testing.reencode(image_path(2), 'L')  # grayscale
  voc_testing.reencode(image_path(3), 'CMYK')
  data_bytes = voc_testing.read(image_path(4))
  voc_testing.write(image_path(4), data_bytes[:len(data_bytes) // 2])
  os.remove(image_path(1))
  index = coco.folder_index(root, 'coco_2014_minival', training=False)
  counts = index.counts
  assert dict(counts.skipped) == {'missing_image': 1, 'truncated_image': 1}
  assert counts.fixed['box_empty'] == 1
  assert counts.fixed['object_without_box'] == 1
  assert counts.fixed['annotation_unknown_image'] == 1
  assert counts.fixed['unknown_category'] == 1
  assert counts.fixed['converted_to_rgb'] == 2
  assert index.image_ids.tolist() == ['1000', '1014', '1021']
  assert counts.summary().startswith(
      'skipped 2 of 5 examples (missing_image: 1, truncated_image: 1); ')
  # The first image lost its first two boxes.
  assert len(index.objects(0)[0]) == 3


def test_voc_and_coco_do_not_mix_in_one_index():
  voc = sources.folder_index(
      os.path.join(os.path.dirname(__file__), 'fixtures', 'voc_tiny'),
      'voc_2007_test', ssd300_voc.VOC_CLASSES)
  train = coco.folder_index(COCO_TINY, 'coco_2014_minival', training=True)
  assert len(records.Index.concatenate([train, train])) == 8
  with pytest.raises(ValueError, match='cannot mix datasets'):
    records.Index.concatenate([voc, train])


def test_missing_or_malformed_dataset_says_what_to_do(tmp_path):
  with pytest.raises(records.DatasetNotFoundError,
                     match=r'instances_minival2014.json does not exist.*'
                     'coco_root'):
    coco.folder_index(str(tmp_path), 'coco_2014_minival', training=False)
  with pytest.raises(records.DatasetNotFoundError,
                     match='coco_2014_minival.*needs --config.data.coco_root'):
    coco.coco_index('', '', 'coco_2014_minival', training=False)
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'instances_mine.json').write_text('{"images": 1}')
  with pytest.raises(ValueError, match='not a COCO instances file'):
    coco.folder_index(str(tmp_path), 'coco_mine', training=False)


def test_num_classes_must_match_the_categories():
  config = ssd300_coco.get_config()
  config.data.coco_root = COCO_TINY
  with pytest.raises(ValueError, match=r'20 categories.*must be 21.*is 81'):
    pipeline.load_index(config, 'coco_2014_minival')
  config.model.num_classes = 21
  index = pipeline.load_index(config, 'coco_2014_minival')
  assert len(index) == 5 and index.coco.class_names[1] == 'aeroplane'


@pytest.fixture(scope='module')
def coco_2017(tmp_path_factory):
  """A COCO 2017 folder (shapes images, COCO's 80 categories)."""
  tmp = tmp_path_factory.mktemp('coco2017')
  voc_root = voc_testing.make_shapes(str(tmp / 'voc'), num_train=8,
                                     num_test=4, seed=7)
  root = str(tmp / 'coco')
  categories = coco_testing.all_coco_categories()
  coco_testing.shapes_to_coco(voc_root, 'trainval', root, 'train2017',
                              categories=categories, first_image_id=9)
  data = coco_testing.shapes_to_coco(
      voc_root, 'test', root, 'val2017', categories=categories,
      first_image_id=139, crowd_first=True)
  # One validation image without annotations.
  last = data['images'][-1]['id']
  data['annotations'] = [a for a in data['annotations']
                         if a['image_id'] != last]
  with open(os.path.join(root, 'annotations', 'instances_val2017.json'),
            'w') as f:
    json.dump(data, f)
  return root


def test_tfds_backend_equals_folder_backend(coco_2017, tmp_path, monkeypatch):
  """Builds TFDS coco/2017 offline from generated COCO zip files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.object_detection import coco as tfds_coco  # pylint: disable=g-import-not-at-top

  zips = coco_testing.make_coco_2017_zips(coco_2017, str(tmp_path / 'zips'))
  infos = {}
  for fname in os.listdir(zips):
    folder = 'zips' if fname.endswith('2017.zip') and 'annot' not in fname \
        and 'info' not in fname else 'annotations'
    info = checksums.compute_url_info(os.path.join(zips, fname))
    infos[f'http://images.cocodataset.org/{folder}/{fname}'] = (
        checksums.UrlInfo(size=info.size, checksum=info.checksum,
                          filename=fname))
  monkeypatch.setattr(tfds_coco.Coco, 'url_infos', infos)
  data_dir = str(tmp_path / 'tfds')
  tfds.builder('coco/2017', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=zips))

  for name in ('coco_2017_train', 'coco_2017_val'):
    for training in (True, False):
      from_tfds = coco.tfds_index(name, data_dir, training=training)
      from_folder = coco.folder_index(coco_2017, name, training=training)
      assert len(from_folder) > 0
      np.testing.assert_array_equal(from_tfds.image_ids,
                                    from_folder.image_ids)
      for key in ('sizes', 'is_jpeg', 'row_splits', 'labels', 'difficult'):
        np.testing.assert_array_equal(getattr(from_tfds, key),
                                      getattr(from_folder, key), err_msg=key)
      np.testing.assert_allclose(from_tfds.boxes, from_folder.boxes, atol=1e-3)
      assert from_tfds.coco.same_categories(from_folder.coco)
      assert from_tfds.counts.summary() == from_folder.counts.summary()
      for i in range(len(from_folder)):  # the same encoded images
        assert (voc_testing.read(from_tfds.paths[i]) ==
                voc_testing.read(from_folder.paths[i]))
      if not training:
        a, b = from_tfds.coco.annotations, from_folder.coco.annotations
        for key in ('ids', 'image_ids', 'category_ids', 'iscrowd'):
          np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        np.testing.assert_allclose(a.bboxes, b.bboxes, atol=1e-3)
        np.testing.assert_allclose(a.areas, b.areas, atol=1)
  # And so the same training stream.
  config = ssd300_coco.get_config()
  config.data.train = ('coco_2017_train', 'coco_2017_val')
  config.data.max_boxes = 6
  config.solver.batch_size = 4
  config.input.image_size = 64
  config.data.coco_root, config.data.tfds_data_dir = coco_2017, ''
  from_folder = next(pipeline.create_train_iterator(config, start_step=1))
  config.data.coco_root, config.data.tfds_data_dir = '', data_dir
  from_tfds = next(pipeline.create_train_iterator(config, start_step=1))
  for key in from_folder:
    np.testing.assert_allclose(from_tfds[key], from_folder[key], atol=1e-4,
                               err_msg=key)
  assert from_folder['mask'].any()

  val = coco.folder_index(coco_2017, 'coco_2017_val', training=False)
  assert val.coco.annotations.iscrowd.sum() == 1
  assert val.coco.category_ids[1:].tolist() == [i for i, _ in coco.CATEGORIES]
