"""ONNX detection graphs whose NMS is ONNX's NonMaxSuppression op.

jax2onnx converts the network, the softmax, the decoding and the per-class
candidate cut (`pre_nms_function`); this module appends ONNX nodes
(`append_detections`) that finish `core.detect.detect`'s rule:
  1. NonMaxSuppression over the batch and classes 1..C-1: boxes
     (ymin, xmin, ymax, xmax) corners, scores > test.confidence_threshold
     (onnxruntime keeps scores above it, strictly, as detect), greedy,
     suppressing IoU > test.nms_threshold, at most test.max_per_image kept
     per class -> selected (batch, class, prior) rows;
  2. their scores (GatherND) scattered into a [B, C-1, P] tensor of -1
     (ScatterND), flattened, the N = test.max_per_image best by TopK: equal
     scores by class, then prior (detect's exact_ties=False order);
  3. the exported outputs: boxes gathered per image, classes = the flat
     index // P + 1, the entries past the kept ones zeroed, num_detections
     their count.
The batch stays symbolic (every node works on any B).
"""

import numpy as np

import jax
import jax.numpy as jnp

from ssd_jax.core import box_ops
from ssd_jax.core import detect as detect_lib

BOXES = 'nms_boxes'
SCORES = 'nms_scores'


def pre_nms_function(network, config, priors):
  """fn(variables, images) -> (boxes, scores), NonMaxSuppression's inputs.

  Args:
    network: `fn(variables, images) -> (cls_logits [B, P, C], bbox_pred
      [B, P, 4])`.
    config: the experiment config.
    priors: float32 [P, 4] center form.

  Returns:
    A function returning boxes float32 [B, P, 4] (ymin, xmin, ymax, xmax)
    normalised, and scores float32 [B, C-1, P] (softmax without the
    background, class-major; each class's scores below its
    candidates_per_class-th best set to 0).
  """
  per_class = int(config.test.candidates_per_class)

  def fn(variables, images):
    cls_logits, bbox_pred = network(variables, images)
    scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
    scores = detect_lib.keep_top_candidates(
        jnp.swapaxes(scores[..., 1:], 1, 2), per_class)
    xyxy = box_ops.center_to_corner(box_ops.decode(
        bbox_pred.astype(jnp.float32), priors, config.model.center_variance,
        config.model.size_variance))
    return xyxy[..., jnp.array([1, 0, 3, 2])], scores

  return fn


def append_detections(onnx_model, config, num_priors, output_names):
  """`pre_nms_function`'s ONNX graph with the detections as its outputs.

  Args:
    onnx_model: ModelProto whose outputs are BOXES and SCORES.
    config: the experiment config.
    num_priors: P.
    output_names: the four exported names (boxes, scores, classes, count).

  Returns:
    The ModelProto; outputs float32 boxes [B, N, 4], scores [B, N], classes
    [B, N] (label ids, 0 past the detections), num_detections [B].
  """
  from onnx import TensorProto  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  graph = onnx_model.graph
  test = config.test
  n = int(test.max_per_image)
  num_classes = int(config.model.num_classes) - 1
  k = min(n, num_classes * num_priors)
  nodes = []

  def const(name, value):
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(op, inputs, name, **attrs):
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name

  selected = node('NonMaxSuppression', [
      BOXES, SCORES, const('nms_max_per_class', np.array([n], np.int64)),
      const('nms_iou', np.array([test.nms_threshold], np.float32)),
      const('nms_score', np.array([test.confidence_threshold], np.float32))],
                  'nms_selected', center_point_box=0)  # [M, 3]
  kept = node('GatherND', [SCORES, selected], 'nms_kept_scores')  # [M]
  empty = node('ConstantOfShape', [node('Shape', [SCORES], 'nms_shape')],
               'nms_empty', value=numpy_helper.from_array(
                   np.array([-1.0], np.float32)))
  dense = node('ScatterND', [empty, selected, kept], 'nms_dense')
  flat = node('Reshape', [dense, const('nms_flat_shape',
                                        np.array([0, -1], np.int64))],
              'nms_flat')  # [B, (C-1) P]
  nodes.append(helper.make_node(
      'TopK', [flat, const('nms_k', np.array([k], np.int64))],
      ['nms_top_scores', 'nms_top_index'], name='nms_topk', axis=-1,
      largest=1, sorted=1))
  valid = node('Greater', ['nms_top_scores',
                           const('nms_floor', np.array(-0.5, np.float32))],
               'nms_valid')  # [B, k]
  zero = const('nms_zero', np.array(0.0, np.float32))
  scores = node('Where', [valid, 'nms_top_scores', zero], 'nms_out_scores')
  priors = node('Mod', ['nms_top_index', const(
      'nms_num_priors', np.array(num_priors, np.int64))], 'nms_prior')
  label = node('Add', [node('Div', ['nms_top_index', 'nms_num_priors'],
                            'nms_class0'),
                       const('nms_one', np.array(1, np.int64))], 'nms_label')
  classes = node('Where', [valid, node('Cast', [label], 'nms_label_float',
                                       to=TensorProto.FLOAT), zero],
                 'nms_out_classes')
  last = const('nms_last_axis', np.array([-1], np.int64))
  gathered = node('GatherND', [BOXES, node('Unsqueeze', [priors, last],
                                           'nms_prior_index')],
                  'nms_gathered_boxes', batch_dims=1)  # [B, k, 4]
  boxes = node('Where', [node('Unsqueeze', [valid, last], 'nms_valid_box'),
                         gathered, zero], 'nms_out_boxes')
  count = node('ReduceSum', [
      node('Cast', [valid], 'nms_valid_float', to=TensorProto.FLOAT),
      const('nms_sum_axis', np.array([1], np.int64))], 'nms_count',
               keepdims=0)
  outputs = [boxes, scores, classes, count]
  if k < n:  # fewer (class, prior) pairs than N: zero rows appended
    outputs = [node('Pad', [x, const(f'nms_pad_{i}', np.array(
        [0, 0] + [0] * (i == 0) + [0, n - k] + [0] * (i == 0), np.int64))],
                    f'nms_padded_{i}') if i < 3 else x
               for i, x in enumerate(outputs)]
  for x, name in zip(outputs, output_names):
    nodes.append(helper.make_node('Identity', [x], [name], name=name))
  graph.node.extend(nodes)
  batch = graph.input[0].type.tensor_type.shape.dim[0]
  batch = batch.dim_param or batch.dim_value
  del graph.output[:]
  graph.output.extend([
      helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
      for name, shape in zip(output_names, (
          [batch, n, 4], [batch, n], [batch, n], [batch]))])
  return onnx_model
