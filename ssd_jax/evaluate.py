"""VOC evaluation of a detector: device forward, host NMS, VOC AP.

`evaluate` only sees a `predict_fn` (images -> raw head outputs) and a stream
of eval batches, so it serves eval.py, the trainer's periodic evaluation and
the benchmarks alike. While the host post-processes batch k the device
already computes batch k+1 (JAX dispatch is asynchronous).
"""

import math

import numpy as np
import tqdm

from ssd_jax import postprocess
from ssd_jax import voc_eval


def _image_id(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def _pad(ap, num_classes):
  out = np.full(max(num_classes, len(ap)), np.nan)
  out[:len(ap)] = ap
  return out


def evaluate(predict_fn, batches, priors, config, class_names, *,
             num_images=None, progress=True):
  """Detections, VOC07 11-point and area AP over an eval dataset.

  Args:
    predict_fn: images float32 [b, S, S, 3] -> (cls_logits [b, P, C],
      bbox_pred [b, P, 4]); typically jit-compiled, so it returns before the
      device has finished.
    batches: iterable of dicts of numpy arrays: 'image' float32 [b, S, S, 3]
      (mean-subtracted), 'image_id' [b] str or bytes, 'orig_size' int [b, 2]
      (height, width), 'boxes' float32 [b, M, 4] ground truth (xmin, ymin,
      xmax, ymax) in original pixels, 0-based, 'labels' int [b, M],
      'difficult' bool [b, M], 'mask' bool [b, M] (False = padding box),
      'valid' bool [b] (False = padding image, skipped).
    priors: [P, 4] center-form priors of the model.
    config: the experiment config (`input`, `model` variances, `test`).
    class_names: names indexed by label, [0] = background.
    num_images: evaluate only the first this many valid images (None = all).
    progress: show a tqdm progress bar.

  Returns:
    {'map': VOC07 11-point mAP (the reference's headline), 'map_area': mAP
    with the area-under-curve AP, 'ap' and 'ap_area': float64
    [len(class_names)] per-label AP (NaN for background and for classes
    without non-difficult ground truth), 'detections': per image a dict
    {'image_id', 'boxes' [K, 4] original pixels, 'labels' [K], 'scores' [K]},
    'num_images'}.
  """
  priors = np.asarray(priors, np.float32)
  detections, gt_boxes, gt_labels, gt_difficults = [], [], [], []
  bar = tqdm.tqdm(total=num_images, unit='img', desc='eval',
                  disable=not progress)

  def finish(batch, outputs):
    """Host side of one batch: NMS and ground truth of its valid images."""
    valid = np.flatnonzero(np.asarray(batch['valid'], bool))
    if num_images is not None:
      valid = valid[:num_images - len(detections)]
    cls_logits, bbox_pred = (np.asarray(x) for x in outputs)
    dets = postprocess.detect(cls_logits[valid], bbox_pred[valid], priors,
                              np.asarray(batch['orig_size'])[valid], config)
    for i, det in zip(valid, dets):
      mask = np.asarray(batch['mask'][i], bool)
      det['image_id'] = _image_id(batch['image_id'][i])
      detections.append(det)
      gt_boxes.append(np.asarray(batch['boxes'][i])[mask])
      gt_labels.append(np.asarray(batch['labels'][i])[mask])
      gt_difficults.append(np.asarray(batch['difficult'][i], bool)[mask])
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
  if not detections:
    raise ValueError('evaluate: the dataset yielded no valid image')

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
          'ap': ap, 'ap_area': ap_area, 'detections': detections,
          'num_images': len(detections)}


def _number(value):
  value = float(value)
  return None if math.isnan(value) else value


def result_json(result, class_names, step):
  """The JSON record eval.py writes: {"step", "map", "map_area", "ap"}.

  "ap" maps every class name (background excluded) to its VOC07 AP, or None
  where the AP is NaN (no non-difficult ground truth).
  """
  return {
      'step': int(step),
      'map': _number(result['map']),
      'map_area': _number(result['map_area']),
      'ap': {name: _number(result['ap'][label])
             for label, name in enumerate(class_names) if label > 0},
  }


def result_text(result, class_names):
  """The reference's printed table ("mAP: 0.7740", then one line a class)."""
  return voc_eval.format_results(result['ap'], result['map'], class_names)
