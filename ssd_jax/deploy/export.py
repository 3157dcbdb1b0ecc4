"""The trained network, softmax and box decoding as a portable graph.

    python export.py --workdir=W --format=onnx --output=ssd.onnx
    python export.py --workdir=W --format=saved_model --output=DIR
    python export.py --workdir=W --format=stablehlo --output=ssd.shlo

The exported function (`serving_function`):
  images  float32 [B, S, S, 3]: RGB, 0..255, already resized to the model's
          input size S (`inference.resize_for_model` is the resize evaluation
          uses); the mean subtraction is inside.
  boxes   float32 [B, P, 4]: every prior's decoded box, (xmin, ymin, xmax,
          ymax) normalised to [0, 1] (multiply by the original width/height).
  scores  float32 [B, P, C]: softmax class probabilities, column 0 the
          background.
B is symbolic unless --batch_size is given. Thresholding, per-class NMS and
top-k (postprocess.detect) stay outside the graph: the serving side runs its
own NMS (onnxruntime-extensions, TF's combined_non_max_suppression, ...).

The graph is the model's plain XLA form: the CPU-only Winograd convolutions
are switched off while tracing (`layers.cpu_kernels(False)`), so the exported
convolutions are ordinary ones that every backend and converter knows.

Formats:
  stablehlo    jax.export, serialized (`jax.export.deserialize(...).call`),
               lowered for CPU, CUDA and TPU.
  saved_model  jax2tf (the StableHLO inside an XlaCallModule op; parameters as
               tf.Variables); signature 'serving_default' images -> {boxes,
               scores}. Loads with TF >= 2.15 on CPU or GPU.
  onnx         jax2onnx (opset 18), inputs/outputs named images, boxes, scores.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.core import box_ops
from ssd_jax.core import priors as priors_lib
from ssd_jax.runtime import kernels
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib

FORMATS = ('onnx', 'saved_model', 'stablehlo')
ONNX_OPSET = 18
STABLEHLO_PLATFORMS = ('cpu', 'cuda', 'tpu')


def serving_function(model, config):
  """The exported computation as (fn(variables, images), variables).

  Args:
    model: an NNX SSD of `config`.
    config: its experiment config.

  Returns:
    `fn(variables, images) -> (boxes, scores)` (shapes in the module
    docstring), pure and traceable, and `variables`, the model's arrays (the
    ModelVariables) to pass to it.
  """
  model_def, variables = variables_lib.model_variables(model)
  priors = np.asarray(priors_lib.generate_priors(config), np.float32)
  pixel_mean = np.asarray(config.input.pixel_mean, np.float32)
  center_variance = config.model.center_variance
  size_variance = config.model.size_variance

  def fn(variables, images):
    with kernels.step_kernels(cpu_kernels=False).scope():  # plain XLA
      cls_logits, bbox_pred = predict_lib.predict(
          model_def, variables, images.astype(jnp.float32) - pixel_mean)
    scores = jax.nn.softmax(cls_logits, axis=-1)
    boxes = box_ops.center_to_corner(box_ops.decode(
        bbox_pred, priors, center_variance, size_variance))
    return boxes, scores

  return fn, variables


def _image_shape(config, batch_size):
  size = int(config.input.image_size)
  return (batch_size, size, size, 3)


def to_stablehlo(model, config, batch_size=None,
                 platforms=STABLEHLO_PLATFORMS):
  """A `jax.export.Exported` of images -> (boxes, scores), parameters inside.

  Serialize with `.serialize()`; `jax.export.deserialize(blob).call(images)`
  runs it on any of `platforms`.
  """
  fn, variables = serving_function(model, config)
  shape = _image_shape(config, batch_size)
  if batch_size is None:
    shape = jax.export.symbolic_shape('b') + shape[1:]
  return jax.export.export(
      jax.jit(lambda images: fn(variables, images)),
      platforms=platforms)(jax.ShapeDtypeStruct(shape, jnp.float32))


def to_saved_model(model, config, path, batch_size=None,
                   platforms=STABLEHLO_PLATFORMS):
  """Writes a TF SavedModel (signature 'serving_default') to `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn, variables = serving_function(model, config)
  leaves, treedef = jax.tree.flatten(variables)
  shape = _image_shape(config, batch_size)
  converted = jax2tf.convert(
      lambda leaves, images: fn(jax.tree.unflatten(treedef, leaves), images),
      with_gradient=False,
      polymorphic_shapes=[None, '(b, _, _, _)' if batch_size is None else None],
      native_serialization_platforms=platforms)

  module = tf.Module()
  module.variables_list = [tf.Variable(np.asarray(x), trainable=False)
                           for x in leaves]

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec(shape, tf.float32, name='images')])
  def serve(images):
    boxes, scores = converted(module.variables_list, images)
    return {'boxes': boxes, 'scores': scores}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


def _nhwc_max_pools_to_2d(onnx_model):
  """Rewrites jax2onnx's max pools into the 2-D NCHW MaxPool runtimes run.

  jax2onnx (0.17) lowers an NHWC `reduce_window` max as Unsqueeze, Unsqueeze,
  a 4-D MaxPool with kernel [1, kh, kw, 1], Squeeze; onnxruntime has no 4-D
  pooling. Each such chain becomes Transpose to NCHW, a 2-D MaxPool with the
  same window, strides and padding (MaxPool pads with -inf, as
  `reduce_window` does), Transpose back. Other MaxPools are left alone.
  """
  from onnx import helper  # pylint: disable=g-import-not-at-top
  graph = onnx_model.graph
  producer = {out: node for node in graph.node for out in node.output}
  consumers = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  replacement = {}
  for node in graph.node:
    if node.op_type != 'MaxPool':
      continue
    attrs = {a.name: list(a.ints) for a in node.attribute}
    kernel = attrs['kernel_shape']
    if len(kernel) != 4 or kernel[0] != 1 or kernel[3] != 1:
      continue
    if set(attrs) - {'kernel_shape', 'strides', 'pads'}:
      raise ValueError(f'MaxPool {node.name}: unexpected attributes {attrs}')
    unsqueeze1 = producer.get(node.input[0])
    unsqueeze0 = unsqueeze1 and producer.get(unsqueeze1.input[0])
    squeeze = consumers.get(node.output[0], [])
    if (not unsqueeze0 or unsqueeze0.op_type != 'Unsqueeze' or
        unsqueeze1.op_type != 'Unsqueeze' or len(squeeze) != 1 or
        squeeze[0].op_type != 'Squeeze' or
        len(consumers[unsqueeze0.output[0]]) != 1 or
        len(consumers[unsqueeze1.output[0]]) != 1):
      raise ValueError(f'MaxPool {node.name}: not the Unsqueeze/MaxPool/'
                       'Squeeze chain this jax2onnx version was seen to emit')
    strides = attrs.get('strides', [1] * 4)
    pads = attrs.get('pads', [0] * 8)
    if strides[0] != 1 or strides[3] != 1 or any(
        pads[i] for i in (0, 3, 4, 7)):
      raise ValueError(f'MaxPool {node.name}: pools over batch or channels')
    nchw_in, nchw_out = node.name + '_nchw_in', node.name + '_nchw_out'
    replacement[id(unsqueeze0)] = []
    replacement[id(unsqueeze1)] = []
    replacement[id(squeeze[0])] = []
    replacement[id(node)] = [
        helper.make_node('Transpose', [unsqueeze0.input[0]], [nchw_in],
                         name=node.name + '_to_nchw', perm=[0, 3, 1, 2]),
        helper.make_node('MaxPool', [nchw_in], [nchw_out], name=node.name,
                         kernel_shape=kernel[1:3], strides=strides[1:3],
                         pads=[pads[1], pads[2], pads[5], pads[6]]),
        helper.make_node('Transpose', [nchw_out], [squeeze[0].output[0]],
                         name=node.name + '_to_nhwc', perm=[0, 2, 3, 1]),
    ]
  nodes = [new for node in graph.node
           for new in replacement.get(id(node), [node])]
  del graph.node[:]
  graph.node.extend(nodes)
  used = {name for node in graph.node for name in node.input}
  unused = [init for init in graph.initializer if init.name not in used]
  for init in unused:
    graph.initializer.remove(init)
  return onnx_model


def to_onnx(model, config, batch_size=None, opset=ONNX_OPSET):
  """An onnx.ModelProto: input 'images', outputs 'boxes', 'scores'."""
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  fn, variables = serving_function(model, config)
  shape = _image_shape(config, batch_size)
  if batch_size is None:
    shape = ('batch',) + shape[1:]
  onnx_model = jax2onnx.to_onnx(
      lambda images: fn(variables, images), [shape],
      model_name='ssd_jax', opset=opset, input_names=['images'],
      output_names=['boxes', 'scores'])
  onnx_model = _nhwc_max_pools_to_2d(onnx_model)
  onnx.checker.check_model(onnx_model)
  return onnx_model


def export(model, config, fmt, output, batch_size=None):
  """Writes `model` in format `fmt` (one of FORMATS) to `output`."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown export format {fmt!r}; choose one of '
                     f'{", ".join(FORMATS)}')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'--batch_size must be >= 1, got {batch_size}')
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  if fmt == 'stablehlo':
    with open(output, 'wb') as f:
      f.write(to_stablehlo(model, config, batch_size).serialize())
  elif fmt == 'saved_model':
    to_saved_model(model, config, output, batch_size)
  else:
    import onnx  # pylint: disable=g-import-not-at-top
    onnx.save(to_onnx(model, config, batch_size), output)
