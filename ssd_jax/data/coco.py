"""COCO-format datasets: an annotation json + an image folder, or TFDS coco.

Both backends give a `records.Index` whose boxes follow the reference's
COCODataset: category ids sorted and mapped to contiguous labels 1..N (class
names from the json's categories), crowd annotations left out of the boxes,
boxes [x, y, w, h] -> (x, y, x + w, y + h) in pixels (no "-1", unlike VOC),
boxes without area dropped. Training indices leave out the images that have
no annotation at all; evaluation indices keep every image. Examples are
ordered by image id and each image's boxes by annotation id (as TFDS stores
them), so the two backends give the same index and the same training
stream.

Dataset names (the reference's, under `config.data.coco_root`):

    coco_2014_train            train2014/  annotations/instances_train2014.json
    coco_2014_valminusminival  val2014/    .../instances_valminusminival2014
    coco_2014_minival          val2014/    .../instances_minival2014.json
    coco_2014_val              val2014/    .../instances_val2014.json
    coco_2017_train            train2017/  .../instances_train2017.json
    coco_2017_val              val2017/    .../instances_val2017.json

Any other `coco_<name>` is a custom dataset: images in `<coco_root>/<name>/`,
annotations in `<coco_root>/annotations/instances_<name>.json`. With
`coco_root` empty, coco_2017_* (and coco_2014_train / coco_2014_val) are read
from TFDS `coco/2017` (`coco/2014`).

For evaluation the index also carries the COCO ground truth of its images
(`CocoInfo.annotations`, crowd boxes and the json's areas included: COCOeval
needs them) and the label -> category id map, so detections can be written
with the original image and category ids.
"""

import concurrent.futures
import dataclasses
import json
import os

import numpy as np

from ssd_jax.data import records

# name -> (image folder, annotation file), both relative to coco_root.
DATASETS = {
    'coco_2014_train': ('train2014', 'instances_train2014.json'),
    'coco_2014_valminusminival': ('val2014',
                                  'instances_valminusminival2014.json'),
    'coco_2014_minival': ('val2014', 'instances_minival2014.json'),
    'coco_2014_val': ('val2014', 'instances_val2014.json'),
    'coco_2017_train': ('train2017', 'instances_train2017.json'),
    'coco_2017_val': ('val2017', 'instances_val2017.json'),
}
# name -> (TFDS builder, split).
TFDS_SPLITS = {
    'coco_2017_train': ('coco/2017', 'train'),
    'coco_2017_val': ('coco/2017', 'validation'),
    'coco_2014_train': ('coco/2014', 'train'),
    'coco_2014_val': ('coco/2014', 'validation'),
}
PREFIX = 'coco_'

