"""Where examples come from: VOC-format folders or TFDS, as a host-side index.

Both backends produce the same `Index` for the same images: annotations parsed
on the host and checked once, image bytes read later inside tf.data.

Box convention everywhere in this module: pixel corner boxes
(xmin, ymin, xmax, ymax), 0-based as the reference parses VOC, i.e. every XML
coordinate minus 1, so a box covering the whole W x H image is
(0, 0, W-1, H-1). Labels index `config.data.class_names` (0 = background).

Dataset names are the reference's: `voc_2007_trainval`, `voc_2007_test`,
`voc_2012_trainval`, `voc_2007_train`, `voc_2007_val`, ... With
`config.data.voc_root` set they are read from `<voc_root>/VOC2007/...`; any
other `<name>_<split>` reads `<voc_root>/<name>/ImageSets/Main/<split>.txt`,
which is how a custom VOC-format dataset is used. With `voc_root` empty, the
VOC names are read from TFDS (`voc/2007`, `voc/2012`; trainval = train +
validation).

Bad input never raises here: an example whose image or annotation cannot be
used is left out and counted, a box is clipped to the image or dropped and
counted (see `Counts`). Only a missing dataset raises `DatasetNotFoundError`.
"""

import collections
import dataclasses
import io
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image
import tensorflow as tf

from ssd_jax import data as data_lib

data_lib.hide_gpus_from_tensorflow()

# Formats tf.io.decode_image reads (first frame of a GIF).
_DECODABLE_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')
# A file whose end-of-image marker is not within this many last bytes is
# taken as truncated (trailing padding after the marker is allowed).
_TAIL_BYTES = 1024
_SPLIT_RE = re.compile(r'^(?P<prefix>.+)_(?P<split>[^_]+)$')
_VOC_YEAR_RE = re.compile(r'^voc_(?P<year>\d{4})$')
_TFDS_SPLITS = {
    'trainval': ('train', 'validation'),
    'train': ('train',),
    'val': ('validation',),
    'test': ('test',),
}

