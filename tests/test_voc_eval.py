"""VOC AP: parity with the reference's evaluator (fixtures/eval.npz,
eval_ref.json) and with a plain per-prediction implementation of SPEC i."""

import json
import os

import numpy as np
import pytest

from ssd_jax.evaluation import voc_eval

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _eval_fixture():
  f = np.load(os.path.join(FIXTURES, 'eval.npz'))
  pn, gn = f['pred_num'], f['gt_num']
  n = len(pn)
  args = ([f['pred_boxes'][i, :pn[i]] for i in range(n)],
          [f['pred_labels'][i, :pn[i]] for i in range(n)],
          [f['pred_scores'][i, :pn[i]] for i in range(n)],
          [f['gt_boxes'][i, :gn[i]] for i in range(n)],
          [f['gt_labels'][i, :gn[i]] for i in range(n)],
          [f['gt_difficult'][i, :gn[i]] for i in range(n)])
  return args, f


def _plain_voc_ap(pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels,
                  gt_difficults, iou_thresh=0.5, use_07_metric=False):
  """SPEC i written out one prediction at a time (float64 arithmetic)."""
  labels_seen = set()
  for p, g in zip(pred_labels, gt_labels):
    labels_seen.update(int(x) for x in p)
    labels_seen.update(int(x) for x in g)
  n_pos = {l: 0 for l in labels_seen}
  records = {l: [] for l in labels_seen}  # (score, flag)
  for boxes, labels, scores, gtb, gtl, gtd in zip(
      pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels,
      gt_difficults):
    for l in set(int(x) for x in labels) | set(int(x) for x in gtl):
      gts = [(list(map(float, b)), bool(d))
             for b, gl, d in zip(gtb, gtl, gtd) if gl == l]
      n_pos[l] += sum(not d for _, d in gts)
      preds = [(float(s), list(map(float, b)))
               for b, pl, s in zip(boxes, labels, scores) if pl == l]
      preds.sort(key=lambda x: -x[0])
      used = [False] * len(gts)
      for score, b in preds:
        best, best_iou = -1, -1.0
        for k, (g, _) in enumerate(gts):
          iw = min(b[2], g[2]) - max(b[0], g[0]) + 1
          ih = min(b[3], g[3]) - max(b[1], g[1]) + 1
          inter = iw * ih if iw > 0 and ih > 0 else 0.0
          union = ((b[2] - b[0] + 1) * (b[3] - b[1] + 1)
                   + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter)
          if inter / union > best_iou:
            best, best_iou = k, inter / union
        if best < 0 or best_iou < iou_thresh:
          records[l].append((score, 0))
        elif gts[best][1]:
          records[l].append((score, -1))
          used[best] = True
        elif used[best]:
          records[l].append((score, 0))
        else:
          records[l].append((score, 1))
          used[best] = True
  ap = np.full(max(labels_seen) + 1, np.nan)
  for l in labels_seen:
    if n_pos[l] == 0:
      continue
    flags = [f for _, f in sorted(records[l], key=lambda r: -r[0])]
    tp = np.cumsum([f == 1 for f in flags])
    fp = np.cumsum([f == 0 for f in flags])
    with np.errstate(invalid='ignore'):
      prec = np.nan_to_num(tp / (tp + fp))
    rec = tp / n_pos[l]
    if use_07_metric:
      ap[l] = sum(prec[rec >= t].max() if (rec >= t).any() else 0.0
                  for t in np.arange(0., 1.1, 0.1)) / 11
    else:
      p = np.concatenate([[0], prec, [0]])
      r = np.concatenate([[0], rec, [1]])
      p = np.maximum.accumulate(p[::-1])[::-1]
      ap[l] = np.sum((r[1:] - r[:-1]) * p[1:])
  return ap


@pytest.mark.parametrize('use_07_metric,key', [(True, '07'), (False, 'area')])
def test_eval_fixture_parity(use_07_metric, key):
  args, f = _eval_fixture()
  result = voc_eval.eval_detection_voc(*args, use_07_metric=use_07_metric)
  ref = f[f'ap_{key}']
  assert result['ap'].shape == ref.shape
  np.testing.assert_array_equal(np.isnan(result['ap']), np.isnan(ref))
  # bird (3): gts but no predictions -> 0; diningtable (11): predictions but
  # no gts -> NaN; sofa (18): only difficult gts -> NaN; background NaN.
  assert result['ap'][3] == 0
  assert np.isnan(result['ap'][[0, 11, 18]]).all()
  np.testing.assert_allclose(result['ap'], ref, rtol=0, atol=1e-9)
  assert abs(result['map'] - float(f[f'map_{key}'])) < 1e-9
  ref_json = json.load(open(os.path.join(FIXTURES, 'eval_ref.json')))
  assert abs(result['map'] - ref_json['eval_fixture'][f'map_{key}']) < 1e-9


