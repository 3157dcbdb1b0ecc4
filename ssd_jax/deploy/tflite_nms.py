"""TFLite detection graphs whose NMS is TFLite's own post-process op.

The network (with the softmax, the per-class candidate cut and the box
deltas reordered) is converted by `export.to_tflite`'s converter; this
module appends, per image, the custom op `TFLite_Detection_PostProcess`
(the op of the TF Object Detection API's mobile SSDs, registered in the
builtin op resolver of the TFLite interpreter TensorFlow ships) by editing
the flatbuffer, and a few builtin ops that bring its outputs into the
exported convention (`export` module docstring).

The op, with use_regular_nms=True, is `core.detect.detect`'s rule:
  - box encodings [1, P, 4] (ty, tx, th, tw) are decoded against anchors
    [P, 4] (ycenter, xcenter, h, w) with scales 1 / variance (10, 10, 5, 5
    for the reference's 0.1 / 0.2);
  - per class 1..C-1 (column 0 of the [1, P, C] scores is background) the
    scores >= nms_score_threshold (set to the float32 just above
    test.confidence_threshold: detect's `>`), greedy NMS suppressing IoU >
    nms_iou_threshold, at most detections_per_class kept;
  - the max_detections best kept boxes over all classes.
detect keeps only the test.candidates_per_class best priors of each class
for its NMS; the op has no such cut, so the graph zeroes the scores below
each class's candidates_per_class-th best before the op (`pre_nms_function`:
the same candidates, and a bounded NMS when every prior passes the
threshold, as with random weights).

The op's outputs (boxes [1, N, 4] ymin, xmin, ymax, xmax; classes [1, N],
0-based without background; scores [1, N]; num_detections [1]) become the
exported ones: classes + 1 where the entry is a detection, 0 past
num_detections (a mask from LESS(position, num_detections)). The op works
on one image: a batch of B runs B ops, their outputs concatenated.
"""

import numpy as np

import jax
import jax.numpy as jnp

from ssd_jax.core import detect as detect_lib
from ssd_jax.core import priors as priors_lib

CUSTOM_OP = 'TFLite_Detection_PostProcess'


def pre_nms_function(forward, config, batch_size):
  """fn(variables, images) -> the op's inputs, image by image.

  Args:
    forward: `fn(variables, images) -> (cls_logits [B, P, C], bbox_pred
      [B, P, 4] (dx, dy, dw, dh))`, the network (already scoped).
    config: the experiment config.
    batch_size: B, static.

  Returns:
    A function returning 2 * B arrays: for each image, box encodings
    float32 [1, P, 4] (dy, dx, dh, dw) and class scores float32 [1, P, C]
    (softmax; each class's scores below its candidates_per_class-th best
    set to 0).
  """
  per_class = int(config.test.candidates_per_class)

  def fn(variables, images):
    cls_logits, bbox_pred = forward(variables, images)
    scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
    scores = jnp.swapaxes(detect_lib.keep_top_candidates(
        jnp.swapaxes(scores, 1, 2), per_class), 1, 2)
    encodings = bbox_pred.astype(jnp.float32)[..., jnp.array([1, 0, 3, 2])]
    outputs = []
    for i in range(batch_size):
      outputs += [encodings[i:i + 1], scores[i:i + 1]]
    return tuple(outputs)

  return fn


def op_options(config):
  """The op's custom options: a flexbuffer map (bytes)."""
  from flatbuffers import flexbuffers  # pylint: disable=g-import-not-at-top
  test, model = config.test, config.model
  n = int(test.max_per_image)
  # The op keeps scores >= the threshold; detect keeps scores > it.
  threshold = np.nextafter(np.float32(test.confidence_threshold),
                           np.float32(np.inf))
  center, size = 1.0 / float(model.center_variance), 1.0 / float(
      model.size_variance)
  return bytes(flexbuffers.Dumps({
      'max_detections': n,
      'max_classes_per_detection': 1,
      'detections_per_class': n,
      'use_regular_nms': True,
      'nms_score_threshold': float(threshold),
      'nms_iou_threshold': float(test.nms_threshold),
      'num_classes': int(model.num_classes) - 1,
      'y_scale': center, 'x_scale': center,
      'h_scale': size, 'w_scale': size,
  }))


def anchors(config):
  """float32 [P, 4] (ycenter, xcenter, h, w): the priors, normalised."""
  priors = np.asarray(priors_lib.generate_priors(config), np.float32)
  return np.ascontiguousarray(priors[:, [1, 0, 3, 2]])


