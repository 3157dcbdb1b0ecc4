"""Evaluation of a detector: device forward, host NMS, VOC AP or COCOeval.

`Evaluator` evaluates every dataset of `config.data.test` for the trainer and
eval.py and reports the results (log table, JSON, TensorBoard). `evaluate`
only sees a `predict_fn` (images -> raw head outputs) and a stream
of eval batches, so it serves eval.py, the trainer's periodic evaluation and
the benchmarks alike. While the host post-processes batch k the device
already computes batch k+1 (JAX dispatch is asynchronous).

The metric follows the dataset: VOC datasets get the reference's VOC AP
(voc_eval), COCO datasets (their eval batches carry `coco`, the category ids
and ground truth) COCOeval's AP (coco_eval) and a results file.
"""

import json
import math
import os

import jax
import numpy as np
import tqdm

from ssd_jax import coco_eval
from ssd_jax import postprocess
from ssd_jax import train_lib
from ssd_jax import visualize
from ssd_jax import voc_eval


def _image_id(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def _pad(ap, num_classes):
  out = np.full(max(num_classes, len(ap)), np.nan)
  out[:len(ap)] = ap
  return out


def evaluate(predict_fn, batches, priors, config, class_names, *,
             num_images=None, progress=True, coco=None):
  """Detections and their VOC AP (or COCO AP) over an eval dataset.

  Args:
    predict_fn: images [b, S, S, 3] -> (cls_logits [b, P, C],
      bbox_pred [b, P, 4]); typically jit-compiled, so it returns before the
      device has finished (train_lib.make_predict_step: uint8 pixels in).
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
    COCO: coco_eval.evaluate's {'metrics', 'stats', 'results'} plus
    'detections' and 'num_images'. VOC:
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
  if coco is not None:
    return {**coco_eval.evaluate(detections, coco), 'detections': detections,
            'num_images': len(detections)}

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


class Evaluator:
  """Evaluates every dataset of config.data.test and reports the results.

  Per dataset: the reference's table in the log, W/eval/<dataset>_<step>.json,
  TensorBoard scalars `metrics/<dataset>/mAP` (and per class) and a few test
  images with their detections drawn. COCO datasets: COCOeval's summary and
  the reference's `AP        : 0.252` lines, W/eval/<dataset>_<step>.json
  ({step, AP, AP50, AP75, APs, APm, APl}), the results file
  W/eval/<dataset>_<step>_bbox.json and scalars `metrics/<dataset>/AP...`.
  """

  def __init__(self, config, workdir, model_def, mesh, priors, writer, logger,
               num_images_drawn=4):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.priors = priors
    self.writer = writer
    self.logger = logger
    self.num_images_drawn = num_images_drawn
    self.predict_step = train_lib.make_predict_step(config, model_def)

  def _predict_fn(self, state):
    if jax.process_count() == 1:
      def predict(images):  # spread the batch over all devices
        return self.predict_step(state,
                                 train_lib.global_batch(images, self.mesh))
      return predict
    # Several hosts: process 0 evaluates alone on its first device.
    local = jax.tree.map(lambda x: x.addressable_data(0), state)
    return lambda images: self.predict_step(local, images)

  def _batch_size(self):
    devices = jax.device_count() if jax.process_count() == 1 else 1
    return -(-self.config.test.batch_size // devices) * devices

  def __call__(self, state, step):
    """Returns {dataset name: evaluate() result} (empty on other hosts)."""
    from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return {}
    predict = self._predict_fn(state)
    results = {}
    for name in self.config.data.test:
      batches = pipeline.create_eval_iterator(
          self.config, name, batch_size=self._batch_size(), process_index=0,
          process_count=1)
      class_names = batches.class_names
      self.logger.info('Evaluating %s dataset(%d images):', name,
                       pipeline.num_examples(self.config, name))
      result = evaluate(predict, batches, self.priors, self.config,
                        class_names, coco=batches.coco)
      results[name] = result
      if batches.coco is not None:
        coco_eval.report(result, self.workdir, name, step, self.writer,
                         self.logger)
      else:
        self.logger.info('%s', result_text(result, class_names))
        self._write(name, step, result, class_names)
      first_batch = next(iter(pipeline.create_eval_iterator(
          self.config, name, batch_size=self.num_images_drawn,
          process_index=0, process_count=1)))
      self.writer.write_images(step, {f'detections/{name}': self._drawings(
          first_batch, result['detections'][:self.num_images_drawn],
          class_names)})
    self.writer.flush()
    return results

  def _write(self, name, step, result, class_names):
    record = result_json(result, class_names, step)
    os.makedirs(os.path.join(self.workdir, 'eval'), exist_ok=True)
    path = os.path.join(self.workdir, 'eval', f'{name}_{step}.json')
    with open(path, 'w') as f:
      json.dump(record, f, indent=1)
    scalars = {f'metrics/{name}/mAP': result['map'],
               f'metrics/{name}/mAP_area': result['map_area']}
    for class_name, ap in record['ap'].items():
      if ap is not None:
        scalars[f'metrics/{name}/{class_name}'] = ap
    self.writer.write_scalars(step, scalars)

  def _drawings(self, batch, detections, class_names):
    """Detections drawn on the network inputs: [N, S, S, 3] uint8."""
    size = self.config.input.image_size
    drawn = []
    for image, orig_size, det in zip(batch['image'], batch['orig_size'],
                                     detections):
      pixels = np.asarray(image, np.uint8)
      height, width = (float(v) for v in orig_size)
      scale = np.array([size / width, size / height] * 2, np.float32)
      drawn.append(visualize.draw_detections(
          pixels, det['boxes'] * scale, det['labels'], det['scores'],
          class_names))
    return np.stack(drawn)
