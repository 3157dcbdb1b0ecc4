"""Small VOC-format datasets for the data tests, written into tmp dirs."""

import glob
import io
import os
import tarfile

import numpy as np
from PIL import Image

from ssd_jax.data import shapes

# Shapes class -> a VOC class, for datasets that must carry VOC names (TFDS).
VOC_NAMES = {'circle': 'bird', 'square': 'tvmonitor', 'triangle': 'boat',
             'cross': 'aeroplane'}


def make_shapes(root, num_train=12, num_test=4, image_size=96, seed=3):
  """A shapes dataset at root/VOC2007; returns root."""
  return shapes.generate(root, num_train=num_train, num_test=num_test,
                         image_size=image_size, seed=seed)


def rename_to_voc(root):
  """Rewrites the object names of a shapes dataset to VOC class names."""
  for path in glob.glob(os.path.join(root, 'VOC2007', 'Annotations', '*.xml')):
    with open(path) as f:
      text = f.read()
    for old, new in VOC_NAMES.items():
      text = text.replace(f'<name>{old}</name>', f'<name>{new}</name>')
    with open(path, 'w') as f:
      f.write(text)


def paths(root, image_id):
  base = os.path.join(root, 'VOC2007')
  return (os.path.join(base, 'JPEGImages', f'{image_id}.jpg'),
          os.path.join(base, 'Annotations', f'{image_id}.xml'))


def read(path, mode='rb'):
  with open(path, mode) as f:
    return f.read()


def write(path, data):
  with open(path, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)


def reencode(path, mode, image_format='JPEG'):
  """Re-saves an image in another PIL mode / format under the same name."""
  image = Image.open(path).convert(mode)
  buf = io.BytesIO()
  image.save(buf, image_format)
  write(path, buf.getvalue())


def break_jpeg_scan_header(path):
  """Points the scan at Huffman tables that do not exist.

  PIL still opens the file (it reads the header only up to the start of the
  scan) and the end marker is intact, so the host-side check passes, but
  libjpeg refuses to decode it.
  """
  data = bytearray(read(path))
  sos = bytes(data).index(b'\xff\xda')
  data[sos + 6] = 0x33  # first component: DC/AC table 3
  write(path, bytes(data))


def make_voc_tars(voc_root, out_dir):
  """The two VOC2007 tar files (VOCdevkit/VOC2007/...) of a folder dataset."""
  os.makedirs(out_dir, exist_ok=True)
  for name in ('VOCtrainval_06-Nov-2007.tar', 'VOCtest_06-Nov-2007.tar'):
    with tarfile.open(os.path.join(out_dir, name), 'w') as tar:
      tar.add(voc_root, arcname='VOCdevkit')
  return out_dir


def xml_boxes(xml_path):
  """(name, [xmin, ymin, xmax, ymax] floats, difficult) per object, raw XML."""
  import xml.etree.ElementTree as ET  # pylint: disable=g-import-not-at-top
  out = []
  for obj in ET.parse(xml_path).getroot().iter('object'):
    box = [float(obj.find('bndbox').find(k).text)
           for k in ('xmin', 'ymin', 'xmax', 'ymax')]
    out.append((obj.find('name').text.strip().lower(), np.array(box),
                obj.find('difficult').text.strip() == '1'))
  return out
