"""Training with COCO-format datasets end to end: a tiny SSD on shapes
written as a custom COCO dataset, evaluated with COCOeval during training."""

import glob
import json
import os

import numpy as np
import tensorflow as tf

from ssd_jax.training import trainer
from tests import coco_testing
from tests import voc_testing
from tests.tiny import tiny_config


def test_training_and_periodic_coco_evaluation(tmp_path):
  voc_root = voc_testing.make_shapes(str(tmp_path / 'voc'), num_train=12,
                                     num_test=4, image_size=80, seed=2)
  root = str(tmp_path / 'coco')
  train = coco_testing.shapes_to_coco(voc_root, 'trainval', root,
                                      'shapes_train', first_image_id=5)
  # One training image without annotations: left out, as the reference.
  train['annotations'] = [a for a in train['annotations']
                          if a['image_id'] != 5]
  with open(os.path.join(root, 'annotations',
                         'instances_shapes_train.json'), 'w') as f:
    json.dump(train, f)
  coco_testing.shapes_to_coco(voc_root, 'test', root, 'shapes_val',
                              first_image_id=1001, crowd_first=True)
  config = tiny_config(num_classes=5)
  config.data.coco_root = root
  config.data.train = ('coco_shapes_train',)
  config.data.test = ('coco_shapes_val',)
  config.solver.optimizer = 'adam'
  config.solver.warmup_iters = 2
  config.solver.max_iter = 4
  config.test.batch_size = 4
  config.log_step = 1
  config.save_step = 4
  config.eval_step = 2
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(config, str(workdir))

  log = (workdir / 'log.txt').read_text()
  assert 'skipped 1 of 12 examples (no_annotations: 1)' in log
  assert 'Evaluating coco_shapes_val dataset(4 images):' in log
  for step in (2, 4):
    with open(workdir / 'eval' / f'coco_shapes_val_{step}.json') as f:
      metrics = json.load(f)
    assert list(metrics) == ['step', 'AP', 'AP50', 'AP75', 'APs', 'APm',
                             'APl']
    bbox_file = workdir / 'eval' / f'coco_shapes_val_{step}_bbox.json'
    with open(bbox_file) as f:
      results = json.load(f)
    assert results and {r['image_id'] for r in results} <= {
        1001, 1008, 1015, 1022}
    assert {r['category_id'] for r in results} <= {3, 8, 12, 40}
    assert all(len(r['bbox']) == 4 and r['bbox'][2] >= 0 for r in results)
    assert f'Writing results to {bbox_file}...' in log
    # The metrics are pycocotools' on the file written.
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
    gt = COCO(os.path.join(root, 'annotations', 'instances_shapes_val.json'))
    evaluator = COCOeval(gt, gt.loadRes(str(bbox_file)), 'bbox')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    np.testing.assert_allclose([metrics[k] for k in list(metrics)[1:]],
                               evaluator.stats[:6], rtol=0, atol=1e-12)
  assert log.count('AP        : ') == 2
  tags = set()
  for path in glob.glob(str(workdir / 'tf_logs' / 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags |= {v.tag for v in event.summary.value}
  assert {'metrics/coco_shapes_val/AP',
          'metrics/coco_shapes_val/APl'} <= tags
