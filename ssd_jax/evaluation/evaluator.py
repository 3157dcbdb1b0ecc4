"""The Evaluator: every test set of a config, on every host, reported."""

import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
import numpy as np

from ssd_jax.deploy import visualize
from ssd_jax.evaluation import evaluate
from ssd_jax.evaluation import gather
from ssd_jax.evaluation import reports
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding


class Evaluator:
  """Evaluates every dataset of config.data.test and reports the results.

  Per dataset: `reports.report_voc` or `reports.report_coco` (log, JSON,
  TensorBoard scalars), the skip/fix counts, and a few test images with their
  detections drawn in TensorBoard.
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

    Returns {dataset name: evaluate.evaluate_dataset() result} (empty on other hosts).

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
      detections, ground_truth = evaluate.detect_dataset(
          predict, batches, self.priors, self.config, progress=is_main)
      detections, ground_truth, counts = gather.gather_to_main(
          pipeline.load_index(self.config, name), detections, ground_truth,
          batches.stats.counts)
      if not is_main:
        continue
      self.logger.info('%s: %s', name, counts.summary())
      self.writer.write_scalars(step, {
          f'data/{name}/skipped': counts.num_skipped,
          f'data/{name}/fixed': counts.num_fixed})
      result = evaluate.score_dataset(detections, ground_truth, class_names,
                                      coco=batches.coco)
      results[name] = result
      nms_line = reports.device_nms_line(
          detections, self.config.test.get('candidates_per_class', 0))
      if nms_line:
        self.logger.info('%s: %s', name, nms_line)
      if batches.coco is not None:
        reports.report_coco(result, self.workdir, name, step, self.writer,
                            self.logger)
      else:
        reports.report_voc(result, class_names, self.workdir, name, step,
                           self.writer, self.logger)
      first_batch = next(iter(pipeline.create_eval_iterator(
          self.config, name, batch_size=self.num_images_drawn,
          process_index=0, process_count=1)))
      self.writer.write_images(step, {f'detections/{name}': self._drawings(
          first_batch, result['detections'][:self.num_images_drawn],
          class_names)})
    self.writer.flush()
    return results

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
