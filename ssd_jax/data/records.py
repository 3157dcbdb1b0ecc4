"""What the VOC and COCO sources share: the index, its records and checks.

`sources.py` (VOC-format folders and TFDS voc) and `coco.py` (COCO json +
folder and TFDS coco) both turn a dataset into an `Index`, one `Example` per
usable image, with the same image checks (`inspect_image`), box checks
(`validate_boxes`) and counters (`Counts`, keyed by `SKIP_REASONS` and
`FIX_REASONS`). An example found unusable raises `SkipExample`, which the
source catches and counts.

Box convention: pixel corner boxes (xmin, ymin, xmax, ymax). VOC boxes are
0-based inclusive pixel indices (XML - 1, inside [0, W-1] x [0, H-1]); COCO
boxes are continuous (inside [0, W] x [0, H]). Sizes are (height, width).
"""

import collections
import dataclasses
import io
import os

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


class SkipExample(Exception):
  """An example is unusable; `reason` (args[0]) is a key of SKIP_REASONS."""

  @property
  def reason(self):
    return self.args[0]


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
class Example:
  """One usable image and its k objects, before it joins an `Index`.

  Attributes:
    image_id: the VOC id, or the COCO image id as a string.
    size: (height, width) of the image.
    is_jpeg: the bytes are a JPEG (else PNG/GIF/BMP).
    boxes: [k, 4] float32 pixel corner boxes (see the module docstring).
    labels: [k] int32 in 1..C-1.
    difficult: [k] bool.
    source: the image's path, or its encoded bytes.
  """
  image_id: str
  size: tuple[int, int]
  is_jpeg: bool
  boxes: np.ndarray
  labels: np.ndarray
  difficult: np.ndarray
  source: str | bytes


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
    boxes: [K, 4] float32 pixel corner boxes: VOC 0-based (XML - 1), inside
      [0, W-1] x [0, H-1]; COCO inside [0, W] x [0, H]; xmin <= xmax and
      ymin <= ymax.
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
    """Builds an index from a list of `Example`s.

    Args:
      examples: the `Example`s, in index order.
      counts: the `Counts` of building them.
      blobs: the examples' `source`s are encoded bytes (else paths).
    """
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


def inspect_image(data, counts):
  """Checks encoded image bytes without decoding the pixels.

  Args:
    data: a binary file object (read from its start) or bytes.
    counts: fixes (`converted_to_rgb`, `not_jpeg`) are counted here.

  Returns:
    (is_jpeg, (height, width)).

  Raises:
    SkipExample: 'unreadable_image', 'unsupported_format' or
      'truncated_image'.
  """
  f = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    with Image.open(f) as image:
      image_format, mode, (width, height) = image.format, image.mode, image.size
  except (OSError, SyntaxError, ValueError) as e:  # PIL's "cannot identify"
    raise SkipExample('unreadable_image') from e
  if image_format not in _DECODABLE_FORMATS:
    raise SkipExample('unsupported_format')
  end_marker = {'JPEG': b'\xff\xd9', 'PNG': b'IEND', 'GIF': b'\x3b'}.get(
      image_format)
  if end_marker:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    if end_marker not in f.read():
      raise SkipExample('truncated_image')
  if image_format != 'JPEG':
    counts.fixed['not_jpeg'] += 1
  if mode != 'RGB':
    counts.fixed['converted_to_rgb'] += 1
  return image_format == 'JPEG', (height, width)


def inspect_image_file(path, counts):
  """`inspect_image` of the file at `path`.

  Raises:
    SkipExample: 'missing_image' when the file cannot be opened, or
      `inspect_image`'s reasons.
  """
  try:
    image_file = open(path, 'rb')
  except OSError as e:
    raise SkipExample('missing_image') from e
  with image_file:
    return inspect_image(image_file, counts)


def validate_boxes(boxes, size, counts, *, inset=1):
  """Makes pixel boxes consistent with an image of `size` = (height, width).

  Inverted boxes and boxes entirely outside [0, W-inset] x [0, H-inset] are
  dropped, boxes partly outside are clipped to it; all counted in
  `counts.fixed`. inset=1 for VOC's inclusive pixel coordinates, 0 for
  COCO's continuous ones.
  Zero-area boxes are kept (the evaluator scores them as 1-pixel boxes, as
  the reference does); the training pipeline drops them.

  Args:
    boxes: [k, 4] float32 pixel corner boxes.
    size: (height, width).
    counts: drops and clips are counted here.
    inset: see above.

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


def tfds_builder(name, data_dir):
  """The prepared TFDS builder `name` (e.g. 'voc/2007') in `data_dir`.

  Raises:
    DatasetNotFoundError: it is not prepared (the message says how to).
  """
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
