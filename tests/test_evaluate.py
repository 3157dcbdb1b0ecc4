"""evaluate(): the reference's voc_tiny result end to end (SSD300 with the
recipe weights), and the batch-stream contract on synthetic data."""

import functools
import json
import os
import xml.etree.ElementTree as ET

from flax import nnx
import numpy as np
import pytest

from configs import ssd300_voc
from ssd_jax import models
from ssd_jax.evaluation import evaluate
from ssd_jax.evaluation import postprocess
from ssd_jax.evaluation import reports
from ssd_jax.evaluation import voc_eval
from ssd_jax.interop import torch_import
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib
from tests import detection_checks
from tests import recipe

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
VOC_TINY = os.path.join(FIXTURES, 'voc_tiny', 'VOC2007')
CLASSES = ssd300_voc.VOC_CLASSES


def _annotation(image_id):
  """Ground truth as the reference's VOC loader reads it (coordinates - 1)."""
  root = ET.parse(os.path.join(VOC_TINY, 'Annotations', f'{image_id}.xml'))
  boxes, labels, difficult = [], [], []
  for obj in root.findall('object'):
    box = obj.find('bndbox')
    boxes.append([float(box.find(k).text) - 1
                  for k in ('xmin', 'ymin', 'xmax', 'ymax')])
    labels.append(CLASSES.index(obj.find('name').text.strip().lower()))
    difficult.append(int(obj.find('difficult').text or 0))
  return (np.array(boxes, np.float32), np.array(labels, np.int32),
          np.array(difficult, bool))


def _batches(images, image_ids, orig_sizes, annotations, batch_size,
             max_boxes=8):
  """The data pipeline's eval batches: padded boxes, padding images last."""
  for first in range(0, len(images), batch_size):
    batch = {
        'image': np.zeros((batch_size,) + images.shape[1:], images.dtype),
        'image_id': np.array([''] * batch_size, object),
        'orig_size': np.ones((batch_size, 2), np.int32),
        'boxes': np.zeros((batch_size, max_boxes, 4), np.float32),
        'labels': np.zeros((batch_size, max_boxes), np.int32),
        'difficult': np.zeros((batch_size, max_boxes), bool),
        'mask': np.zeros((batch_size, max_boxes), bool),
        'valid': np.zeros(batch_size, bool),
    }
    for j, i in enumerate(range(first, min(first + batch_size, len(images)))):
      boxes, labels, difficult = annotations[i]
      m = len(labels)
      batch['image'][j] = images[i]
      batch['image_id'][j] = image_ids[i].encode()  # bytes, as from TF
      batch['orig_size'][j] = orig_sizes[i]
      batch['boxes'][j, :m] = boxes
      batch['labels'][j, :m] = labels
      batch['difficult'][j, :m] = difficult
      batch['mask'][j, :m] = True
      batch['valid'][j] = True
    yield batch


@pytest.fixture(scope='module')
def voc_tiny():
  """evaluate() of the recipe-weights SSD300 on voc_tiny's test split."""
  config = ssd300_voc.get_config()
  # Abstract parameters (no random init, which is slow), then the recipe's.
  model = nnx.eval_shape(lambda: models.create_model(config))
  torch_import.load_detector_state_dict(model, recipe.recipe_state_dict())
  model_def, params, model_state = variables_lib.split_model(model)
  state = variables_lib.ModelVariables(params=params, model_state=model_state)
  # The predict step as the evaluator uses it: uint8 pixels in.
  predict = predict_lib.make_predict_step(config, model_def)

  ref = np.load(os.path.join(FIXTURES, 'voc_tiny_dets.npz'))
  images = ref['test_inputs_uint8']
  assert images.dtype == np.uint8
  ids = [str(i) for i in ref['image_ids']]
  annotations = [_annotation(i) for i in ids]
  priors = np.load(os.path.join(FIXTURES, 'priors_ssd300.npy'))
  # Batches of 3: the second holds 2 images and 1 padding image.
  result = evaluate.evaluate_dataset(
      functools.partial(predict, state),
      _batches(images, ids, ref['orig_hw'], annotations, batch_size=3),
      priors, config, CLASSES, progress=False)
  return result, ref, annotations


def test_voc_tiny_detections_match_reference(voc_tiny):
  result, ref, _ = voc_tiny
  assert result['num_images'] == 5
  assert [d['image_id'] for d in result['detections']] == list(
      ref['image_ids'])
  swapped = 0
  for i, det in enumerate(result['detections']):
    n = ref['num_dets'][i]
    swapped += detection_checks.assert_same_detections(
        det, ref['boxes'][i, :n], ref['labels'][i, :n], ref['scores'][i, :n],
        score_atol=1e-5, box_atol=1e-2)
  assert swapped == 0  # no float32 ties here: the order is exact


def test_voc_tiny_map_matches_reference(voc_tiny):
  result, _, annotations = voc_tiny
  ref = json.load(open(os.path.join(FIXTURES, 'eval_ref.json')))
  ref = ref['voc_tiny_model']
  assert abs(result['map'] - ref['mAP']) < 1e-9
  assert abs(result['map_area'] - ref['map_area_metric']) < 1e-9
  for ours, theirs in ((result['ap'], ref['ap_array_07']),
                       (result['ap_area'], ref['ap_array_area'])):
    theirs = np.array([np.nan if v is None else v for v in theirs])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
  # The same numbers straight from the evaluator on the returned detections.
  dets = result['detections']
  direct = voc_eval.eval_detection_voc(
      [d['boxes'] for d in dets], [d['labels'] for d in dets],
      [d['scores'] for d in dets], *zip(*annotations), use_07_metric=True)
  assert direct['map'] == result['map']