def _random_dataset(rng, num_images=40, num_classes=6):
  """Integer boxes, jittered/duplicated/wrong-class predictions, difficult."""
  args = [[] for _ in range(6)]
  for _ in range(num_images):
    m = rng.integers(0, 6)
    xy = rng.integers(0, 300, (m, 2))
    wh = rng.integers(4, 200, (m, 2))
    gtb = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    gtl = rng.integers(1, num_classes, m)
    gtd = rng.uniform(size=m) < 0.2
    boxes, labels = [], []
    for b, l in zip(gtb, gtl):
      for _ in range(rng.integers(0, 4)):  # 0-3 copies, jittered
        boxes.append(b + rng.normal(0, 0.15 * (b[2] - b[0]), 4))
        labels.append(l if rng.uniform() < 0.85 else rng.integers(1, 8))
    for _ in range(rng.integers(0, 4)):  # background false positives
      xy = rng.uniform(0, 300, 2)
      boxes.append(np.concatenate([xy, xy + rng.uniform(5, 150, 2)]))
      labels.append(rng.integers(1, num_classes))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    for a, v in zip(args, (boxes, np.asarray(labels, np.int64),
                           rng.uniform(size=len(labels)).astype(np.float32),
                           gtb, gtl, gtd)):
      a.append(v)
  return args


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('use_07_metric', [True, False])
def test_matches_plain_implementation(seed, use_07_metric):
  args = _random_dataset(np.random.default_rng(seed))
  result = voc_eval.eval_detection_voc(*args, use_07_metric=use_07_metric)
  plain = _plain_voc_ap(*args, use_07_metric=use_07_metric)
  np.testing.assert_array_equal(np.isnan(result['ap']), np.isnan(plain))
  np.testing.assert_allclose(result['ap'], plain, rtol=0, atol=1e-12)
  assert abs(result['map'] - np.nanmean(plain)) < 1e-12


def _one_class(preds, scores, gts, difficult=None, use_07_metric=True):
  gts = np.asarray(gts, np.float32).reshape(-1, 4)
  return voc_eval.eval_detection_voc(
      [np.asarray(preds, np.float32).reshape(-1, 4)],
      [np.ones(len(preds), np.int64)], [np.asarray(scores, np.float32)],
      [gts], [np.ones(len(gts), np.int64)],
      [np.zeros(len(gts), bool) if difficult is None else
       np.asarray(difficult)], use_07_metric=use_07_metric)


@pytest.mark.parametrize('use_07_metric', [True, False])
def test_perfect_detections_give_ap_one(use_07_metric):
  rng = np.random.default_rng(3)
  gt_boxes, gt_labels = [], []
  for _ in range(10):
    xy = rng.integers(0, 300, (4, 2))
    gt_boxes.append(np.concatenate([xy, xy + rng.integers(5, 100, (4, 2))],
                                   1).astype(np.float32))
    gt_labels.append(rng.integers(1, 21, 4))
  result = voc_eval.eval_detection_voc(
      gt_boxes, gt_labels, [rng.uniform(size=4) for _ in gt_boxes], gt_boxes,
      gt_labels, [np.zeros(4, bool) for _ in gt_boxes],
      use_07_metric=use_07_metric)
  present = np.unique(np.concatenate(gt_labels))
  np.testing.assert_allclose(result['ap'][present], 1.0, rtol=0, atol=1e-12)
  absent = np.setdiff1d(np.arange(len(result['ap'])), present)
  assert np.isnan(result['ap'][absent]).all()
  assert result['map'] == pytest.approx(1.0, abs=1e-12)


