r"""A synthetic VOC2007-format dataset of coloured shapes on textured ground.

The offline default dataset: the demo config trains on it and the data tests
read it. Everything is a deterministic function of the seed: image `i` is drawn
from `numpy.random.default_rng([seed, i])`, so the same arguments write the
same files.

Layout (as VOC2007, readable with `config.data.voc_root = DIR` and
`config.data.class_names = shapes.CLASS_NAMES`):

  DIR/VOC2007/JPEGImages/<id>.jpg
  DIR/VOC2007/Annotations/<id>.xml      size, objects with name, pose,
                                        truncated, difficult, bndbox (1-based)
  DIR/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt

Every class has its own shape and a hue band, objects are 15-55% of the image
side, so a small SSD learns them in minutes. One image in about seven also
gets a tiny object marked difficult; objects cut by the border are truncated.

  python make_shapes.py --out=DIR [--num_train=N] [--num_test=N] \
      [--image_size=S] [--seed=K]
"""

import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ssd_jax.core import box_ops

CLASS_NAMES = ('__background__', 'circle', 'square', 'triangle', 'cross')
_HUES = {'circle': 0.0, 'square': 0.6, 'triangle': 0.33, 'cross': 0.15}
_FORMAT_VERSION = 1
_MARKER = 'shapes.json'


def _hsv_to_rgb(h, s, v):
  """One colour, h/s/v in [0, 1] -> (r, g, b) ints in 0..255."""
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return tuple(int(round(255 * c)) for c in rgb)


def _background(rng, width, height):
  """Muted low-frequency colour field + a faint stripe texture + noise."""
  grid = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.uint8)
  field = np.asarray(Image.fromarray(grid).resize((width, height),
                                                  Image.BILINEAR), np.float32)
  grey = field.mean(axis=2, keepdims=True)
  field = grey + 0.4 * (field - grey)  # desaturate: objects stay the colourful part
  yy, xx = np.mgrid[0:height, 0:width]
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(6, 20)
  stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi /
                   period)
  field += rng.uniform(5, 15) * stripes[..., None]
  field += rng.normal(0, 6, size=field.shape)
  return np.clip(field, 0, 255).astype(np.uint8)


def _shape_polygon(name, x0, y0, x1, y1):
  """Points of a polygon shape inside the box [x0, x1] x [y0, y1]."""
  w, h = x1 - x0, y1 - y0
  if name == 'triangle':
    return [(x0 + w / 2, y0), (x1, y1), (x0, y1)]
  if name == 'cross':
    a, b = 0.32, 0.68
    return [(x0 + a * w, y0), (x0 + b * w, y0), (x0 + b * w, y0 + a * h),
            (x1, y0 + a * h), (x1, y0 + b * h), (x0 + b * w, y0 + b * h),
            (x0 + b * w, y1), (x0 + a * w, y1), (x0 + a * w, y0 + b * h),
            (x0, y0 + b * h), (x0, y0 + a * h), (x0 + a * w, y0 + a * h)]
  raise ValueError(name)


def _draw(draw, name, box, fill, outline):
  x0, y0, x1, y1 = box
  if name == 'circle':
    draw.ellipse(box, fill=fill, outline=outline, width=2)
  elif name == 'square':
    draw.rectangle(box, fill=fill, outline=outline, width=2)
  else:
    draw.polygon(_shape_polygon(name, x0, y0, x1, y1), fill=fill,
                 outline=outline, width=2)


def make_image(seed, index, image_size):
  """Draws image number `index`.

  Returns:
    (uint8 [H, W, 3] RGB image, list of object dicts with `name`, `bbox`
    (xmin, ymin, xmax, ymax) as 0-based inclusive pixel indices, `truncated`
    and `difficult`).
  """
  rng = np.random.default_rng([seed, index])
  long_side = image_size
  short_side = int(round(image_size * rng.uniform(0.7, 1.0)))
  width, height = ((long_side, short_side) if rng.uniform() < 0.6 else
                   (short_side, long_side))
  image = Image.fromarray(_background(rng, width, height))
  draw = ImageDraw.Draw(image)
  names = CLASS_NAMES[1:]
  objects, placed = [], []
  side = min(width, height)
  for _ in range(rng.integers(1, 5)):
    for _ in range(20):  # rejection sampling against heavy overlap
      name = names[rng.integers(len(names))]
      size = rng.uniform(0.15, 0.55) * side
      aspect = rng.uniform(0.75, 1.33) if name != 'circle' else 1.0
      w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
      # One object in five may be cut by the border (up to 30% outside).
      slack = 0.3 if rng.uniform() < 0.2 else 0.0
      x0 = rng.uniform(-slack * w, width - w * (1 - slack))
      y0 = rng.uniform(-slack * h, height - h * (1 - slack))
      box = (x0, y0, x0 + w, y0 + h)
      overlaps = box_ops.iou(np.asarray(box),
                             np.asarray(placed).reshape(-1, 4), eps=0.0)
      if np.all(overlaps < 0.35):
        break
    else:
      continue
    placed.append(box)
    hue = (_HUES[name] + rng.uniform(-0.05, 0.05)) % 1.0
    fill = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    outline = tuple(c // 2 for c in fill)
    _draw(draw, name, [int(round(v)) for v in box], fill, outline)
    objects.append((name, box, False))
  if rng.uniform() < 0.15:  # a tiny, difficult object
    name = names[rng.integers(len(names))]
    size = max(6.0, rng.uniform(0.05, 0.09) * side)
    x0 = rng.uniform(0, width - size)
    y0 = rng.uniform(0, height - size)
    box = (x0, y0, x0 + size, y0 + size)
    fill = _hsv_to_rgb(_HUES[name], 0.9, 0.9)
    _draw(draw, name, [int(round(v)) for v in box], fill, fill)
    objects.append((name, box, True))
  image = image.filter(ImageFilter.SMOOTH)
  annotations = []
  for name, box, difficult in objects:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    clipped = (max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1))
    annotations.append({
        'name': name,
        'bbox': clipped,
        'truncated': clipped != (x0, y0, x1, y1),
        'difficult': difficult,
    })
  return np.asarray(image), annotations