def test_voc_tiny_outputs(voc_tiny):
  result, _, _ = voc_tiny
  ref = json.load(open(os.path.join(FIXTURES, 'eval_ref.json')))
  ref = ref['voc_tiny_model']
  assert reports.result_text(result, CLASSES) + '\n' == ref['printed'].split(
      '\n', 1)[1]
  record = reports.result_json(result, CLASSES, step=120000)
  assert record['step'] == 120000
  assert record['map'] == pytest.approx(ref['mAP'], abs=1e-12)
  assert record['map_area'] == pytest.approx(ref['map_area_metric'],
                                             abs=1e-12)
  assert list(record['ap']) == list(CLASSES[1:])
  assert record['ap']['boat'] is None and record['ap']['chair'] is None
  assert record['ap']['tvmonitor'] == pytest.approx(
      ref['per_class_ap']['tvmonitor'], abs=1e-12)
  json.dumps(record, allow_nan=False)  # plain JSON: no NaN


class _Recorder:
  """A numpy predict_fn whose logits put one confident box per image."""

  def __init__(self, priors, events):
    self.priors = priors
    self.events = events

  def __call__(self, images):
    self.events.append(('predict', images.shape[0]))
    b = images.shape[0]
    logits = np.zeros((b, len(self.priors), 4), np.float32)
    logits[..., 0] = 10
    # image value v -> prior v confidently of class 1 + v % 3
    index = images[:, 0, 0, 0].astype(int)
    logits[np.arange(b), index, 1 + index % 3] = 20
    return logits, np.zeros((b, len(self.priors), 4), np.float32)


def _synthetic(num_images, batch_size):
  rng = np.random.default_rng(0)
  priors = np.concatenate([rng.uniform(0.3, 0.7, (50, 2)),
                           rng.uniform(0.1, 0.3, (50, 2))], 1).astype(
                               np.float32)
  images = np.zeros((num_images, 4, 4, 3), np.float32)
  images[:, 0, 0, 0] = np.arange(num_images)
  sizes = np.stack([rng.integers(100, 500, num_images),
                    rng.integers(100, 500, num_images)], 1)
  corners = (priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2)
  annotations = []
  for i in range(num_images):
    h, w = sizes[i]
    scale = np.array([w, h], np.float32)
    box = np.concatenate([corners[0][i] * scale, corners[1][i] * scale])
    # The box the predictor finds, and a difficult one it misses.
    annotations.append((np.stack([box, box + 40]).astype(np.float32),
                        np.array([1 + i % 3] * 2), np.array([False, True])))
  ids = [f'{i:06d}' for i in range(num_images)]
  return priors, images, ids, sizes, annotations


@pytest.mark.parametrize('num_images,batch_size,limit',
                         [(11, 4, None), (11, 4, 6), (8, 4, None)])
def test_stream_contract(num_images, batch_size, limit):
  priors, images, ids, sizes, annotations = _synthetic(num_images, batch_size)
  events = []
  config = ssd300_voc.get_config()
  result = evaluate.evaluate_dataset(
      _Recorder(priors, events),
      _batches(images, ids, sizes, annotations, batch_size), priors, config,
      CLASSES, num_images=limit, progress=False)
  n = num_images if limit is None else limit
  # Every valid image exactly once, in order; padding images skipped.
  assert result['num_images'] == n
  assert [d['image_id'] for d in result['detections']] == ids[:n]
  assert len(events) == -(-n // batch_size)  # no batch run past the limit
  for i, det in enumerate(result['detections']):
    assert det['labels'][0] == 1 + i % 3
    np.testing.assert_allclose(det['boxes'][0], annotations[i][0][0],
                               atol=1e-3)
  # The mAP is the evaluator's on the same detections and ground truth.
  dets = result['detections']
  gt = annotations[:n]
  for use_07, key in ((True, 'map'), (False, 'map_area')):
    direct = voc_eval.eval_detection_voc(
        [d['boxes'] for d in dets], [d['labels'] for d in dets],
        [d['scores'] for d in dets], [g[0] for g in gt], [g[1] for g in gt],
        [g[2] for g in gt], use_07_metric=use_07)
    assert result[key] == direct['map']
  assert result['ap'].shape == result['ap_area'].shape == (len(CLASSES),)
  # Perfect detections for the classes present (1..3), NaN elsewhere.
  np.testing.assert_allclose(result['ap'][1:4], 1.0, atol=1e-12)
  assert np.isnan(result['ap'][4:]).all() and np.isnan(result['ap'][0])


def test_dispatches_next_batch_before_postprocessing(monkeypatch):
  priors, images, ids, sizes, annotations = _synthetic(10, 4)
  events = []
  detect = postprocess.detect

  def recording_detect(cls_logits, *args, **kwargs):
    events.append(('detect', len(cls_logits)))
    return detect(cls_logits, *args, **kwargs)

  monkeypatch.setattr(postprocess, 'detect', recording_detect)
  evaluate.evaluate_dataset(_Recorder(priors, events),
                    _batches(images, ids, sizes, annotations, 4), priors,
                    ssd300_voc.get_config(), CLASSES, progress=False)
  assert events == [('predict', 4), ('predict', 4), ('detect', 4),
                    ('predict', 4), ('detect', 4), ('detect', 2)]


def test_empty_stream():
  with pytest.raises(ValueError, match='no valid image'):
    evaluate.evaluate_dataset(lambda x: None, iter([]), np.zeros((1, 4)),
                      ssd300_voc.get_config(), CLASSES, progress=False)
