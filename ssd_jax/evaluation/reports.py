"""What an evaluation leaves behind: log tables, JSON records, TensorBoard.

VOC datasets: the reference's table ("mAP: 0.7740", one line a class) in the
log, W/eval/<dataset>_<step>.json ({step, map, map_area, ap}) and scalars
`metrics/<dataset>/mAP` (and per class). COCO datasets: COCOeval's summary and
the reference's `AP        : 0.252` lines, W/eval/<dataset>_<step>.json
({step, AP, AP50, AP75, APs, APm, APl}), the results file
W/eval/<dataset>_<step>_bbox.json and scalars `metrics/<dataset>/AP...`.
"""

import json
import math
import os

from ssd_jax.evaluation import voc_eval


def _number(value):
  value = float(value)
  return None if math.isnan(value) else value


def _write_json(path, record):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)


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


def device_nms_line(detections, candidates_per_class):
  """One log line on the device NMS's per-class cut, or None (host NMS).

  `detections` as `evaluate.detect_dataset` returns them; with the NMS on
  the device each holds 'max_class_candidates'.
  """
  most = [d['max_class_candidates'] for d in detections
          if 'max_class_candidates' in d]
  if not most:
    return None
  cut = sum(m > candidates_per_class for m in most)
  return (f'device NMS: at most {max(most)} candidates of one class in an '
          f'image (test.candidates_per_class {candidates_per_class}); '
          f'{cut} of {len(most)} images had a class cut')


def report_voc(result, class_names, workdir, name, step, writer, logger):
  """Logs the VOC table, writes W/eval/<name>_<step>.json and the scalars.

  Returns the JSON record written.
  """
  logger.info('%s', result_text(result, class_names))
  record = result_json(result, class_names, step)
  _write_json(os.path.join(workdir, 'eval', f'{name}_{step}.json'), record)
  scalars = {f'metrics/{name}/mAP': result['map'],
             f'metrics/{name}/mAP_area': result['map_area']}
  for class_name, ap in record['ap'].items():
    if ap is not None:
      scalars[f'metrics/{name}/{class_name}'] = ap
  writer.write_scalars(step, scalars)
  return record


def metrics_json(result, step):
  """The JSON record eval.py writes: {"step", "AP", "AP50", ..., "APl"}."""
  return {'step': int(step), **{k: float(v) for k, v in
                                result['metrics'].items()}}


def metric_lines(result):
  """The reference's log lines: `AP        : 0.252`, one per metric."""
  return ['{:<10}: {}'.format(k, round(v, 3))
          for k, v in result['metrics'].items()]


def write_results(path, results):
  """Writes a results list as the COCO results JSON."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f)


def report_coco(result, workdir, name, step, writer, logger):
  """Writes W/eval/<name>_<step>.json and _bbox.json, logs, TensorBoard.

  Returns the metrics record written.
  """
  bbox_path = os.path.join(workdir, 'eval', f'{name}_{step}_bbox.json')
  logger.info('Writing results to %s...', bbox_path)
  write_results(bbox_path, result['results'])
  for line in result['summary']:
    logger.info('%s', line)
  record = metrics_json(result, step)
  _write_json(os.path.join(workdir, 'eval', f'{name}_{step}.json'), record)
  for line in metric_lines(result):
    logger.info('%s', line)
  writer.write_scalars(step, {f'metrics/{name}/{k}': v
                              for k, v in result['metrics'].items()})
  return record
