"""VOC mAP of exported detectors (and the JAX one) on a workdir's test set.

Runs each exported file (`export.load_runner`; the format from its suffix:
.tflite, .onnx, .stablehlo) and the workdir's JAX `inference.Detector` over
the first test set of the workdir's config, image by image: the image is
read, resized with `inference.resize_for_model`, the file's boxes are scaled
back to the original pixels, and `evaluation.evaluate.score_dataset` scores
them as eval.py does (VOC07 11-point mAP). For each file also the int8
verification's figure over the whole set (`export.int8_agreement`): the
share of the JAX detections above 0.3 that the file finds (same label,
IoU >= 0.5). The ms/image are wall time with the read and resize included.

  PYTHONPATH=. python bench/exported_map.py --workdir=outputs/shapes_demo \
      ssd.tflite ssd_int8.tflite [--voc_root=datasets/shapes] [--threads=2]
"""

import argparse
import os
import time

import numpy as np

FORMATS = {'.tflite': 'tflite', '.onnx': 'onnx', '.stablehlo': 'stablehlo'}


def exported_detections(run, images, image_size):
  """The file's detections of each (H, W, 3) image, in eval's dicts."""
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  detections = []
  for image in images:
    height, width = image.shape[:2]
    boxes, scores, classes, count = run(
        inference.resize_for_model(image, image_size)[None])
    n = int(count[0])
    ymin, xmin, ymax, xmax = np.moveaxis(boxes[0, :n], -1, 0)
    detections.append({
        'boxes': np.stack([xmin, ymin, xmax, ymax], -1) * np.array(
            [width, height, width, height], np.float32),
        'scores': scores[0, :n], 'labels': classes[0, :n].astype(np.int64)})
  return detections


def agreement(detections, reference):
  """`export.int8_agreement` of two lists of per-image detection dicts."""
  from ssd_jax.deploy import export  # pylint: disable=g-import-not-at-top
  matched = compared = 0
  for ours, theirs in zip(detections, reference):
    packed = [(d['boxes'][None], d['scores'][None],
               d['labels'][None].astype(np.float32),
               np.array([len(d['scores'])])) for d in (ours, theirs)]
    m, c = export.int8_agreement(*packed)
    matched += m
    compared += c
  return matched, compared


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('files', nargs='*', help='exported detectors')
  parser.add_argument('--voc_root', help='overrides config.data.voc_root')
  parser.add_argument('--threads', type=int, default=None,
                      help="the runtimes' intra-op threads")
  parser.add_argument('--num_images', type=int, default=None)
  args = parser.parse_args()
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import export  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  from ssd_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  model, config, step = inference.load_model(args.workdir)
  if args.voc_root:
    config.data.voc_root = args.voc_root
  name = config.data.test[0]
  index = pipeline.load_index(config, name)
  count = min(len(index), args.num_images or len(index))
  images = [inference.load_image(index.paths[i]) for i in range(count)]
  ground_truth = [index.objects(i) for i in range(count)]
  class_names = list(config.data.class_names)
  print(f'{name}: {count} images, checkpoint step {step}')

  runs = [('JAX Detector', None)] + [(path, path) for path in args.files]
  reference = None
  for label, path in runs:
    start = time.perf_counter()
    if path is None:
      detector = inference.Detector(model, config, batch_size=8,
                                    num_threads=args.threads)
      detections = detector(images)
      detector.close()
    else:
      fmt = FORMATS[os.path.splitext(path)[1]]
      run = export.load_runner(fmt, path, num_threads=args.threads)
      detections = exported_detections(run, images, config.input.image_size)
    seconds = time.perf_counter() - start
    result = evaluate.score_dataset(detections, ground_truth, class_names)
    size = ''
    if path is None:
      reference = detections
    else:
      matched, compared = agreement(detections, reference)
      size = (f', {os.path.getsize(path) / 1e6:.2f} MB, {matched}/{compared}'
              f' ({matched / max(compared, 1):.1%}) of the JAX detections '
              'above 0.3 found')
    print(f'{label}: mAP {result["map"]:.4f} (area {result["map_area"]:.4f})'
          f', {1000 * seconds / count:.1f} ms/image{size}', flush=True)


if __name__ == '__main__':
  main()
