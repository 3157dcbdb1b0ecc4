"""COCO evaluation of detections: the results file and COCOeval's metrics.

The COCO API is faster-coco-eval (`faster_coco_eval.COCOeval_faster`): it
gives the same twelve numbers as pycocotools on the same detections in about
1/8 of the CPU time (BENCHMARKS.md, "COCO evaluation"). Host-side and numpy
only: no TensorFlow, no JAX.

Conventions: detections are the evaluator's per-image dicts, boxes
(x1, y1, x2, y2) in original-image pixels and contiguous labels 1..N; the
results file has the original COCO image and category ids and boxes
[x, y, w, h] = [x1, y1, x2 - x1, y2 - y1], as the reference writes them.
"""

import contextlib
import io

import numpy as np

# COCOeval.stats[0:6], in the reference's names and order.
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def results_list(detections, category_ids):
  """Detections in the COCO results format (the file users submit).

  Args:
    detections: iterable of {'image_id': COCO image id (int, or str of an
      int), 'boxes': [K, 4] (x1, y1, x2, y2) original pixels, 'labels': [K]
      contiguous labels, 'scores': [K]}.
    category_ids: int [N + 1], label -> original category id.

  Returns:
    [{'image_id': int, 'category_id': int, 'bbox': [x, y, w, h] floats,
    'score': float}], image by image, each image's in its detections' order.
  """
  category_ids = np.asarray(category_ids, np.int64)
  out = []
  for det in detections:
    if not len(det['scores']):
      continue
    image_id = int(det['image_id'])
    boxes = np.asarray(det['boxes'], np.float32).astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    cats = category_ids[np.asarray(det['labels'], np.int64)].tolist()
    scores = np.asarray(det['scores'], np.float32).tolist()
    out.extend({'image_id': image_id, 'category_id': c, 'bbox': b,
                'score': s} for c, b, s in zip(cats, xywh.tolist(), scores))
  return out


def ground_truth_dataset(annotations, image_ids, class_names, category_ids):
  """A COCO instances dict of the evaluated images.

  Args:
    annotations: `data.coco.CocoAnnotations` (numpy arrays of ids, bboxes,
      areas, iscrowd).
    image_ids: int ids of the images evaluated (those without annotations
      included: their detections are false positives).
    class_names, category_ids: label -> name / original id ([0] unused).
  """
  image_ids = [int(i) for i in image_ids]
  keep = np.isin(annotations.image_ids, np.asarray(image_ids, np.int64))
  rows = zip(annotations.ids[keep].tolist(),
             annotations.image_ids[keep].tolist(),
             annotations.category_ids[keep].tolist(),
             annotations.bboxes[keep].tolist(),
             annotations.areas[keep].tolist(),
             annotations.iscrowd[keep].astype(int).tolist())
  return {
      'images': [{'id': i} for i in image_ids],
      'annotations': [
          {'id': a, 'image_id': i, 'category_id': c, 'bbox': b, 'area': ar,
           'iscrowd': cr} for a, i, c, b, ar, cr in rows],
      'categories': [{'id': int(c), 'name': n} for c, n in
                     zip(category_ids[1:], class_names[1:])],
  }


def coco_eval(gt_dataset, results, api='faster_coco_eval'):
  """COCOeval (bbox) of `results` against `gt_dataset`.

  Args:
    gt_dataset: a COCO instances dict.
    results: a results list (see `results_list`); the list's dicts get
      COCO's working fields added.
    api: 'faster_coco_eval' (the default), or 'pycocotools' (the reference's;
      for comparisons, e.g. bench/coco_eval.py).

  Returns:
    (stats float64 [12] = COCOeval.stats, COCOeval.summarize()'s lines).
  """
  # pylint: disable=g-import-not-at-top
  if api == 'faster_coco_eval':
    from faster_coco_eval import COCO
    from faster_coco_eval import COCOeval_faster as COCOeval
  elif api == 'pycocotools':
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
  else:
    raise ValueError(f'unknown COCO API {api!r}')
  # pylint: enable=g-import-not-at-top
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    gt = COCO()
    gt.dataset = gt_dataset
    gt.createIndex()
    gt.print_function = lambda *args: None
    if not results and api == 'pycocotools':  # its loadRes needs one result
      dt = COCO()
      dt.dataset = {**gt_dataset, 'annotations': []}
      dt.createIndex()
    else:
      dt = gt.loadRes(results)
    evaluator = COCOeval(gt, dt, 'bbox')
    evaluator.print_function = print
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  lines = stdout.getvalue().splitlines()
  # faster-coco-eval adds AR@0.5 and AR@0.75; the reference's 12 come first.
  summary = [line for line in lines
             if line.lstrip().startswith('Average')][:12]
  return np.asarray(evaluator.stats, np.float64)[:12], summary


def coco_metrics(detections, info):
  """COCO metrics of one dataset's detections.

  Args:
    detections: per evaluated image a dict (see `results_list`).
    info: `data.coco.CocoInfo` of the dataset (category ids, class names and
      the ground truth).

  Returns:
    {'metrics': {AP, AP50, AP75, APs, APm, APl} (-1 = no ground truth of
    that size, as COCOeval), 'stats': float64 [12] COCOeval.stats,
    'summary': COCOeval's printed summary lines, 'results': the results
    list}.
  """
  results = results_list(detections, info.category_ids)
  gt = ground_truth_dataset(info.annotations,
                            [d['image_id'] for d in detections],
                            info.class_names, info.category_ids)
  # COCO's loadRes adds working fields to the dicts it gets.
  stats, summary = coco_eval(gt, [dict(r) for r in results])
  return {'metrics': dict(zip(METRIC_NAMES, stats[:6].tolist())),
          'stats': stats, 'summary': summary, 'results': results}
