"""Where examples come from: VOC-format folders or TFDS, as a host-side index.

Both backends produce the same `records.Index` for the same images:
annotations parsed on the host and checked once, image bytes read later
inside tf.data.

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
counted (see `records.Counts`). Only a missing dataset raises
`records.DatasetNotFoundError`. `voc_index` picks the backend.
"""

import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from ssd_jax.data import records

_SPLIT_RE = re.compile(r'^(?P<prefix>.+)_(?P<split>[^_]+)$')
_VOC_YEAR_RE = re.compile(r'^voc_(?P<year>\d{4})$')
_TFDS_SPLITS = {
    'trainval': ('train', 'validation'),
    'train': ('train',),
    'val': ('validation',),
    'test': ('test',),
}


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
    records.SkipExample('bad_annotation'): the text is not XML.
  """
  try:
    root = ET.fromstring(xml_text)
  except ET.ParseError as e:
    raise records.SkipExample('bad_annotation') from e
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


def _checked_voc_example(image_id, xml_text, image_data, source, class_names,
                         counts):
  """One image + annotation pair as a `records.Example`, checked.

  Args:
    image_id: the VOC id.
    xml_text: the annotation's bytes.
    image_data: the encoded image, a binary file object or bytes.
    source: what the example reads its image from (path or bytes).
    class_names: config.data.class_names.
    counts: fixes are counted here.

  Raises:
    records.SkipExample: the annotation or the image is unusable.
  """
  xml_size, boxes, labels, difficult = parse_voc_xml(xml_text, class_names,
                                                     counts)
  is_jpeg, size = records.inspect_image(image_data, counts)
  if xml_size is None:
    counts.fixed['size_from_image'] += 1
  elif xml_size != size:
    counts.fixed['size_mismatch'] += 1
  boxes, keep = records.validate_boxes(boxes, size, counts)
  return records.Example(image_id, size, is_jpeg, boxes, labels[keep],
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
    raise records.DatasetNotFoundError(
        f'dataset {dataset_name!r}: {split_file} does not exist. Point '
        '--config.data.voc_root at a folder holding VOC2007/ and VOC2012/ '
        '(VOCdevkit layout: JPEGImages, Annotations, ImageSets/Main), or set '
        "--config.data.voc_root='' to read TFDS voc/2007 and voc/2012. "
        'See docs/datasets.md.')
  with open(split_file) as f:
    image_ids = [line.strip() for line in f if line.strip()]
  counts = records.Counts()
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
        raise records.SkipExample('missing_annotation') from e
      try:
        image_file = open(image_path, 'rb')
      except OSError as e:
        raise records.SkipExample('missing_image') from e
      with image_file:
        examples.append(_checked_voc_example(
            image_id, xml_text, image_file, image_path, class_names, counts))
    except records.SkipExample as skip:
      counts.skipped[skip.reason] += 1
  return records.Index.from_examples(examples, counts, blobs=False)


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


def _snap_to_integer_pixels(values, tolerance=1e-3):
  """Rounds pixel values within `tolerance` of an integer (TFDS float32 noise
  on VOC's integer coordinates)."""
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
  builder = records.tfds_builder(name, data_dir)
  tfds_names = builder.info.features['objects']['label'].names
  class_index = {n: i for i, n in enumerate(class_names)}
  counts = records.Counts()
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
        is_jpeg, size = records.inspect_image(data, counts)
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
        boxes, keep = records.validate_boxes(
            _snap_to_integer_pixels(pixel[known]).astype(np.float32), size,
            counts)
        examples.append(records.Example(image_id, size, is_jpeg, boxes,
                                        labels[keep], difficult[keep], data))
      except records.SkipExample as skip:
        counts.skipped[skip.reason] += 1
  examples.sort(key=lambda e: e.image_id)
  return records.Index.from_examples(examples, counts, blobs=True)


# -------------------------------------------------------------------- entry ---


def voc_index(voc_root, tfds_data_dir, dataset_name, class_names):
  """Index of a VOC-format dataset: the folder (voc_root set) or TFDS.

  Args:
    voc_root: config.data.voc_root ('' = TFDS).
    tfds_data_dir: config.data.tfds_data_dir ('' = TFDS's default).
    dataset_name: e.g. 'voc_2007_trainval'.
    class_names: config.data.class_names, as a tuple.

  Raises:
    records.DatasetNotFoundError: the dataset is not there.
  """
  if voc_root:
    return folder_index(voc_root, dataset_name, class_names)
  return tfds_index(dataset_name, class_names, tfds_data_dir)
