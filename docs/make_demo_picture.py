"""Draws docs/demo.png: the demo model's detections on shapes test images.

  PYTHONPATH=. python docs/make_demo_picture.py [--workdir=outputs/shapes_demo]

The first 8 test images of the shapes dataset, each enlarged to 320 px
(nearest neighbour) before drawing so that the labels are legible, with the
detections above --score_threshold (as demo.py draws them), tiled 4 x 2.
"""

import argparse
import os

import numpy as np
from PIL import Image

from ssd_jax.deploy import inference
from ssd_jax.deploy import visualize


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='outputs/shapes_demo')
  parser.add_argument('--voc_root', default='datasets/shapes')
  parser.add_argument('--score_threshold', type=float, default=0.3)
  parser.add_argument('--tile', type=int, default=320)
  parser.add_argument('--out', default='docs/demo.png')
  args = parser.parse_args()
  voc = os.path.join(args.voc_root, 'VOC2007')
  with open(os.path.join(voc, 'ImageSets', 'Main', 'test.txt')) as f:
    ids = [line.strip() for line in f if line.strip()][:8]
  detector = inference.Detector.from_workdir(args.workdir)
  tiles = []
  for image_id in ids:
    image = inference.load_image(os.path.join(voc, 'JPEGImages',
                                              f'{image_id}.jpg'))
    [result] = detector([image], score_threshold=args.score_threshold)
    height, width = image.shape[:2]
    scale = args.tile / max(height, width)
    big = np.asarray(Image.fromarray(image).resize(
        (round(width * scale), round(height * scale)), Image.NEAREST))
    canvas = np.full((args.tile, args.tile, 3), 255, np.uint8)
    canvas[:big.shape[0], :big.shape[1]] = big
    tiles.append(visualize.draw_detections(
        canvas, result['boxes'] * scale, result['labels'], result['scores'],
        detector.class_names, score_threshold=args.score_threshold))
  detector.close()
  rows = [np.concatenate(tiles[i:i + 4], axis=1) for i in (0, 4)]
  Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
  print(f'Wrote {args.out} (step {detector.step})')


if __name__ == '__main__':
  main()
