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

import copy
import json
import math
import os
import pickle

import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
import numpy as np
import tqdm

from ssd_jax.evaluation import coco_eval
from ssd_jax.evaluation import postprocess
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding
from ssd_jax.deploy import visualize
from ssd_jax.evaluation import voc_eval


def _image_id(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def _pad(ap, num_classes):
  out = np.full(max(num_classes, len(ap)), np.nan)
  out[:len(ap)] = ap
  return out


def detect(predict_fn, batches, priors, config, *, num_images=None,
           progress=True):
  """Detections and ground truth of the valid images of an eval stream.

  Args: as `evaluate`.

  Returns:
    (detections, ground_truth), one entry per valid image in stream order:
    detections as in `evaluate`; ground truth (boxes [M, 4] original pixels,
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
    cls_logits, bbox_pred = (np.asarray(x) for x in outputs)
    dets = postprocess.detect(cls_logits[valid], bbox_pred[valid], priors,
                              np.asarray(batch['orig_size'])[valid], config)
    for i, det in zip(valid, dets):
      mask = np.asarray(batch['mask'][i], bool)
      det['image_id'] = _image_id(batch['image_id'][i])
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


def score(detections, ground_truth, class_names, coco=None):
  """VOC07 11-point and area AP (or COCO AP) of `detect`'s output.

  See `evaluate` for the arguments and the result.
  """
  if not detections:
    raise ValueError('evaluate: the dataset yielded no valid image')
  if coco is not None:
    return {**coco_eval.evaluate(detections, coco),
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


def evaluate(predict_fn, batches, priors, config, class_names, *,
             num_images=None, progress=True, coco=None):
  """Detections and their VOC AP (or COCO AP) over an eval dataset.

  Args:
    predict_fn: images [b, S, S, 3] -> (cls_logits [b, P, C],
      bbox_pred [b, P, 4]); typically jit-compiled, so it returns before the
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
    COCO: coco_eval.evaluate's {'metrics', 'stats', 'results'} plus
    'detections' and 'num_images'. VOC:
    {'map': VOC07 11-point mAP (the reference's headline), 'map_area': mAP
    with the area-under-curve AP, 'ap' and 'ap_area': float64
    [len(class_names)] per-label AP (NaN for background and for classes
    without non-difficult ground truth), 'detections': per image a dict
    {'image_id', 'boxes' [K, 4] original pixels, 'labels' [K], 'scores' [K]},
    'num_images'}.
  """
  detections, ground_truth = detect(predict_fn, batches, priors, config,
                                    num_images=num_images, progress=progress)
  return score(detections, ground_truth, class_names, coco=coco)


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
    self.predict_step = predict_lib.make_predict_step(config, model_def, mesh)

  def _predict_fn(self, variables):
    """images (this host's share of a batch) -> this host's head outputs."""
    def predict(images):
      outputs = self.predict_step(variables,
                                  sharding.global_batch(images, self.mesh))
      if jax.process_count() == 1:
        return outputs
      return multihost_utils.global_array_to_host_local_array(
          outputs, self.mesh, PartitionSpec(sharding.DATA_AXIS))
    return predict

  def _batch_size(self):
    """config.test.batch_size rounded up to a multiple of all devices."""
    devices = jax.device_count()
    return -(-self.config.test.batch_size // devices) * devices

  def __call__(self, variables, step):
    """Evaluates the model `variables` (runtime.variables.ModelVariables,
    replicated on the mesh) of iteration `step`.

    Returns {dataset name: evaluate() result} (empty on other hosts).

    Every host runs the forward and NMS of its share of each dataset; the
    detections are gathered to process 0, which computes the AP in the
    dataset's order, so the result does not depend on the number of hosts.
    """
    from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    is_main = jax.process_index() == 0
    predict = self._predict_fn(variables)
    results = {}
    for name in self.config.data.test:
      batches = pipeline.create_eval_iterator(
          self.config, name, batch_size=self._batch_size())
      class_names = batches.class_names
      if is_main:
        self.logger.info('Evaluating %s dataset(%d images):', name,
                         pipeline.num_examples(self.config, name))
      detections, ground_truth = detect(predict, batches, self.priors,
                                        self.config, progress=is_main)
      detections, ground_truth, counts = _gather_to_main(
          pipeline.load_index(self.config, name), detections, ground_truth,
          batches.stats.counts)
      if not is_main:
        continue
      self.logger.info('%s: %s', name, counts.summary())
      self.writer.write_scalars(step, {
          f'data/{name}/skipped': counts.num_skipped,
          f'data/{name}/fixed': counts.num_fixed})
      result = score(detections, ground_truth, class_names,
                     coco=batches.coco)
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


def _gather_objects(value):
  """Every host's picklable `value`, in process order (a collective)."""
  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [pickle.loads(gathered[i, :int(n)].tobytes())
          for i, n in enumerate(np.ravel(sizes))]


def _gather_to_main(index, detections, ground_truth, counts):
  """All hosts' detections and ground truth, in the order of `index`.

  Args:
    index: the dataset's sources.Index (every host holds the whole index).
    detections, ground_truth: this host's share, from `detect`.
    counts: this host's sources.Counts of the dataset (index-time counts,
      the same on every host, plus this host's decode failures).

  Returns:
    (detections, ground_truth, counts) of the whole dataset; on one host the
    arguments themselves.
  """
  if jax.process_count() == 1:
    return detections, ground_truth, counts
  shares = _gather_objects((detections, ground_truth,
                            counts.skipped['decode_error']))
  position = {_image_id(image_id): i
              for i, image_id in enumerate(index.image_ids)}
  merged = sorted(
      (pair for dets, gts, _ in shares for pair in zip(dets, gts)),
      key=lambda pair: position[pair[0]['image_id']])
  total = copy.deepcopy(counts)
  total.skipped['decode_error'] = sum(share[2] for share in shares)
  return ([d for d, _ in merged], [g for _, g in merged], total)