def annotation_xml(image_id, width, height, objects):
  """VOC XML text for one image; `objects` as returned by make_image."""
  root = ET.Element('annotation')
  ET.SubElement(root, 'folder').text = 'VOC2007'
  ET.SubElement(root, 'filename').text = f'{image_id}.jpg'
  source = ET.SubElement(root, 'source')
  ET.SubElement(source, 'database').text = 'ssd_jax shapes'
  size = ET.SubElement(root, 'size')
  ET.SubElement(size, 'width').text = str(width)
  ET.SubElement(size, 'height').text = str(height)
  ET.SubElement(size, 'depth').text = '3'
  ET.SubElement(root, 'segmented').text = '0'
  for obj in objects:
    node = ET.SubElement(root, 'object')
    ET.SubElement(node, 'name').text = obj['name']
    ET.SubElement(node, 'pose').text = 'Unspecified'
    ET.SubElement(node, 'truncated').text = str(int(obj['truncated']))
    ET.SubElement(node, 'difficult').text = str(int(obj['difficult']))
    bndbox = ET.SubElement(node, 'bndbox')
    for key, value in zip(('xmin', 'ymin', 'xmax', 'ymax'), obj['bbox']):
      ET.SubElement(bndbox, key).text = str(value + 1)  # VOC is 1-based
  ET.indent(root, space='\t')
  return ET.tostring(root, encoding='unicode')


def _params(num_train, num_test, image_size, seed):
  return {'format_version': _FORMAT_VERSION, 'num_train': num_train,
          'num_test': num_test, 'image_size': image_size, 'seed': seed}


def generate(out_dir, *, num_train=2000, num_test=500, image_size=160,
             seed=0):
  """Writes the dataset to `out_dir`/VOC2007 (overwriting files there).

  Ids 000000.. are trainval (the last tenth of them also listed as val, the
  rest as train), the following `num_test` ids are test.
  """
  year_dir = os.path.join(out_dir, 'VOC2007')
  for sub in ('JPEGImages', 'Annotations', os.path.join('ImageSets', 'Main')):
    os.makedirs(os.path.join(year_dir, sub), exist_ok=True)
  ids = [f'{i:06d}' for i in range(num_train + num_test)]
  for index, image_id in enumerate(ids):
    image, objects = make_image(seed, index, image_size)
    height, width = image.shape[:2]
    Image.fromarray(image).save(
        os.path.join(year_dir, 'JPEGImages', f'{image_id}.jpg'), quality=90)
    with open(os.path.join(year_dir, 'Annotations', f'{image_id}.xml'),
              'w') as f:
      f.write(annotation_xml(image_id, width, height, objects))
  num_val = num_train // 10
  splits = {
      'trainval': ids[:num_train],
      'train': ids[:num_train - num_val],
      'val': ids[num_train - num_val:num_train],
      'test': ids[num_train:],
  }
  for split, split_ids in splits.items():
    with open(os.path.join(year_dir, 'ImageSets', 'Main', f'{split}.txt'),
              'w') as f:
      f.write(''.join(f'{i}\n' for i in split_ids))
  with open(os.path.join(year_dir, _MARKER), 'w') as f:
    json.dump(_params(num_train, num_test, image_size, seed), f)
  return out_dir


def ensure_dataset(root, *, num_train=2000, num_test=500, image_size=160,
                   seed=0):
  """Generates the dataset under `root` unless it is already there.

  Idempotent: a finished dataset is recognised by its marker file (written
  last, after an atomic rename of the whole folder), so an interrupted run is
  redone and concurrent callers do not see half a dataset.

  Returns:
    `root`, usable as `config.data.voc_root`.

  Raises:
    ValueError: `root`/VOC2007 exists but was made with other arguments or is
      not a shapes dataset (it is never overwritten).
  """
  wanted = _params(num_train, num_test, image_size, seed)
  year_dir = os.path.join(root, 'VOC2007')
  marker = os.path.join(year_dir, _MARKER)

  def check_existing():
    if not os.path.exists(marker):
      raise ValueError(f'{year_dir} exists but is not a shapes dataset made by '
                       'ssd_jax.data.shapes; pick another folder.')
    with open(marker) as f:
      found = json.load(f)
    if found != wanted:
      raise ValueError(f'{year_dir} holds a shapes dataset made with {found}, '
                       f'not {wanted}; delete it or pick another folder.')

  if os.path.exists(year_dir):
    check_existing()
    return root
  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f'.shapes-tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  generate(tmp, num_train=num_train, num_test=num_test, image_size=image_size,
           seed=seed)
  try:
    os.rename(os.path.join(tmp, 'VOC2007'), year_dir)
  except OSError:  # another process finished first
    check_existing()
  shutil.rmtree(tmp, ignore_errors=True)
  return root