# Why an example is left out (skip) or an annotation is changed (fix). The
# keys are what the log line shows.
SKIP_REASONS = {
    'missing_annotation': 'no XML file for the image id',
    'bad_annotation': 'the XML does not parse',
    'missing_image': 'no image file',
    'unreadable_image': 'not an image (garbage or empty bytes)',
    'truncated_image': 'the image file ends early',
    'unsupported_format': 'an image format TF cannot decode',
    'decode_error': 'the image failed to decode inside tf.data',
    'no_annotations': 'COCO training image without annotations (as the '
                      'reference)',
}
FIX_REASONS = {
    'size_from_image': 'XML without <size>: size read from the image',
    'size_mismatch': 'XML <size> differs from the image: image size used',
    'object_without_box': 'object without a usable <bndbox>: dropped',
    'unknown_class': 'object name not in class_names: dropped',
    'box_inverted': 'xmax < xmin or ymax < ymin: dropped',
    'box_outside_image': 'box entirely outside the image: dropped',
    'box_clipped': 'box partly outside the image: clipped',
    'box_zero_area': 'training box with xmin == xmax or ymin == ymax: dropped',
    'converted_to_rgb': 'grayscale/CMYK/palette/alpha image decoded as RGB',
    'not_jpeg': 'a PNG/GIF/BMP under a .jpg name: decoded by content',
    'no_objects': 'training image without objects: kept as background',
    'too_many_boxes': 'training image with more than max_boxes: truncated',
    'crowd': 'COCO crowd annotation: not a box (COCOeval still sees it)',
    'box_empty': 'COCO box with w <= 0 or h <= 0: dropped',
    'annotation_malformed': 'COCO annotation without image_id/category_id',
    'annotation_unknown_image': 'COCO annotation of an image not in '
                                '"images": dropped',
    'unknown_category': 'COCO annotation of a category not in "categories": '
                        'dropped',
}


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not where the config says; the message says how to get it."""


class Counts:
  """Counters of skipped examples and fixed annotations, with a log line."""

  def __init__(self):
    self.num_listed = 0  # examples listed by the split files
    self.skipped = collections.Counter()
    self.fixed = collections.Counter()
    # object name -> count of the objects dropped as 'unknown_class'
    self.unknown_classes = collections.Counter()

  def merge(self, other):
    self.num_listed += other.num_listed
    self.skipped.update(other.skipped)
    self.fixed.update(other.fixed)
    self.unknown_classes.update(other.unknown_classes)
    return self

  @property
  def num_fixed(self):
    return sum(self.fixed.values())

  @property
  def num_skipped(self):
    return sum(self.skipped.values())

  def summary(self):
    """`skipped N of M examples (reason: count, ...)[; fixed (...)]`."""
    line = f'skipped {self.num_skipped} of {self.num_listed} examples'
    if self.num_skipped:
      line += ' (' + _format_counter(self.skipped) + ')'
    fixed = +self.fixed  # drops zero counts
    if fixed:
      line += '; fixed (' + _format_counter(fixed) + ')'
    return line

  def __repr__(self):
    return f'Counts({self.summary()})'


def _format_counter(counter):
  return ', '.join(f'{key}: {counter[key]}' for key in sorted(counter))


@dataclasses.dataclass
class Index:
  """The usable examples of one or more datasets, annotations on the host.

  N examples, K objects in all. Object arrays are flat; the objects of example
  i are rows `row_splits[i]:row_splits[i+1]`.

  Attributes:
    image_ids: [N] str.
    sizes: [N, 2] int32 (height, width) of the image (the XML size; the
      decoded size where the XML has none or disagrees).
    is_jpeg: [N] bool, the bytes are a JPEG (else PNG/GIF/BMP).
    row_splits: [N + 1] int64.
    boxes: [K, 4] float32 pixel corner boxes, 0-based (XML - 1), inside
      [0, W-1] x [0, H-1], xmin <= xmax and ymin <= ymax.
    labels: [K] int32 in 1..C-1.
    difficult: [K] bool.
    paths: [N] str image paths (folder backend), or None.
    blobs: [N] object array of encoded image bytes (TFDS backend), or None.
    counts: what was skipped or fixed while building the index.
    coco: COCO datasets: `coco.CocoInfo` (image_ids are then the COCO image
      ids as strings, boxes follow the COCO rules of data/coco.py); None for
      VOC.
  """
  image_ids: np.ndarray
  sizes: np.ndarray
  is_jpeg: np.ndarray
  row_splits: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  difficult: np.ndarray
  paths: np.ndarray | None
  blobs: np.ndarray | None
  counts: Counts
  coco: object = None

  def __len__(self):
    return len(self.image_ids)

  def objects(self, i):
    """(boxes [k, 4], labels [k], difficult [k]) of example i."""
    lo, hi = self.row_splits[i], self.row_splits[i + 1]
    return self.boxes[lo:hi], self.labels[lo:hi], self.difficult[lo:hi]

  @property
  def max_objects(self):
    return int(np.max(np.diff(self.row_splits), initial=0))

  @classmethod
  def from_examples(cls, examples, counts, *, blobs):
    """Builds an index from a list of `_Example`s."""
    num = [len(e.labels) for e in examples]
    row_splits = np.zeros(len(examples) + 1, np.int64)
    row_splits[1:] = np.cumsum(num)
    cat = lambda parts, dtype, shape: (np.concatenate(parts).astype(dtype)
                                       if parts else np.zeros(shape, dtype))
    return cls(
        image_ids=np.array([e.image_id for e in examples], dtype=str),
        sizes=np.array([e.size for e in examples], np.int32).reshape(-1, 2),
        is_jpeg=np.array([e.is_jpeg for e in examples], bool),
        row_splits=row_splits,
        boxes=cat([e.boxes for e in examples], np.float32, (0, 4)),
        labels=cat([e.labels for e in examples], np.int32, (0,)),
        difficult=cat([e.difficult for e in examples], bool, (0,)),
        paths=(None if blobs else
               np.array([e.source for e in examples], dtype=str)),
        blobs=(_object_array([e.source for e in examples]) if blobs else
               None),
        counts=counts)

  @classmethod
  def concatenate(cls, indices):
    """One index holding the examples of `indices` in order."""
    if len(indices) == 1:
      return indices[0]
    if len({ix.blobs is None for ix in indices}) != 1:
      raise ValueError('cannot mix folder and TFDS datasets in one index')
    coco = indices[0].coco
    if any((ix.coco is None) != (coco is None) or
           (coco is not None and not coco.same_categories(ix.coco))
           for ix in indices):
      raise ValueError('cannot mix datasets with different classes (VOC and '
                       'COCO, or COCO files with different categories) in '
                       'one index')
    if coco is not None and coco.annotations is not None:
      raise ValueError('COCO evaluation indices are not concatenated')
    offsets = np.cumsum([0] + [ix.row_splits[-1] for ix in indices[:-1]])
    counts = Counts()
    for ix in indices:
      counts.merge(ix.counts)
    cat = lambda name: np.concatenate([getattr(ix, name) for ix in indices])
    return cls(
        image_ids=cat('image_ids'), sizes=cat('sizes'), is_jpeg=cat('is_jpeg'),
        row_splits=np.concatenate(
            [[0]] + [ix.row_splits[1:] + off
                     for ix, off in zip(indices, offsets)]).astype(np.int64),
        boxes=cat('boxes'), labels=cat('labels'), difficult=cat('difficult'),
        paths=None if indices[0].paths is None else cat('paths'),
        blobs=None if indices[0].blobs is None else _object_array(
            [b for ix in indices for b in ix.blobs]),
        counts=counts, coco=coco)


def _object_array(items):
  out = np.empty(len(items), dtype=object)
  out[:] = items
  return out


@dataclasses.dataclass
class _Example:
  image_id: str
  size: tuple[int, int]  # (height, width)
  is_jpeg: bool
  boxes: np.ndarray  # [k, 4] float32
  labels: np.ndarray  # [k] int32
  difficult: np.ndarray  # [k] bool
  source: str | bytes  # path or encoded bytes


class _Skip(Exception):
  """An example is unusable; args[0] is a key of SKIP_REASONS."""


# ----------------------------------------------------------------- parsing ---


def parse_voc_xml(xml_text, class_names, counts):
  """Parses one VOC annotation as the reference does.

  For each <object>: name lower-cased and stripped, the four <bndbox>
  coordinates as floats minus 1, <difficult> as int (empty or absent = 0).
  Objects without a usable <bndbox> or with a name outside `class_names` are
  dropped and counted in `counts.fixed`.

  Returns:
    (size, boxes [k, 4] float32, labels [k] int32, difficult [k] bool), size =
    (height, width) from <size> or None when it is absent or not positive.

  Raises:
    _Skip('bad_annotation'): the text is not XML.
  """
  try:
    root = ET.fromstring(xml_text)
  except ET.ParseError as e:
    raise _Skip('bad_annotation') from e
  class_index = {name: i for i, name in enumerate(class_names)}
  boxes, labels, difficult = [], [], []
  for obj in root.iter('object'):
    name = (obj.findtext('name') or '').lower().strip()
    try:
      bndbox = obj.find('bndbox')
      box = [float(bndbox.findtext(tag)) - 1
             for tag in ('xmin', 'ymin', 'xmax', 'ymax')]
      if not all(np.isfinite(box)):
        raise ValueError(box)
    except (AttributeError, TypeError, ValueError):
      counts.fixed['object_without_box'] += 1
      continue
    if name not in class_index or class_index[name] == 0:
      counts.fixed['unknown_class'] += 1
      counts.unknown_classes[name] += 1
      continue
    flag = (obj.findtext('difficult') or '').strip()
    boxes.append(box)
    labels.append(class_index[name])
    difficult.append(bool(int(flag)) if flag.isdigit() else False)
  try:
    size = (int(root.findtext('size/height')), int(root.findtext('size/width')))
    size = size if min(size) > 0 else None
  except (TypeError, ValueError):
    size = None
  return (size, np.array(boxes, np.float32).reshape(-1, 4),
          np.array(labels, np.int32), np.array(difficult, bool))


def inspect_image(data, counts):
  """Checks encoded image bytes without decoding the pixels.

  Args:
    data: a binary file object (read from its start) or bytes.
    counts: fixes (`converted_to_rgb`, `not_jpeg`) are counted here.

  Returns:
    (is_jpeg, (height, width)).

  Raises:
    _Skip: 'unreadable_image', 'unsupported_format' or 'truncated_image'.
  """
  f = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    with Image.open(f) as image:
      image_format, mode, (width, height) = image.format, image.mode, image.size
  except (OSError, SyntaxError, ValueError) as e:  # PIL's "cannot identify"
    raise _Skip('unreadable_image') from e
  if image_format not in _DECODABLE_FORMATS:
    raise _Skip('unsupported_format')
  end_marker = {'JPEG': b'\xff\xd9', 'PNG': b'IEND', 'GIF': b'\x3b'}.get(
      image_format)
  if end_marker:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    if end_marker not in f.read():
      raise _Skip('truncated_image')
  if image_format != 'JPEG':
    counts.fixed['not_jpeg'] += 1
  if mode != 'RGB':
    counts.fixed['converted_to_rgb'] += 1
  return image_format == 'JPEG', (height, width)


def validate_boxes(boxes, size, counts, *, inset=1):
  """Makes pixel boxes consistent with an image of `size` = (height, width).

  Inverted boxes and boxes entirely outside [0, W-inset] x [0, H-inset] are
  dropped, boxes partly outside are clipped to it; all counted in
  `counts.fixed`. inset=1 for VOC's inclusive pixel coordinates, 0 for
  COCO's continuous ones.
  Zero-area boxes are kept (the evaluator scores them as 1-pixel boxes, as
  the reference does); the training pipeline drops them.

  Returns:
    (boxes [k', 4] float32, keep [k] bool).
  """
  height, width = size
  x1, y1, x2, y2 = boxes.T
  inverted = (x2 < x1) | (y2 < y1)
  outside = ~inverted & ((x1 > width - inset) | (y1 > height - inset) |
                         (x2 < 0) | (y2 < 0))
  keep = ~inverted & ~outside
  limits = np.array([width - inset, height - inset] * 2, np.float32)
  clipped = np.clip(boxes, 0, limits)
  changed = keep & np.any(clipped != boxes, axis=1)
  counts.fixed['box_inverted'] += int(inverted.sum())
  counts.fixed['box_outside_image'] += int(outside.sum())
  counts.fixed['box_clipped'] += int(changed.sum())
  return clipped[keep], keep


def _make_example(image_id, xml_text, image_data, source, class_names, counts):
  """Checks one image + annotation pair; raises _Skip if it is unusable."""
  xml_size, boxes, labels, difficult = parse_voc_xml(xml_text, class_names,
                                                     counts)
  is_jpeg, size = inspect_image(image_data, counts)
  if xml_size is None:
    counts.fixed['size_from_image'] += 1
  elif xml_size != size:
    counts.fixed['size_mismatch'] += 1
  boxes, keep = validate_boxes(boxes, size, counts)
  return _Example(image_id, size, is_jpeg, boxes, labels[keep],
                  difficult[keep], source)


# ------------------------------------------------------------------ folders ---


def _folder_dir(voc_root, prefix):
  match = _VOC_YEAR_RE.match(prefix)
  return os.path.join(voc_root,
                      f'VOC{match["year"]}' if match else prefix)


def folder_index(voc_root, dataset_name, class_names):
  """Index of a VOC-format folder dataset (see the module docstring)."""
  prefix, split = _split_name(dataset_name)
  base = _folder_dir(voc_root, prefix)
  split_file = os.path.join(base, 'ImageSets', 'Main', f'{split}.txt')
  if not os.path.isfile(split_file):
    raise DatasetNotFoundError(
        f'dataset {dataset_name!r}: {split_file} does not exist. Point '
        '--config.data.voc_root at a folder holding VOC2007/ and VOC2012/ '
        '(VOCdevkit layout: JPEGImages, Annotations, ImageSets/Main), or set '
        "--config.data.voc_root='' to read TFDS voc/2007 and voc/2012. "
        'See docs/datasets.md.')
  with open(split_file) as f:
    image_ids = [line.strip() for line in f if line.strip()]
  counts = Counts()
  counts.num_listed = len(image_ids)
  examples = []
  for image_id in image_ids:
    xml_path = os.path.join(base, 'Annotations', f'{image_id}.xml')
    image_path = os.path.join(base, 'JPEGImages', f'{image_id}.jpg')
    try:
      try:
        with open(xml_path, 'rb') as f:
          xml_text = f.read()
      except OSError as e:
        raise _Skip('missing_annotation') from e
      try:
        image_file = open(image_path, 'rb')
      except OSError as e:
        raise _Skip('missing_image') from e
      with image_file:
        examples.append(_make_example(image_id, xml_text, image_file,
                                      image_path, class_names, counts))
    except _Skip as skip:
      counts.skipped[skip.args[0]] += 1
  return Index.from_examples(examples, counts, blobs=False)


def _split_name(dataset_name):
  match = _SPLIT_RE.match(dataset_name)
  if not match:
    raise ValueError(f'dataset name {dataset_name!r} is not <name>_<split>, '
                     'e.g. voc_2007_trainval')
  return match['prefix'], match['split']


# --------------------------------------------------------------------- TFDS ---


def _tfds_split(dataset_name):
  prefix, split = _split_name(dataset_name)
  match = _VOC_YEAR_RE.match(prefix)
  if not match or split not in _TFDS_SPLITS:
    raise ValueError(
        f'dataset {dataset_name!r} is not in TFDS (only voc_2007_* and '
        f'voc_2012_* with splits {sorted(_TFDS_SPLITS)}); set '
        '--config.data.voc_root to read a VOC-format folder.')
  return f'voc/{match["year"]}', _TFDS_SPLITS[split]


def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f'TFDS dataset {name} is not prepared in {builder.data_dir_root}. '
        f'Either build it: `tfds build {name}` (downloads the VOC tar files), '
        f'or, with the VOC tar files at hand, `tfds build {name} '
        '--manual_dir=DIR_WITH_THE_TARS` (no download); pass '
        '--config.data.tfds_data_dir if it lives elsewhere. Or read a '
        'VOCdevkit folder with --config.data.voc_root=PATH. See '
        'docs/datasets.md.')
  return builder


def _snap(values, tolerance=1e-3):
  """Rounds values within `tolerance` of an integer (TFDS float32 noise)."""
  rounded = np.round(values)
  return np.where(np.abs(values - rounded) < tolerance, rounded, values)


def tfds_index(dataset_name, class_names, data_dir=''):
  """Index of a TFDS VOC split, equal to `folder_index` of the same files.

  TFDS stores boxes as (ymin, xmin, ymax, xmax) divided by the XML size, with
  no "-1". They are turned back into the folder backend's pixel boxes:
  value * size - 1, snapped to the integer VOC coordinates (the float32
  round trip is off by ~1e-5 px). Examples are ordered by image id (the
  ImageSets order), so both backends give the same index.

  Holds the encoded images in host memory (about 1.7 GB for VOC07+12
  trainval, twice that while a pipeline reads them): TFDS's record files
  are not random access.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, splits = _tfds_split(dataset_name)
  builder = _tfds_builder(name, data_dir)
  tfds_names = builder.info.features['objects']['label'].names
  class_index = {n: i for i, n in enumerate(class_names)}
  counts = Counts()
  examples = []
  for split in splits:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    for ex in ds.as_numpy_iterator():
      counts.num_listed += 1
      image_id = os.path.splitext(ex['image/filename'].decode())[0]
      data = ex['image']
      objects = ex['objects']
      try:
        is_jpeg, size = inspect_image(data, counts)
        height, width = size
        ymin, xmin, ymax, xmax = np.asarray(objects['bbox'], np.float64).T
        pixel = np.stack([xmin * width, ymin * height, xmax * width,
                          ymax * height], axis=1).reshape(-1, 4) - 1
        names = [tfds_names[l].lower().strip() for l in objects['label']]
        known = np.array([class_index.get(n, 0) > 0 for n in names], bool)
        counts.fixed['unknown_class'] += int((~known).sum())
        counts.unknown_classes.update(
            n for n, k in zip(names, known) if not k)
        labels = np.array([class_index[n] for n in names if n in class_index
                           and class_index[n] > 0], np.int32)
        difficult = np.asarray(objects['is_difficult'], bool)[known]
        boxes, keep = validate_boxes(
            _snap(pixel[known]).astype(np.float32), size, counts)
        examples.append(_Example(image_id, size, is_jpeg, boxes, labels[keep],
                                 difficult[keep], data))
      except _Skip as skip:
        counts.skipped[skip.args[0]] += 1
  examples.sort(key=lambda e: e.image_id)
  return Index.from_examples(examples, counts, blobs=True)


# -------------------------------------------------------------------- entry ---


def load_index(config, dataset_name, *, training=False):
  """Index of one dataset, from the backend the config picks.

  Args:
    config: uses `data.voc_root` ('' = TFDS), `data.coco_root` (COCO
      datasets, '' = TFDS), `data.tfds_data_dir`, `data.class_names` (VOC;
      a COCO dataset's names come from its categories).
    dataset_name: e.g. 'voc_2007_trainval', 'coco_2014_minival'.
    training: COCO only: leave out images without annotations and keep no
      ground truth for COCOeval (see data/coco.py).

  Raises:
    DatasetNotFoundError: the dataset is not there (the message says how to
      get it).
  """
  from ssd_jax.data import coco  # pylint: disable=g-import-not-at-top
  if coco.is_coco_dataset(dataset_name):
    return coco.load_index(config.data.get('coco_root', ''),
                           config.data.tfds_data_dir, dataset_name,
                           training=training)
  class_names = tuple(config.data.class_names)
  if config.data.voc_root:
    return folder_index(config.data.voc_root, dataset_name, class_names)
  return tfds_index(dataset_name, class_names, config.data.tfds_data_dir)


def image_reader(index):
  """A TF function: example number (int64 scalar) -> encoded image bytes.

  Pure graph ops (no Python inside tf.data): file reads for the folder
  backend, a hash table of the in-memory bytes for TFDS.
  """
  if index.paths is not None:
    paths = tf.constant(index.paths)
    return lambda i: tf.io.read_file(tf.gather(paths, i))
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.range(len(index), dtype=tf.int64),
          tf.constant(list(index.blobs), dtype=tf.string)),
      default_value=b'')
  return table.lookup