class _GraphEditor:
  """Appends tensors and ops to subgraph 0 of a flatbuffer ModelT."""

  def __init__(self, flat_model):
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
    self.schema = schema
    self.model = flat_model
    self.graph = flat_model.subgraphs[0]

  def tensor(self, name, shape, dtype=np.float32, data=None):
    """A new tensor's index; `data`: a constant (its buffer is added)."""
    schema = self.schema
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.asarray(shape, np.int32)
    tensor.type = {np.float32: schema.TensorType.FLOAT32,
                   np.bool_: schema.TensorType.BOOL}[dtype]
    buffer = schema.BufferT()
    if data is not None:
      buffer.data = np.frombuffer(
          np.ascontiguousarray(data, dtype).tobytes(), np.uint8)
    tensor.buffer = len(self.model.buffers)
    self.model.buffers.append(buffer)
    self.graph.tensors.append(tensor)
    return len(self.graph.tensors) - 1

  def _opcode(self, builtin, custom=None):
    schema = self.schema
    for index, code in enumerate(self.model.operatorCodes):
      if code.builtinCode == builtin and (
          custom is None or code.customCode == custom.encode()):
        return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)  # the schema's placeholder
    code.version = 1
    if custom is not None:
      code.customCode = custom.encode()
    self.model.operatorCodes.append(code)
    return len(self.model.operatorCodes) - 1

  def op(self, name, inputs, outputs, options=None, custom_options=None):
    """Appends builtin op `name` (or the custom op CUSTOM_OP)."""
    schema = self.schema
    op = schema.OperatorT()
    if custom_options is not None:
      op.opcodeIndex = self._opcode(schema.BuiltinOperator.CUSTOM, name)
      op.customOptions = np.frombuffer(custom_options, np.uint8)
      op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    else:
      op.opcodeIndex = self._opcode(getattr(schema.BuiltinOperator, name))
      if options is not None:
        op.builtinOptionsType = getattr(schema.BuiltinOptions,
                                        type(options).__name__[:-1])
        op.builtinOptions = options
    op.inputs = np.asarray(inputs, np.int32)
    op.outputs = np.asarray(outputs, np.int32)
    self.graph.operators.append(op)


def append_post_process(blob, config, batch_size):
  """The flatbuffer of `pre_nms_function`'s graph, detections appended.

  Args:
    blob: TFLite flatbuffer whose subgraph 0 outputs are pre_nms_function's
      2 * batch_size tensors.
    config: the experiment config.
    batch_size: B.

  Returns:
    The flatbuffer (bytes) with outputs detection_boxes [B, N, 4],
    detection_scores [B, N], detection_classes [B, N], num_detections [B]
    (float32, the `export` module's convention); no signature.
  """
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  flat_model = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
  editor = _GraphEditor(flat_model)
  schema = editor.schema
  graph = editor.graph
  n = int(config.test.max_per_image)
  raw = list(graph.outputs)
  if len(raw) != 2 * batch_size:
    raise ValueError(f'expected {2 * batch_size} pre-NMS outputs, got '
                     f'{len(raw)}')
  anchor_tensor = editor.tensor('anchors', anchors(config).shape,
                                data=anchors(config))
  one = editor.tensor('one', [1], data=np.ones([1], np.float32))
  positions = editor.tensor('positions', [1, n],
                            data=np.arange(n, dtype=np.float32)[None])
  options = op_options(config)
  per_image = []
  for i in range(batch_size):
    boxes = editor.tensor(f'detection_boxes_{i}', [1, n, 4])
    classes = editor.tensor(f'op_classes_{i}', [1, n])
    scores = editor.tensor(f'detection_scores_{i}', [1, n])
    count = editor.tensor(f'num_detections_{i}', [1])
    editor.op(CUSTOM_OP, [raw[2 * i], raw[2 * i + 1], anchor_tensor],
              [boxes, classes, scores, count], custom_options=options)
    # detection_classes = (classes + 1) * (position < num_detections).
    shifted = editor.tensor(f'shifted_classes_{i}', [1, n])
    editor.op('ADD', [classes, one], [shifted], schema.AddOptionsT())
    valid = editor.tensor(f'valid_{i}', [1, n], np.bool_)
    editor.op('LESS', [positions, count], [valid], schema.LessOptionsT())
    mask = editor.tensor(f'valid_float_{i}', [1, n])
    cast = schema.CastOptionsT()
    cast.inDataType, cast.outDataType = (schema.TensorType.BOOL,
                                         schema.TensorType.FLOAT32)
    editor.op('CAST', [valid], [mask], cast)
    labels = editor.tensor(f'detection_classes_{i}', [1, n])
    editor.op('MUL', [shifted, mask], [labels], schema.MulOptionsT())
    per_image.append((boxes, scores, labels, count))
  outputs = []
  for k, (name, shape) in enumerate((
      ('detection_boxes', [batch_size, n, 4]),
      ('detection_scores', [batch_size, n]),
      ('detection_classes', [batch_size, n]),
      ('num_detections', [batch_size]))):
    parts = [image[k] for image in per_image]
    if batch_size == 1:
      outputs.append(parts[0])
      continue
    joined = editor.tensor(name, shape)
    concat = schema.ConcatenationOptionsT()
    concat.axis = 0
    editor.op('CONCATENATION', parts, [joined], concat)
    outputs.append(joined)
  graph.outputs = np.asarray(outputs, np.int32)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(flat_model))
