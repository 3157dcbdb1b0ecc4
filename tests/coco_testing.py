"""Small COCO-format datasets for the tests, made from the shapes generator."""

import json
import os
import shutil
import zipfile

from ssd_jax.data import coco
from ssd_jax.data import shapes
from ssd_jax.data import sources

# Shapes class -> a COCO category (non-contiguous ids), for datasets that
# must carry COCO's 80 categories (TFDS).
COCO_NAMES = {'circle': 'bird', 'square': 'tv', 'triangle': 'boat',
              'cross': 'airplane'}
# Categories of a custom COCO dataset of shapes: ids deliberately sparse.
SHAPES_CATEGORIES = ((3, 'circle'), (8, 'square'), (12, 'triangle'),
                     (40, 'cross'))


def shapes_to_coco(voc_root, split, coco_root, folder, *, categories=None,
                   first_image_id=100, image_id_step=7, crowd_first=False):
  """Writes the shapes dataset's `split` as a COCO folder dataset.

  Images are copied to coco_root/<folder>/ as <folder>_<12-digit id>.jpg,
  annotations go to coco_root/annotations/instances_<folder>.json (VOC box
  (x1, y1, x2, y2) 1-based -> bbox [x1 - 1, y1 - 1, x2 - x1, y2 - y1], as the
  coco_tiny fixture). Difficult objects become ordinary ones.

  Args:
    categories: (id, name) of the categories written, each shapes class
      mapped by name or through COCO_NAMES; default SHAPES_CATEGORIES.
    crowd_first: mark the first object of the second image iscrowd=1.

  Returns:
    The json dict written.
  """
  categories = categories or SHAPES_CATEGORIES
  id_of = {name: cid for cid, name in categories}
  index = sources.folder_index(voc_root, f'voc_2007_{split}',
                               shapes.CLASS_NAMES)
  os.makedirs(os.path.join(coco_root, folder), exist_ok=True)
  os.makedirs(os.path.join(coco_root, 'annotations'), exist_ok=True)
  images, annotations = [], []
  for i in range(len(index)):
    image_id = first_image_id + image_id_step * i
    file_name = f'{folder}_{image_id:012d}.jpg'
    shutil.copyfile(index.paths[i], os.path.join(coco_root, folder, file_name))
    height, width = (int(v) for v in index.sizes[i])
    images.append({'id': image_id, 'file_name': file_name, 'width': width,
                   'height': height})
    boxes, labels, _ = index.objects(i)
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
      name = shapes.CLASS_NAMES[label]
      x1, y1, x2, y2 = box
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id,
          'category_id': id_of.get(name, id_of.get(COCO_NAMES.get(name))),
          'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
          'iscrowd': int(crowd_first and i == 1 and k == 0),
          'segmentation': []})
  data = {'images': images, 'annotations': annotations,
          'categories': [{'id': c, 'name': n, 'supercategory': 'shape'}
                         for c, n in categories]}
  with open(os.path.join(coco_root, 'annotations',
                         f'instances_{folder}.json'), 'w') as f:
    json.dump(data, f)
  return data


def make_coco_2017_zips(coco_root, out_dir):
  """The COCO 2017 zip files TFDS coco/2017 downloads, from a folder.

  coco_root holds train2017/, val2017/ and annotations/instances_*2017.json;
  the test split gets the first validation image and no annotations.
  """
  os.makedirs(out_dir, exist_ok=True)
  for folder in ('train2017', 'val2017'):
    with zipfile.ZipFile(os.path.join(out_dir, f'{folder}.zip'), 'w') as z:
      for name in sorted(os.listdir(os.path.join(coco_root, folder))):
        z.write(os.path.join(coco_root, folder, name), f'{folder}/{name}')
  with open(os.path.join(coco_root, 'annotations',
                         'instances_val2017.json')) as f:
    val = json.load(f)
  first = val['images'][0]
  with zipfile.ZipFile(os.path.join(out_dir, 'test2017.zip'), 'w') as z:
    z.write(os.path.join(coco_root, 'val2017', first['file_name']),
            f'test2017/{first["file_name"]}')
  with zipfile.ZipFile(os.path.join(out_dir, 'annotations_trainval2017.zip'),
                       'w') as z:
    for split in ('train2017', 'val2017'):
      z.write(os.path.join(coco_root, 'annotations',
                           f'instances_{split}.json'),
              f'annotations/instances_{split}.json')
  with zipfile.ZipFile(os.path.join(out_dir, 'image_info_test2017.zip'),
                       'w') as z:
    z.writestr('annotations/image_info_test2017.json', json.dumps(
        {'images': [first], 'categories': val['categories']}))
  return out_dir


def all_coco_categories():
  return tuple(coco.CATEGORIES)