# The 80 categories of COCO 2014/2017 detection, as (id, name). TFDS keeps
# only the names; the ids written into a results file come from here.
CATEGORIES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'),
    (5, 'airplane'), (6, 'bus'), (7, 'train'), (8, 'truck'), (9, 'boat'),
    (10, 'traffic light'), (11, 'fire hydrant'), (13, 'stop sign'),
    (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'),
    (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'),
    (23, 'bear'), (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'),
    (28, 'umbrella'), (31, 'handbag'), (32, 'tie'), (33, 'suitcase'),
    (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'), (37, 'sports ball'),
    (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'),
    (41, 'skateboard'), (42, 'surfboard'), (43, 'tennis racket'),
    (44, 'bottle'), (46, 'wine glass'), (47, 'cup'), (48, 'fork'),
    (49, 'knife'), (50, 'spoon'), (51, 'bowl'), (52, 'banana'), (53, 'apple'),
    (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'), (57, 'carrot'),
    (58, 'hot dog'), (59, 'pizza'), (60, 'donut'), (61, 'cake'),
    (62, 'chair'), (63, 'couch'), (64, 'potted plant'), (65, 'bed'),
    (67, 'dining table'), (70, 'toilet'), (72, 'tv'), (73, 'laptop'),
    (74, 'mouse'), (75, 'remote'), (76, 'keyboard'), (77, 'cell phone'),
    (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'),
    (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'),
    (87, 'scissors'), (88, 'teddy bear'), (89, 'hair drier'),
    (90, 'toothbrush'))

# Images inspected at once while a folder index is built (file opens).
_IO_THREADS = 16


def is_coco_dataset(dataset_name):
  return dataset_name.startswith(PREFIX)


@dataclasses.dataclass
class CocoAnnotations:
  """COCO ground truth of A annotations, as COCOeval reads it.

  Attributes:
    ids: int64 [A] annotation ids; image_ids: int64 [A]; category_ids: int64
    [A] (original ids); bboxes: float64 [A, 4] [x, y, w, h] pixels as in the
    json; areas: float64 [A] (the json's `area`, the segment's area for
    COCO); iscrowd: bool [A].
  """
  ids: np.ndarray
  image_ids: np.ndarray
  category_ids: np.ndarray
  bboxes: np.ndarray
  areas: np.ndarray
  iscrowd: np.ndarray

  @classmethod
  def from_rows(cls, rows):
    """From (id, image_id, category_id, x, y, w, h, area, iscrowd) rows."""
    rows = np.asarray(rows, np.float64).reshape(-1, 9)
    return cls(ids=rows[:, 0].astype(np.int64),
               image_ids=rows[:, 1].astype(np.int64),
               category_ids=rows[:, 2].astype(np.int64),
               bboxes=rows[:, 3:7], areas=rows[:, 7],
               iscrowd=rows[:, 8].astype(bool))

  def select_images(self, image_ids):
    """The annotations of `image_ids`, ordered by (image id, id)."""
    keep = np.flatnonzero(np.isin(self.image_ids,
                                  np.asarray(image_ids, np.int64)))
    keep = keep[np.lexsort((self.ids[keep], self.image_ids[keep]))]
    return CocoAnnotations(**{f.name: getattr(self, f.name)[keep]
                              for f in dataclasses.fields(self)})


@dataclasses.dataclass
class CocoInfo:
  """What a COCO dataset adds to its `records.Index`.

  Attributes:
    category_ids: int64 [N + 1], contiguous label -> original category id
      ([0], background, is 0).
    class_names: N + 1 names, [0] = '__background__', then the categories'
      names by id.
    annotations: the ground truth of the index's images (evaluation
      indices), or None (training indices).
  """
  category_ids: np.ndarray
  class_names: tuple[str, ...]
  annotations: CocoAnnotations | None = None

  @property
  def num_categories(self):
    return len(self.category_ids) - 1

  def same_categories(self, other):
    return (self.class_names == other.class_names and
            np.array_equal(self.category_ids, other.category_ids))


def category_map(categories):
  """Sorted category ids -> labels 1..N, as the reference.

  Args:
    categories: iterable of (id, name).

  Returns:
    ({category id: label}, CocoInfo without annotations).
  """
  categories = sorted((int(i), str(n)) for i, n in categories)
  ids = [i for i, _ in categories]
  if len(set(ids)) != len(ids):
    raise ValueError(f'duplicate COCO category ids in {ids}')
  info = CocoInfo(
      category_ids=np.array([0] + ids, np.int64),
      class_names=('__background__',) + tuple(n for _, n in categories))
  return {cid: label for label, cid in enumerate(ids, start=1)}, info


def check_num_classes(info, num_classes, dataset_name):
  """Raises ValueError unless num_classes == categories + 1."""
  if num_classes != info.num_categories + 1:
    raise ValueError(
        f'dataset {dataset_name!r} has {info.num_categories} categories, so '
        f'config.model.num_classes must be {info.num_categories + 1} (the '
        f'categories + background), but it is {num_classes}. Set '
        f'--config.model.num_classes={info.num_categories + 1}.')


def corner_boxes(xywh, size, counts):
  """The reference's COCO boxes: (x, y, x + w, y + h), empty ones dropped.

  Args:
    xywh: float64 [k, 4] [x, y, w, h] pixels.
    size: (height, width) of the image.
    counts: drops and clips are counted in `counts.fixed`.

  Returns:
    (boxes [k', 4] float32 inside [0, W] x [0, H], keep [k] bool).
  """
  x, y, w, h = np.asarray(xywh, np.float64).reshape(-1, 4).T
  boxes = np.stack([x, y, x + w, y + h], axis=1).astype(np.float32)
  empty = ~((boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0]))
  counts.fixed['box_empty'] += int(empty.sum())
  valid, keep = records.validate_boxes(boxes[~empty], size, counts, inset=0)
  out = np.zeros(len(boxes), bool)
  out[np.flatnonzero(~empty)[keep]] = True
  return valid, out


def _finite_box(bbox):
  try:
    box = [float(v) for v in bbox]
  except (TypeError, ValueError):
    return None
  return box if len(box) == 4 and all(np.isfinite(box)) else None


# ------------------------------------------------------------------ folders ---


def _dataset_paths(coco_root, dataset_name):
  if dataset_name in DATASETS:
    folder, ann_file = DATASETS[dataset_name]
  else:
    name = dataset_name[len(PREFIX):]
    folder, ann_file = name, f'instances_{name}.json'
  return (os.path.join(coco_root, folder),
          os.path.join(coco_root, 'annotations', ann_file))


def read_annotation_file(path, dataset_name):
  """The json as a dict; a clear error when it is missing or malformed."""
  if not os.path.isfile(path):
    raise records.DatasetNotFoundError(
        f'dataset {dataset_name!r}: {path} does not exist. Point '
        '--config.data.coco_root at a folder holding train2014/, val2014/ '
        '(or train2017/, val2017/) and annotations/instances_<split>.json; '
        "for coco_2017_train/val, --config.data.coco_root='' reads TFDS "
        'coco/2017. See docs/datasets.md.')
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(data, dict) or not isinstance(data.get(k),
                                                             list)]
  if missing:
    raise ValueError(f'{path} is not a COCO instances file: no list '
                     f'{missing} (a COCO json has "images", "annotations" '
                     'and "categories").')
  return data


def _json_categories(data, path):
  try:
    return [(int(c['id']), str(c['name'])) for c in data['categories']]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: a category without an integer "id" and a '
                     f'"name": {e}') from e


def _json_images(data, path):
  """{image id: file_name}; images without id or file_name are an error."""
  images = {}
  for image in data['images']:
    try:
      images[int(image['id'])] = str(image['file_name'])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{path}: an image without an integer "id" and a '
                       f'"file_name": {image!r:.200}') from e
  return images


def _annotation_rows(data, images, label_of, counts):
  """Valid annotations as CocoAnnotations; unusable ones counted."""
  rows = []
  for k, ann in enumerate(data['annotations']):
    try:
      image_id = int(ann['image_id'])
      category_id = int(ann['category_id'])
    except (KeyError, TypeError, ValueError):
      counts.fixed['annotation_malformed'] += 1
      continue
    if image_id not in images:
      counts.fixed['annotation_unknown_image'] += 1
      continue
    if category_id not in label_of:
      counts.fixed['unknown_category'] += 1
      continue
    box = _finite_box(ann.get('bbox'))
    if box is None:
      counts.fixed['object_without_box'] += 1
      continue
    area = ann.get('area')
    try:
      area = float(area)
    except (TypeError, ValueError):
      area = box[2] * box[3]
    rows.append((ann.get('id', k + 1), image_id, category_id, *box, area,
                 bool(ann.get('iscrowd', 0))))
  return CocoAnnotations.from_rows(rows)


def _folder_example(image_id, path, annotations, rows, label_of):
  """One image file and its annotations, checked.

  Returns:
    (records.Example, records.Counts), or (None, records.Counts) when the
    image is skipped.
  """
  counts = records.Counts()
  try:
    is_jpeg, size = records.inspect_image_file(path, counts)
  except records.SkipExample as skip:
    counts.skipped[skip.reason] += 1
    return None, counts
  return _annotated_example(str(image_id), size, is_jpeg, annotations, rows,
                            label_of, path, counts), counts


def _annotated_example(image_id, size, is_jpeg, annotations, rows, label_of,
                       source, counts):
  """The `records.Example` of one checked image and its annotations.

  Args:
    image_id: the COCO image id, as a string.
    size: (height, width) of the image.
    is_jpeg: the image bytes are a JPEG.
    annotations: CocoAnnotations holding the image's annotations.
    rows: int64 [a] rows of `annotations` that belong to the image.
    label_of: {category id: label}.
    source: the image's path.
    counts: crowd boxes and box fixes are counted here.
  """
  crowd = annotations.iscrowd[rows]
  counts.fixed['crowd'] += int(crowd.sum())
  rows = rows[~crowd]
  boxes, keep = corner_boxes(annotations.bboxes[rows], size, counts)
  labels = np.array([label_of[c] for c in annotations.category_ids[rows]],
                    np.int32)[keep]
  return records.Example(image_id, size, is_jpeg, boxes, labels,
                         np.zeros(len(labels), bool), source)


def _rows_by_image(annotations):
  """{image id: int64 rows of `annotations`}, rows by annotation id (the
  order TFDS stores them in)."""
  order = np.lexsort((annotations.ids, annotations.image_ids))
  ids, starts = np.unique(annotations.image_ids[order], return_index=True)
  return {int(i): rows for i, rows in zip(ids, np.split(order, starts[1:]))}


def _index(examples, counts, info, annotations, training):
  examples.sort(key=lambda e: int(e.image_id))
  index = records.Index.from_examples(examples, counts, blobs=False)
  if not training:
    info = dataclasses.replace(info, annotations=annotations.select_images(
        [int(e.image_id) for e in examples]))
  index.coco = info
  return index


def folder_index(coco_root, dataset_name, *, training):
  """Index of a COCO-format folder dataset (see the module docstring).

  Args:
    coco_root: the folder holding the image folders and annotations/.
    dataset_name: e.g. 'coco_2014_minival'.
    training: leave out images without annotations, and keep no ground
      truth for COCOeval.

  Raises:
    records.DatasetNotFoundError: no annotation file.
    ValueError: the annotation file is not a COCO instances file.
  """
  image_dir, ann_path = _dataset_paths(coco_root, dataset_name)
  data = read_annotation_file(ann_path, dataset_name)
  label_of, info = category_map(_json_categories(data, ann_path))
  images = _json_images(data, ann_path)
  counts = records.Counts()
  annotations = _annotation_rows(data, images, label_of, counts)
  del data
  rows_of = _rows_by_image(annotations)
  counts.num_listed = len(images)
  listed = sorted(images)
  if training:
    counts.skipped['no_annotations'] += sum(i not in rows_of for i in listed)
    listed = [i for i in listed if i in rows_of]
  empty_rows = np.zeros(0, np.int64)
  with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
    results = pool.map(
        lambda i: _folder_example(
            i, os.path.join(image_dir, images[i]), annotations,
            rows_of.get(i, empty_rows), label_of),
        listed)
    examples = []
    for example, example_counts in results:
      counts.merge(example_counts)
      if example is not None:
        examples.append(example)
  return _index(examples, counts, info, annotations, training)


# --------------------------------------------------------------------- TFDS ---


def tfds_index(dataset_name, data_dir='', *, training, image_cache_dir=''):
  """Index of a TFDS coco split, equal to `folder_index` of the same files.

  TFDS keeps the category names (not the ids: they come from `CATEGORIES`),
  the image and annotation ids, `is_crowd`, `area` (rounded to an integer)
  and boxes (ymin, xmin, ymax, xmax) divided by the json's image size; they
  are turned back into pixels, snapped to 1/100 px (the json's precision;
  the float32 round trip is off by ~1e-5 px).

  The encoded images are not kept in memory (118k COCO images are ~19 GB):
  on first use each is written once, as a file, into `image_cache_dir`
  (default `<TFDS data dir>/ssd_jax_images/<builder>/<split>`) and then read
  like the folder backend's.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if dataset_name not in TFDS_SPLITS:
    raise ValueError(
        f'dataset {dataset_name!r} is not in TFDS (only '
        f'{sorted(TFDS_SPLITS)}); set --config.data.coco_root to read a '
        'COCO folder.')
  name, split = TFDS_SPLITS[dataset_name]
  builder = records.tfds_builder(name, data_dir)
  names = builder.info.features['objects']['label'].names
  known = dict((n, i) for i, n in CATEGORIES)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'TFDS {name}: categories {unknown} are not COCO\'s; '
                     'the category ids cannot be recovered.')
  label_of, info = category_map((known[n], n) for n in names)
  category_of_tfds_label = np.array([known[n] for n in names], np.int64)
  cache = image_cache_dir or os.path.join(
      builder.data_dir_root, 'ssd_jax_images', name.replace('/', '_'), split)
  os.makedirs(cache, exist_ok=True)
  counts = records.Counts()
  examples, rows = [], []
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  for ex in ds.as_numpy_iterator():
    counts.num_listed += 1
    image_id = int(ex['image/id'])
    objects = ex['objects']
    if training and not len(objects['id']):
      counts.skipped['no_annotations'] += 1
      continue
    data = ex['image']
    try:
      is_jpeg, size = records.inspect_image(data, counts)
    except records.SkipExample as skip:
      counts.skipped[skip.reason] += 1
      continue
    height, width = size
    ymin, xmin, ymax, xmax = np.asarray(objects['bbox'], np.float64).reshape(
        -1, 4).T
    x, y = _snap_to_centipixels(xmin * width), _snap_to_centipixels(
        ymin * height)
    w = _snap_to_centipixels(xmax * width) - x
    h = _snap_to_centipixels(ymax * height) - y
    image_rows = np.stack([
        objects['id'], np.full(len(x), image_id),
        category_of_tfds_label[objects['label']], x, y, w, h,
        objects['area'], objects['is_crowd']], axis=1).astype(np.float64)
    rows.append(image_rows)
    path = os.path.join(cache, os.path.basename(
        ex['image/filename'].decode()))
    _write_once(path, data)
    annotations = CocoAnnotations.from_rows(image_rows)
    examples.append(_annotated_example(
        str(image_id), size, is_jpeg, annotations,
        np.arange(len(image_rows)), label_of, path, counts))
  annotations = CocoAnnotations.from_rows(
      np.concatenate(rows) if rows else np.zeros((0, 9)))
  return _index(examples, counts, info, annotations, training)


def _snap_to_centipixels(values):
  """Rounds pixel values to 1/100 px where within 1e-3 px of it."""
  scaled = values * 100
  rounded = np.round(scaled)
  return np.where(np.abs(scaled - rounded) < 0.1, rounded / 100, values)


def _write_once(path, data):
  if os.path.exists(path):
    return
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    raise OSError(f'cannot write the TFDS image cache file {path} ({e}); '
                  'make its folder writable, or read a COCO folder with '
                  '--config.data.coco_root.') from e


# -------------------------------------------------------------------- entry ---


def coco_index(coco_root, tfds_data_dir, dataset_name, *, training):
  """Index of a COCO dataset: the folder (coco_root set) or TFDS.

  Args:
    coco_root: config.data.coco_root ('' = TFDS).
    tfds_data_dir: config.data.tfds_data_dir ('' = TFDS's default).
    dataset_name: e.g. 'coco_2014_minival'.
    training: leave out images without annotations, and keep no ground
      truth for COCOeval.

  Raises:
    records.DatasetNotFoundError: the dataset is not there.
  """
  if coco_root:
    return folder_index(coco_root, dataset_name, training=training)
  if dataset_name not in TFDS_SPLITS:
    raise records.DatasetNotFoundError(
        f'dataset {dataset_name!r} needs --config.data.coco_root (a folder '
        'with the images and annotations/instances_<split>.json); only '
        f'{sorted(TFDS_SPLITS)} can come from TFDS. See docs/datasets.md.')
  return tfds_index(dataset_name, tfds_data_dir, training=training)
