"""Evaluation of a detector over a stream: device forward, host NMS, metrics.

`evaluate_dataset` only sees a `predict_fn` (images -> raw head outputs) and a
stream of eval batches, so it serves eval.py, the trainer's periodic
evaluation and the benchmarks alike. While the host post-processes batch k
the device already computes batch k+1 (JAX dispatch is asynchronous).

The metric follows the dataset: VOC datasets get the reference's VOC AP
(voc_eval), COCO datasets (their eval batches carry `coco`, the category ids
and ground truth) COCOeval's AP (coco_eval). Nothing here writes files or
logs: `reports` does, and `evaluator.Evaluator` runs both for every test set.
"""

import numpy as np
import tqdm

from ssd_jax.core import detect as detect_lib
from ssd_jax.evaluation import coco_eval
from ssd_jax.evaluation import postprocess
from ssd_jax.evaluation import voc_eval


def image_id_str(value):
  """An eval batch's image id (bytes or str) as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


def _pad(ap, num_classes):
  out = np.full(max(num_classes, len(ap)), np.nan)
  out[:len(ap)] = ap
  return out


def detect_dataset(predict_fn, batches, priors, config, *, num_images=None,
           progress=True):
  """Detections and ground truth of the valid images of an eval stream.

  Args: as `evaluate_dataset`.

  Returns:
    (detections, ground_truth), one entry per valid image in stream order:
    detections as in `evaluate_dataset`; ground truth (boxes [M, 4] original pixels,
    labels [M], difficult [M] bool) without padding boxes.
  """
  priors = np.asarray(priors, np.float32)
  detections, ground_truth = [], []
  bar = tqdm.tqdm(total=num_images, unit='img', desc='eval',
                  disable=not progress)

  def finish(batch, outputs):
    """Host side of one batch: NMS and ground truth of its valid images."""
    valid = np.flatnonzero(np.asarray(batch['valid'], bool))
    if num_images is not None:
      valid = valid[:num_images - len(detections)]
    orig_sizes = np.asarray(batch['orig_size'])[valid]
    if isinstance(outputs, detect_lib.Detections):  # NMS ran on the device
      outputs = detect_lib.Detections(*(np.asarray(x)[valid] for x in outputs))
      dets = detect_lib.to_host_detections(outputs, orig_sizes,
                                           config.input.image_size)
      for det, candidates in zip(dets, outputs.num_candidates):
        det['max_class_candidates'] = int(candidates.max())
    else:
      cls_logits, bbox_pred = (np.asarray(x) for x in outputs)
      dets = postprocess.detect(cls_logits[valid], bbox_pred[valid], priors,
                                orig_sizes, config)
    for i, det in zip(valid, dets):
      mask = np.asarray(batch['mask'][i], bool)
      det['image_id'] = image_id_str(batch['image_id'][i])
      detections.append(det)
      ground_truth.append((np.asarray(batch['boxes'][i])[mask],
                           np.asarray(batch['labels'][i])[mask],
                           np.asarray(batch['difficult'][i], bool)[mask]))
    bar.update(len(valid))

  pending = None
  dispatched = 0
  for batch in batches:
    if num_images is not None and dispatched >= num_images:
      break
    num_valid = int(np.sum(batch['valid']))
    if num_valid == 0:
      continue
    outputs = predict_fn(batch['image'])  # returns before the device is done
    dispatched += num_valid
    if pending is not None:
      finish(*pending)
    pending = (batch, outputs)
  if pending is not None:
    finish(*pending)
  bar.close()
  return detections, ground_truth


def score_dataset(detections, ground_truth, class_names, coco=None):
  """VOC07 11-point and area AP (or COCO AP) of `detect_dataset`'s output.

  See `evaluate_dataset` for the arguments and the result.
  """
  if not detections:
    raise ValueError('evaluation: the dataset yielded no valid image')
  if coco is not None:
    return {**coco_eval.coco_metrics(detections, coco),
            'detections': list(detections), 'num_images': len(detections)}
  gt_boxes, gt_labels, gt_difficults = zip(*ground_truth)
  prec, rec = voc_eval.precision_recall(
      [d['boxes'] for d in detections], [d['labels'] for d in detections],
      [d['scores'] for d in detections], gt_boxes, gt_labels, gt_difficults)
  ap = _pad(voc_eval.average_precision(prec, rec, use_07_metric=True),
            len(class_names))
  ap_area = _pad(voc_eval.average_precision(prec, rec, use_07_metric=False),
                 len(class_names))
  if len(ap) > len(class_names):
    raise ValueError(f'label {len(ap) - 1} seen but only {len(class_names)} '
                     'class names')
  return {'map': voc_eval.mean_ap(ap), 'map_area': voc_eval.mean_ap(ap_area),
          'ap': ap, 'ap_area': ap_area, 'detections': list(detections),
          'num_images': len(detections)}


def evaluate_dataset(predict_fn, batches, priors, config, class_names, *,
             num_images=None, progress=True, coco=None):
  """Detections and their VOC AP (or COCO AP) over an eval dataset.

  Args:
    predict_fn: images [b, S, S, 3] -> (cls_logits [b, P, C],
      bbox_pred [b, P, 4]), or `core.detect.Detections` where the NMS runs
      on the device; typically jit-compiled, so it returns before the
      device has finished (predict_lib.make_predict_step: uint8 pixels in).
    batches: iterable of dicts of numpy arrays: 'image' [b, S, S, 3] as
      predict_fn takes them (the eval pipeline's: uint8 RGB pixel values,
      not mean-subtracted), 'image_id' [b] str or bytes, 'orig_size' int [b, 2]
      (height, width), 'boxes' float32 [b, M, 4] ground truth (xmin, ymin,
      xmax, ymax) in original pixels, 0-based, 'labels' int [b, M],
      'difficult' bool [b, M], 'mask' bool [b, M] (False = padding box),
      'valid' bool [b] (False = padding image, skipped).
    priors: [P, 4] center-form priors of the model.
    config: the experiment config (`input`, `model` variances, `test`).
    class_names: names indexed by label, [0] = background.
    num_images: evaluate only the first this many valid images (None = all).
    progress: show a tqdm progress bar.
    coco: a COCO dataset's `data.coco.CocoInfo` (the eval iterator's
      `.coco`): COCOeval instead of VOC AP, image ids are COCO ids.

  Returns:
    COCO: coco_eval.coco_metrics' {'metrics', 'stats', 'results'} plus
    'detections' and 'num_images'. VOC:
    {'map': VOC07 11-point mAP (the reference's headline), 'map_area': mAP
    with the area-under-curve AP, 'ap' and 'ap_area': float64
    [len(class_names)] per-label AP (NaN for background and for classes
    without non-difficult ground truth), 'detections': per image a dict
    {'image_id', 'boxes' [K, 4] original pixels, 'labels' [K], 'scores' [K]}
    (on-device NMS adds 'max_class_candidates': the most priors of one class
    above the threshold, to compare with test.candidates_per_class),
    'num_images'}.
  """
  detections, ground_truth = detect_dataset(
      predict_fn, batches, priors, config, num_images=num_images,
      progress=progress)
  return score_dataset(detections, ground_truth, class_names, coco=coco)