def test_duplicates_are_false_positives():
  a, b = [10, 10, 50, 50], [100, 100, 150, 180]
  # a (0.9), a again (0.8): a false positive, b (0.7): tp, fp, tp.
  prec, rec = voc_eval.precision_recall(
      [np.array([a, a, b], np.float32)], [np.array([1, 1, 1])],
      [np.array([0.9, 0.8, 0.7], np.float32)], [np.array([a, b], np.float32)],
      [np.array([1, 1])])
  np.testing.assert_allclose(prec[1], [1, 0.5, 2 / 3])
  np.testing.assert_allclose(rec[1], [0.5, 0.5, 1])
  ap = _one_class([a, a, b], [0.9, 0.8, 0.7], [a, b])['ap'][1]
  assert ap == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11, abs=1e-12)


def test_no_fallback_to_second_best_gt():
  # Both predictions overlap gt 0 best; the second one is a false positive
  # even though it also overlaps gt 1 with IoU >= 0.5.
  g0, g1 = [0, 0, 99, 99], [10, 0, 109, 99]
  p = [4, 0, 103, 99]
  prec, _ = voc_eval.precision_recall(
      [np.array([g0, p], np.float32)], [np.array([1, 1])],
      [np.array([0.9, 0.8], np.float32)], [np.array([g0, g1], np.float32)],
      [np.array([1, 1])])
  assert voc_eval.voc_iou(np.array([p], np.float32),
                          np.array([g1], np.float32))[0, 0] >= 0.5
  np.testing.assert_allclose(prec[1], [1, 0.5])


def test_difficult_objects_are_ignored():
  easy, hard = [0, 0, 49, 49], [100, 100, 139, 139]
  # A hit on the difficult box is neither true nor false positive, also the
  # second one (the box is consumed but the hit still counts as ignored).
  prec, rec = voc_eval.precision_recall(
      [np.array([hard, hard, easy], np.float32)], [np.array([1, 1, 1])],
      [np.array([0.9, 0.8, 0.7], np.float32)],
      [np.array([easy, hard], np.float32)], [np.array([1, 1])],
      [np.array([False, True])])
  assert np.isnan(prec[1][:2]).all() and prec[1][2] == 1
  np.testing.assert_array_equal(rec[1], [0, 0, 1])  # n_pos excludes difficult
  assert _one_class([hard, hard, easy], [0.9, 0.8, 0.7], [easy, hard],
                    [False, True])['ap'][1] == pytest.approx(1.0)
  # A class whose only ground truth is difficult has AP NaN.
  result = _one_class([hard], [0.9], [hard], [True])
  assert np.isnan(result['ap'][1]) and np.isnan(result['map'])


def test_iou_threshold_is_inclusive_with_plus_one_pixels():
  gt = [0, 0, 9, 9]  # 10 x 10 pixels
  # IoU exactly 0.5 is a match.
  assert _one_class([[0, 0, 9, 4]], [0.5], [gt])['ap'][1] == pytest.approx(1)
  assert _one_class([[0, 0, 9, 3]], [0.5], [gt])['ap'][1] == 0  # IoU 0.4
  np.testing.assert_allclose(
      voc_eval.voc_iou(np.array([[0, 0, 9, 4]], np.float32),
                       np.array([gt], np.float32)), [[0.5]])


def test_class_without_predictions_scores_zero():
  result = voc_eval.eval_detection_voc(
      [np.zeros((0, 4), np.float32)], [np.zeros(0, np.int64)],
      [np.zeros(0, np.float32)], [np.array([[0, 0, 9, 9]], np.float32)],
      [np.array([2])], use_07_metric=True)
  assert len(result['ap']) == 3 and result['ap'][2] == 0
  assert np.isnan(result['ap'][:2]).all()


def test_input_errors():
  with pytest.raises(ValueError, match='Length'):
    voc_eval.eval_detection_voc([np.zeros((0, 4))], [], [], [], [], [])
  with pytest.raises(ValueError, match='image 0'):
    voc_eval.eval_detection_voc(
        [np.zeros((2, 4))], [np.ones(1)], [np.ones(2)],
        [np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0, bool)])


def test_format_results_matches_reference_print():
  ref = json.load(open(os.path.join(FIXTURES, 'eval_ref.json')))
  tiny = ref['voc_tiny_model']
  ap = np.array([np.nan if v is None else v for v in tiny['ap_array_07']])
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  names = ssd300_voc.VOC_CLASSES
  text = voc_eval.format_results(ap, tiny['mAP'], names)
  # The reference logs this text after a header line; logging adds a '\n'.
  assert text + '\n' == tiny['printed'].split('\n', 1)[1]
  assert text.splitlines()[0] == 'mAP: 0.0042'
  assert 'boat            : nan' in text
