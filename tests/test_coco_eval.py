"""coco_eval: the results file and COCOeval metrics, equal to pycocotools;
eval.py on coco_tiny reproduces the reference's COCO evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssd_jax.data import coco
from ssd_jax.evaluation import coco_eval
from tests.recipe import import_recipe_checkpoint
from tests.reference_data import fixture_path, load_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_TINY = fixture_path('coco_tiny/coco')
ANN_FILE = os.path.join(COCO_TINY, 'annotations', 'instances_minival2014.json')


def test_results_list_has_original_ids_and_xywh():
  detections = [
      {'image_id': '1007', 'boxes': np.array([[10, 20, 40, 25.5]], np.float32),
       'labels': np.array([3]), 'scores': np.array([0.75], np.float32)},
      {'image_id': '1014', 'boxes': np.zeros((0, 4), np.float32),
       'labels': np.zeros(0, int), 'scores': np.zeros(0, np.float32)},
  ]
  results = coco_eval.results_list(detections, np.array([0, 1, 5, 9, 11]))
  assert results == [{'image_id': 1007, 'category_id': 9,
                      'bbox': [10.0, 20.0, 30.0, 5.5], 'score': 0.75}]


def _jittered_detections(index, seed=0):
  """Ground-truth boxes moved a little, plus false positives, per image."""
  rng = np.random.default_rng(seed)
  detections = []
  for i in range(len(index)):
    boxes, labels, _ = index.objects(i)
    height, width = index.sizes[i]
    size = np.array([width, height] * 2, np.float32)
    fake = np.sort(rng.uniform(0, 1, (6, 2, 2)), axis=1).reshape(6, 4)
    boxes = np.concatenate([
        boxes + rng.normal(0, 6, boxes.shape).astype(np.float32),
        fake[:, [0, 2, 1, 3]] * size]).astype(np.float32)
    labels = np.concatenate([labels, rng.integers(1, 21, 6)])
    scores = rng.uniform(0.05, 1, len(labels)).astype(np.float32)
    order = np.argsort(-scores)
    detections.append({'image_id': index.image_ids[i], 'boxes': boxes[order],
                       'labels': labels[order], 'scores': scores[order]})
  return detections


def test_metrics_equal_pycocotools_on_the_same_detections():
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  index = coco.folder_index(COCO_TINY, 'coco_2014_minival', training=False)
  detections = _jittered_detections(index)
  ours = coco_eval.coco_metrics(detections, index.coco)
  gt = COCO(ANN_FILE)
  evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in ours['results']]),
                       'bbox')
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert ours['stats'][0] > 0.1  # a non-trivial case
  np.testing.assert_allclose(ours['stats'], evaluator.stats, rtol=0,
                             atol=1e-12)
  assert list(ours['metrics']) == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
  assert len(ours['summary']) == 12
  assert ours['summary'][0].startswith(' Average Precision  (AP) @[ IoU=0.50:')
  # No detection at all: zeros, not a crash.
  empty = [dict(d, boxes=d['boxes'][:0], labels=d['labels'][:0],
                scores=d['scores'][:0]) for d in detections]
  assert coco_eval.coco_metrics(empty, index.coco)['metrics']['AP'] == 0


def _iou_xywh(a, b):
  a, b = np.asarray(a, float), np.asarray(b, float)
  lo = np.maximum(a[:2], b[:2])
  hi = np.minimum(a[:2] + a[2:], b[:2] + b[2:])
  inter = np.prod(np.clip(hi - lo, 0, None))
  return inter / (np.prod(a[2:]) + np.prod(b[2:]) - inter)


def test_eval_cli_reproduces_the_reference_coco_evaluation(tmp_path):
  pytest.importorskip('torch')
  # The reference ran its COCO recipe with NUM_CLASSES 21 (20 categories).
  workdir = import_recipe_checkpoint(tmp_path, 'configs/ssd300_coco.py',
                                     '--config.model.num_classes=21')
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}',
       f'--config.data.coco_root={COCO_TINY}'],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  reference = load_fixture('coco_tiny/coco_ref.json')
  with open(workdir / 'eval' / 'coco_2014_minival_120000.json') as f:
    metrics = json.load(f)
  assert metrics.pop('step') == 120000
  assert list(metrics) == list(reference['metrics'])
  for key, value in reference['metrics'].items():
    assert metrics[key] == pytest.approx(value, abs=1e-3), key
  bbox_file = workdir / 'eval' / 'coco_2014_minival_120000_bbox.json'
  with open(bbox_file) as f:
    ours = json.load(f)
  for image_id in sorted({r['image_id'] for r in reference['bbox']}):
    theirs = [r for r in reference['bbox'] if r['image_id'] == image_id]
    mine = [r for r in ours if r['image_id'] == image_id]
    assert len(mine) == len(theirs)
    # The top detections: same category, box within IoU 0.9, score within
    # 0.02 (the test-time resize differs by one grey level in a few % of
    # the pixels, see the fixture's README).
    for ref in theirs[:20]:
      best = max((_iou_xywh(r['bbox'], ref['bbox']) for r in mine
                  if r['category_id'] == ref['category_id'] and
                  abs(r['score'] - ref['score']) <= 0.02), default=0)
      assert best >= 0.9, (image_id, ref)
  # The reference's log lines.
  assert f'Writing results to {bbox_file}...' in result.stdout
  for key in reference['metrics']:
    assert '{:<10}: {}'.format(key, round(metrics[key], 3)) in result.stdout
  assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all' in (
      result.stdout)
