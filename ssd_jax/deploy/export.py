"""The trained detector, NMS included, as a portable graph.

    python export.py --workdir=W --format=onnx --output=ssd.onnx
    python export.py --workdir=W --format=saved_model --output=DIR
    python export.py --workdir=W --format=tflite --output=ssd.tflite \
        [--quantize=none|float16|int8] [--calibration_dir=DIR]
    python export.py --workdir=W --format=stablehlo --output=ssd.shlo

The exported function (`serving_function`), NMS inside (the default):
  images             uint8 [B, S, S, 3]: RGB, already resized to the model's
                     input size S (`inference.resize_for_model` is the resize
                     evaluation uses); the mean subtraction is inside. uint8
                     in every format.
  detection_boxes    float32 [B, N, 4]: (ymin, xmin, ymax, xmax) normalised
                     to [0, 1] (multiply by the original height/width).
  detection_scores   float32 [B, N], descending.
  detection_classes  float32 [B, N]: label ids 1..C-1 (0 in padding).
  num_detections     float32 [B]: the valid entries of each row.
N = test.max_per_image; the TF Object Detection API's convention. The
post-processing is `core.detect.detect` (the reference's thresholds, per-class
top-k, greedy NMS, top-N) with `exact_ties=False` (equal scores ordered by
class, then prior: a plain top-k instead of a three-key sort). TFLite runs
the same rule in TFLite's TFLite_Detection_PostProcess op (`tflite_nms`),
ONNX in NonMaxSuppression (`onnx_nms`).

With `raw=True` (`--raw_outputs`) the graph stops before thresholding:
  images  float32 [B, S, S, 3] RGB 0..255 -> boxes float32 [B, P, 4] (every
  prior's decoded box, xmin, ymin, xmax, ymax in [0, 1]) and scores float32
  [B, P, C] (softmax, column 0 background).

B is symbolic unless batch_size is given (TFLite: fixed, default 1).

The graph is the model's plain XLA form: the CPU-only Winograd convolutions
are switched off while tracing (`layers.cpu_kernels(False)`), so the exported
convolutions are ordinary ones that every backend and converter knows.

Formats:
  stablehlo    jax.export, serialized (`jax.export.deserialize(...).call`),
               lowered for CPU, CUDA and TPU.
  saved_model  jax2tf (the StableHLO inside an XlaCallModule op; parameters as
               tf.Variables); signature 'serving_default'. Loads with
               TF >= 2.15 on CPU or GPU.
  onnx         jax2onnx (opset 18) converts the network, the softmax, the
               decoding and the per-class candidate cut; the NMS is ONNX's
               NonMaxSuppression (per image and class), then GatherND,
               ScatterND and TopK to the best N, appended with onnx.helper
               (`onnx_nms`: the same rule as core.detect); any batch.
  tflite       tf.lite.TFLiteConverter.experimental_from_jax (jax2tf's
               XlaCallModule is no TFLite op) converts the network, the
               softmax and the per-class candidate cut only; the NMS is
               TFLite's own custom op TFLite_Detection_PostProcess
               (regular, per-class NMS; in the builtin op resolver of
               TensorFlow's interpreter), appended to the flatbuffer with
               the ops that shift its classes to label ids, one op per image
               of the fixed batch (`tflite_nms`: the same rule as
               core.detect). A 'serving_default' signature is added.
               quantize='float16' stores the weights as float16.
               quantize='int8': the network's file is quantized by
               ai-edge-quantizer before the op is appended: the ops of
               INT8_OPS inside the network (named NETWORK_SCOPE while
               tracing) get static int8 weights (per channel) and
               activations (per tensor), calibrated on real images
               (`calibration_images`: --calibration_dir or the config's
               first training set); the softmax, the cut and the op stay
               float in the same file (the TFLite converter's own int8
               path crashes; see docs/deployment.md).

Every export runs the written artifact with its runtime on sample images and
compares its detections with the JAX model's (`verify`) before returning;
float16 weights with IoU >= 0.9 and scores within 0.02 (FLOAT16_TOLERANCES)
for at least half of them (FLOAT16_MIN_AGREEMENT); int8 on calibration
images (random ones say nothing about a quantized model): at least
INT8_MIN_AGREEMENT of the JAX detections above 0.3 found with the same label
and IoU >= 0.5 (`int8_agreement`);
a disagreement raises VerificationError, a converter failure ExportError,
each with a one-line message.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.core import box_ops
from ssd_jax.core import detect as detect_lib
from ssd_jax.core import priors as priors_lib
from ssd_jax.deploy import onnx_nms
from ssd_jax.deploy import tflite_nms
from ssd_jax.runtime import kernels
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib

FORMATS = ('onnx', 'saved_model', 'tflite', 'stablehlo')
QUANTIZATIONS = ('none', 'float16', 'int8')
ONNX_OPSET = 18
STABLEHLO_PLATFORMS = ('cpu', 'cuda', 'tpu')
OUTPUT_NAMES = ('detection_boxes', 'detection_scores', 'detection_classes',
                'num_detections')
RAW_OUTPUT_NAMES = ('boxes', 'scores')
NETWORK_SCOPE = 'ssd_network'
# Verification of float formats: every detection scoring above VERIFY_SCORE
# must have a partner with the same label, IoU >= VERIFY_IOU and a score
# within VERIFY_SCORE_ATOL.
VERIFY_SCORE = 0.05
VERIFY_IOU = 0.99
VERIFY_SCORE_ATOL = 1e-3
# float16 weights move scores by more than 1e-3: (min IoU, score tolerance),
# and the least share of detections that must agree (with random weights'
# near-equal scores a few flips cascade through NMS).
FLOAT16_TOLERANCES = (0.9, 0.02)
FLOAT16_MIN_AGREEMENT = 0.5
# int8: the network's ops of these kinds get int8 weights and activations
# (ai-edge-quantizer, static ranges calibrated on real images). The rest of
# the network (the L2Norm's sum, square root and division: int8 division by
# a norm rounded to zero fails) and all of the post-processing stay float.
INT8_OPS = ('CONV_2D', 'DEPTHWISE_CONV_2D', 'FULLY_CONNECTED', 'ADD', 'MUL',
            'MAX_POOL_2D', 'AVERAGE_POOL_2D', 'PAD', 'RESHAPE', 'SLICE',
            'CONCATENATION', 'HARD_SWISH', 'LOGISTIC', 'MEAN')
CALIBRATION_IMAGES = 100  # the default calibration set's size
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
# int8 verification: the share of the JAX model's detections above
# INT8_VERIFY_SCORE that the int8 file finds (same label, IoU >=
# INT8_VERIFY_IOU), on INT8_VERIFY_IMAGES calibration images, must reach
# INT8_MIN_AGREEMENT (docs/deployment.md: what trained models measure).
INT8_VERIFY_SCORE = 0.3
INT8_VERIFY_IOU = 0.5
INT8_VERIFY_IMAGES = 16
INT8_MIN_AGREEMENT = 0.8


class ExportError(Exception):
  """A converter could not handle the model (one-line message)."""


class VerificationError(Exception):
  """The exported artifact disagrees with the JAX detector."""


class CalibrationError(ExportError):
  """The int8 calibration images cannot be read (one-line message)."""


def output_names(raw=False):
  return RAW_OUTPUT_NAMES if raw else OUTPUT_NAMES


def input_dtype(raw=False):
  return np.float32 if raw else np.uint8


def serving_function(model, config, raw=False, for_tf=False):
  """The exported computation as (fn(variables, images), variables).

  Args:
    model: an NNX SSD of `config`.
    config: its experiment config.
    raw: stop before thresholding and NMS (module docstring).
    for_tf: for jax2tf's XlaCallModule: top-k as a sort, equal scores in
      the host path's order (TF 2.21 reads no StableHLO composites).

  Returns:
    `fn(variables, images) -> tuple` of the outputs named by
    `output_names(raw)` (shapes in the module docstring), pure and
    traceable, and `variables`, the model's arrays (the ModelVariables) to
    pass to it.
  """
  network, variables = _network(model, config)
  priors = np.asarray(priors_lib.generate_priors(config), np.float32)
  size = config.input.image_size

  def fn(variables, images):
    cls_logits, bbox_pred = network(variables, images)
    if raw:
      scores = jax.nn.softmax(cls_logits, axis=-1)
      boxes = box_ops.center_to_corner(box_ops.decode(
          bbox_pred, priors, config.model.center_variance,
          config.model.size_variance))
      return boxes, scores
    detections = detect_lib.detect(cls_logits, bbox_pred, priors, config,
                                   exact_ties=for_tf, top_k_by_sort=for_tf)
    xyxy = detect_lib.to_normalized(detections.boxes, size)
    yxyx = jnp.stack([xyxy[..., 1], xyxy[..., 0], xyxy[..., 3],
                      xyxy[..., 2]], axis=-1)
    return (yxyx, detections.scores,
            detections.labels.astype(jnp.float32),
            detections.num_detections.astype(jnp.float32))

  return fn, variables


def _network(model, config):
  """(fn(variables, images) -> (cls_logits, bbox_pred), variables).

  images: [B, S, S, 3] RGB pixel values (any dtype; the mean subtraction
  is inside); cls_logits [B, P, C], bbox_pred [B, P, 4] (dx, dy, dw, dh).
  Traced with plain XLA convolutions, its ops named NETWORK_SCOPE (int8
  TFLite quantizes those only).
  """
  model_def, variables = variables_lib.model_variables(model)
  forward = predict_lib.pixels_to_outputs(model_def, config)

  def network(variables, images):
    with kernels.step_kernels(cpu_kernels=False).scope(), jax.named_scope(
        NETWORK_SCOPE):  # plain XLA
      return forward(variables, images)

  return network, variables


def _image_shape(config, batch_size):
  size = int(config.input.image_size)
  return (batch_size, size, size, 3)


def to_stablehlo(model, config, batch_size=None,
                 platforms=STABLEHLO_PLATFORMS, raw=False):
  """A `jax.export.Exported` of images -> outputs, parameters inside.

  Serialize with `.serialize()`; `jax.export.deserialize(blob).call(images)`
  runs it on any of `platforms`.
  """
  fn, variables = serving_function(model, config, raw)
  shape = _image_shape(config, batch_size)
  if batch_size is None:
    shape = jax.export.symbolic_shape('b') + shape[1:]
  return jax.export.export(
      jax.jit(lambda images: fn(variables, images)),
      platforms=platforms)(jax.ShapeDtypeStruct(shape, input_dtype(raw)))


def to_saved_model(model, config, path, batch_size=None,
                   platforms=STABLEHLO_PLATFORMS, raw=False):
  """Writes a TF SavedModel (signature 'serving_default') to `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn, variables = serving_function(model, config, raw, for_tf=True)
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
      tf.TensorSpec(shape, tf.as_dtype(input_dtype(raw)), name='images')])
  def serve(images):
    outputs = converted(module.variables_list, images)
    return dict(zip(output_names(raw), outputs))

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


def to_tflite(model, config, batch_size=1, quantize='none', raw=False,
              calibration_images=None):
  """The TFLite flatbuffer (bytes): input 'images', outputs in order.

  With NMS: the converted network's per-image box encodings and scores
  (`tflite_nms.pre_nms_function`), then TFLite_Detection_PostProcess
  (`tflite_nms.append_post_process`).

  The file has one signature, 'serving_default', naming the input and the
  outputs (`interpreter.get_signature_runner()`).

  Args:
    model, config: the NNX SSD and its config.
    batch_size: the file's fixed batch size (None: 1).
    quantize: one of QUANTIZATIONS; 'int8' quantizes the network (INT8_OPS)
      after conversion with ai-edge-quantizer, calibrated on
      `calibration_images`, and leaves the post-processing float (the
      detection op is appended after quantization).
    raw: the graph without NMS (module docstring); not with 'int8'.
    calibration_images: int8 only: uint8 [N, S, S, 3] real images
      (`calibration_images()`), N >= batch_size.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if quantize not in QUANTIZATIONS:
    raise ValueError(f'unknown quantization {quantize!r}; choose one of '
                     f'{", ".join(QUANTIZATIONS)}')
  if quantize == 'int8' and raw:
    raise ValueError('--quantize=int8 exports the graph with NMS only, not '
                     '--raw_outputs')
  batch_size = batch_size or 1
  if raw:
    fn, variables = serving_function(model, config, raw)
    names = RAW_OUTPUT_NAMES
  else:  # the network; TFLite's detection op is appended below
    network, variables = _network(model, config)
    fn = tflite_nms.pre_nms_function(network, config, batch_size)
    names = [f'{name}_{i}' for i in range(batch_size)
             for name in ('box_encodings', 'class_scores')]
  example = np.zeros(_image_shape(config, batch_size), input_dtype(raw))
  converter = tf.lite.TFLiteConverter.experimental_from_jax(
      [lambda images: fn(variables, images)], [[('images', example)]])
  if quantize == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  blob = _with_signature(converter.convert(), names)
  if quantize == 'int8':
    blob = _quantize_network_int8(blob, calibration_images, batch_size)
  if not raw:
    blob = _with_signature(
        tflite_nms.append_post_process(blob, config, batch_size),
        OUTPUT_NAMES)
  return blob


def _with_signature(blob, names):
  """The flatbuffer with a 'serving_default' signature: images -> names."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  flat_model = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
  main = flat_model.subgraphs[0]

  def tensor_map(name, index):
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = name.encode(), index
    return entry

  signature = schema.SignatureDefT()
  signature.signatureKey = b'serving_default'
  signature.subgraphIndex = 0
  signature.inputs = [tensor_map('images', main.inputs[0])]
  signature.outputs = [tensor_map(name, index)
                       for name, index in zip(names, main.outputs)]
  flat_model.signatureDefs = [signature]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(flat_model))


def _quantize_network_int8(blob, images, batch_size):
  """Static int8 quantization of the network's ops of a float flatbuffer.

  Args:
    blob: the float TFLite file of `to_tflite`'s network, before the
      detection op (with its signature).
    images: uint8 [N, S, S, 3] calibration images.
    batch_size: the file's batch size; the images are fed in batches of it.

  Returns:
    The flatbuffer with int8 weights and activations for the ops of INT8_OPS
    inside NETWORK_SCOPE; every other op as it was.
  """
  from ai_edge_quantizer import calibrator  # pylint: disable=g-import-not-at-top
  from ai_edge_quantizer import quantizer  # pylint: disable=g-import-not-at-top
  if images is None or len(images) < batch_size:
    raise ValueError('--quantize=int8 needs at least batch_size calibration '
                     'images')
  images = np.asarray(images, np.uint8)
  batches = [{'images': images[i:i + batch_size]}
             for i in range(0, len(images) - batch_size + 1, batch_size)]
  network_quantizer = quantizer.Quantizer(blob)
  for op in INT8_OPS:
    network_quantizer.add_static_config(
        NETWORK_SCOPE, op, activation_num_bits=8, weight_num_bits=8)
  # The profiler-based calibration records min/max inside the interpreter
  # (the default mode reads every tensor back; it failed on the tensors of
  # the NMS WHILE loop the file had before the detection op replaced it).
  ranges = network_quantizer.calibrate(
      {'serving_default': batches}, num_threads=len(os.sched_getaffinity(0)),
      mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED)
  result = network_quantizer.quantize(ranges, enable_progress_bar=False,
                                      enable_progress_report=False)
  return bytes(result.quantized_model)


def calibration_images(config, calibration_dir=None,
                       count=CALIBRATION_IMAGES):
  """Real images for int8 calibration, resized: uint8 [N, S, S, 3].

  Args:
    config: the experiment config (input.image_size; without
      `calibration_dir`, data.train[0] and where its images are read).
    calibration_dir: a folder of images (IMAGE_EXTENSIONS, sorted by name;
      the first `count`); None: `count` images spread evenly over the
      config's first training set.
    count: the most images to use.

  Raises:
    CalibrationError: the folder is missing, holds no image, or an image in
      it cannot be read (one line naming it).
  """
  size = int(config.input.image_size)
  if calibration_dir is not None:
    if not os.path.isdir(calibration_dir):
      raise CalibrationError(
          f'int8: --calibration_dir {calibration_dir} is not a folder')
    names = sorted(n for n in os.listdir(calibration_dir)
                   if n.lower().endswith(IMAGE_EXTENSIONS))[:count]
    if not names:
      raise CalibrationError(
          f'int8: --calibration_dir {calibration_dir} holds no image '
          f'({", ".join(IMAGE_EXTENSIONS)})')
    sources = [os.path.join(calibration_dir, n) for n in names]
  else:
    sources = _training_images(config, count)
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  images = []
  for source in sources:
    try:
      image = inference.load_image(source)
    except (OSError, ValueError) as e:
      raise CalibrationError(
          f'int8: calibration image {getattr(source, "name", source)} '
          f'cannot be read ({type(e).__name__})') from e
    images.append(inference.resize_for_model(image, size))
  return np.stack(images)


def _training_images(config, count):
  """`count` image files (paths or file objects) of config.data.train[0]."""
  import io  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  name = config.data.train[0]
  try:
    index = pipeline.load_index(config, name)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CalibrationError(
        f'int8: cannot read the training set {name!r} for calibration; pass '
        f'--calibration_dir ({type(e).__name__}: '
        f'{str(e).splitlines()[0][:200]})') from e
  if not len(index):  # pylint: disable=g-explicit-length-test
    raise CalibrationError(f'int8: the training set {name!r} is empty; pass '
                           '--calibration_dir')
  picks = np.unique(np.linspace(0, len(index) - 1, count).round().astype(int))
  if index.paths is not None:
    return [index.paths[i] for i in picks]
  files = []
  for i in picks:
    blob = io.BytesIO(index.blobs[i])
    blob.name = f'{name}:{index.image_ids[i]}'
    files.append(blob)
  return files


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


def to_onnx(model, config, batch_size=None, opset=ONNX_OPSET, raw=False):
  """An onnx.ModelProto: input 'images', outputs `output_names(raw)`."""
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  priors = np.asarray(priors_lib.generate_priors(config), np.float32)
  if raw:
    fn, variables = serving_function(model, config, raw)
    names = list(RAW_OUTPUT_NAMES)
  else:  # the network; ONNX's NonMaxSuppression is appended below
    network, variables = _network(model, config)
    fn = onnx_nms.pre_nms_function(network, config, priors)
    names = [onnx_nms.BOXES, onnx_nms.SCORES]
  shape = _image_shape(config, batch_size)
  if batch_size is None:
    shape = ('batch',) + shape[1:]
  onnx_model = jax2onnx.to_onnx(
      lambda images: fn(variables, images),
      [jax.ShapeDtypeStruct(shape, input_dtype(raw))],
      model_name='ssd_jax', opset=opset, input_names=['images'],
      output_names=names)
  onnx_model = _nhwc_max_pools_to_2d(onnx_model)
  if not raw:
    onnx_model = onnx_nms.append_detections(onnx_model, config, len(priors),
                                            OUTPUT_NAMES)
  onnx.checker.check_model(onnx_model)
  return onnx_model


def load_runner(fmt, path, num_threads=None):
  """The written artifact as `run(images) -> tuple of numpy outputs`.

  Each format runs in its own runtime: onnxruntime, TF (SavedModel),
  tf.lite.Interpreter, jax.export.deserialize. `num_threads` (onnxruntime,
  TFLite): the runtime's intra-op threads (None: its default).
  """
  if fmt == 'stablehlo':
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(f.read())
    return lambda images: tuple(np.asarray(x) for x in exported.call(images))
  if fmt == 'saved_model':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    serve = tf.saved_model.load(path).signatures['serving_default']
    names = [n for n in (OUTPUT_NAMES, RAW_OUTPUT_NAMES)
             if set(n) == set(serve.structured_outputs)][0]
    def run_saved_model(images):
      outputs = serve(images=tf.constant(images))
      return tuple(outputs[name].numpy() for name in names)
    return run_saved_model
  if fmt == 'onnx':
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    options = ort.SessionOptions()
    if num_threads:
      options.intra_op_num_threads = num_threads
      options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    return lambda images: tuple(session.run(None, {'images': images}))
  if fmt == 'tflite':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    interpreter = tf.lite.Interpreter(model_path=path,
                                      num_threads=num_threads)
    interpreter.allocate_tensors()
    [image_input] = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    def run_tflite(images):
      if tuple(images.shape) != tuple(image_input['shape']):
        interpreter.resize_tensor_input(image_input['index'], images.shape)
        interpreter.allocate_tensors()
      interpreter.set_tensor(image_input['index'], images)
      interpreter.invoke()
      return tuple(interpreter.get_tensor(o['index']).copy() for o in outputs)
    return run_tflite
  raise ValueError(f'unknown export format {fmt!r}')


def reference_outputs(model, config, images, raw=False):
  """The JAX model's outputs in the exported convention (exact ties)."""
  model_def, variables = variables_lib.model_variables(model)
  forward = predict_lib.pixels_to_outputs(model_def, config)
  cls_logits, bbox_pred = jax.jit(forward)(variables, images)
  priors = priors_lib.generate_priors(config)
  if raw:
    scores = jax.nn.softmax(cls_logits, axis=-1)
    boxes = box_ops.center_to_corner(box_ops.decode(
        bbox_pred, priors, config.model.center_variance,
        config.model.size_variance))
    return np.asarray(boxes), np.asarray(scores)
  detections = detect_lib.detect(cls_logits, bbox_pred, priors, config)
  xyxy = np.asarray(detect_lib.to_normalized(detections.boxes,
                                             config.input.image_size))
  return (xyxy[..., [1, 0, 3, 2]], np.asarray(detections.scores),
          np.asarray(detections.labels, np.float32),
          np.asarray(detections.num_detections, np.float32))


def _valid_detections(outputs, i):
  """(boxes [n, 4], scores [n], classes [n]) of image i's n = num_detections
  entries of exported-convention `outputs`."""
  boxes, scores, classes, count = outputs
  n = int(count[i])
  return boxes[i, :n], scores[i, :n], classes[i, :n]


def _match_detections(ours, theirs, min_score, min_iou, score_atol):
  """(matched, compared) of `theirs`' detections above min_score.

  Each is (boxes [N, 4], scores [N], classes [N]) of one image; a detection
  of `theirs` is matched by an unused one of `ours` with the same class,
  IoU >= min_iou and (score_atol not None) a score within score_atol.
  """
  boxes, scores, classes = theirs
  our_boxes, our_scores, our_classes = ours
  selected = scores > min_score
  iou = box_ops.pairwise_iou(np.asarray(boxes[selected], np.float32),
                             np.asarray(our_boxes, np.float32), eps=0.0)
  used = np.zeros(len(our_scores), bool)
  matched = 0
  for k, (score, label) in enumerate(zip(scores[selected],
                                         classes[selected])):
    ok = (our_classes == label) & (iou[k] >= min_iou) & ~used
    if score_atol is not None:
      ok &= np.abs(our_scores - score) <= score_atol
    if ok.any():
      candidates = np.flatnonzero(ok)
      used[candidates[np.argmax(iou[k][candidates])]] = True
      matched += 1
  return matched, int(selected.sum())


def compare_detections(outputs, expected, min_iou=VERIFY_IOU,
                       score_atol=VERIFY_SCORE_ATOL):
  """Float-format agreement of exported and JAX detections, both ways.

  Args:
    outputs, expected: (detection_boxes, detection_scores,
      detection_classes, num_detections) of the same images.

  Returns:
    dict: `compared` (detections above VERIFY_SCORE, both directions) and
    `matched`.
    Detections within VERIFY_SCORE_ATOL of a full list's last score are
    left out (which of two near-equal scores makes the cut is rounding).
  """
  matched = compared = 0
  for i in range(len(expected[0])):
    per_image = [_valid_detections(outputs, i), _valid_detections(expected, i)]
    floor = VERIFY_SCORE
    for _, scores, _ in per_image:
      if len(scores) == len(expected[1][i]):  # full: a cut at the last one
        floor = max(floor, float(scores[-1]) + score_atol)
    for a, b in ((per_image[0], per_image[1]), (per_image[1], per_image[0])):
      m, c = _match_detections(a, b, floor, min_iou, score_atol)
      matched += m
      compared += c
  return {'compared': compared, 'matched': matched}


def int8_agreement(outputs, expected, min_score=INT8_VERIFY_SCORE,
                   min_iou=INT8_VERIFY_IOU):
  """How many of the JAX model's confident detections an int8 file finds.

  Args:
    outputs, expected: (detection_boxes, detection_scores,
      detection_classes, num_detections) of the same images, the int8
      file's and the JAX model's.

  Returns:
    (matched, compared): of the `compared` JAX detections above
    `min_score`, `matched` have a partner in `outputs` (any score) with the
    same label and IoU >= min_iou.
  """
  matched = compared = 0
  for i in range(len(expected[0])):
    m, c = _match_detections(_valid_detections(outputs, i),
                             _valid_detections(expected, i), min_score,
                             min_iou, score_atol=None)
    matched += m
    compared += c
  return matched, compared


def _run_in_batches(run, images, batch_size):
  """`run` over `images` in batches of batch_size, outputs concatenated."""
  if batch_size is None or batch_size >= len(images):
    return run(images)
  parts = [run(images[i:i + batch_size])
           for i in range(0, len(images) - batch_size + 1, batch_size)]
  return tuple(np.concatenate(p) for p in zip(*parts))


def verify(fmt, run, model, config, images, raw=False,
           tolerances=(VERIFY_IOU, VERIFY_SCORE_ATOL), min_agreement=1.0,
           batch_size=None, quantize='none'):
  """Runs the artifact on `images`; raises VerificationError on disagreement.

  Args:
    fmt, run: the format and `load_runner`'s function for the artifact.
    model, config: the JAX model it was exported from.
    images: the verification images.
    raw: the artifact is the raw graph.
    tolerances, min_agreement: float formats: `compare_detections`' (min IoU,
      score tolerance) and the least share of detections that must agree.
    batch_size: the artifact's fixed batch (None: any); the images are run
      in batches of it (a short rest is left out).
    quantize: 'int8' checks `int8_agreement` against INT8_MIN_AGREEMENT
      instead.

  Returns:
    A one-line summary of the figures.
  """
  if batch_size is not None:
    images = images[:len(images) - len(images) % batch_size]
  expected = reference_outputs(model, config, images, raw)
  outputs = _run_in_batches(run, images, batch_size)
  if len(outputs) != len(expected) or any(
      o.shape != e.shape for o, e in zip(outputs, expected)):
    raise VerificationError(
        f'{fmt}: output shapes {[o.shape for o in outputs]} != '
        f'{[e.shape for e in expected]}')
  if raw:
    diff = max(float(np.abs(o - e).max()) for o, e in zip(outputs, expected))
    summary = f'{fmt}: raw outputs within {diff:.2e} of JAX'
    if diff > 1e-3:
      raise VerificationError(summary + ' (more than 1e-3)')
    return summary
  if quantize == 'int8':
    matched, compared = int8_agreement(outputs, expected)
    share = matched / max(compared, 1)
    summary = (f'{fmt} int8: {matched}/{compared} ({share:.1%}) of the JAX '
               f'detections above {INT8_VERIFY_SCORE} found on '
               f'{len(images)} calibration images (label equal, IoU >= '
               f'{INT8_VERIFY_IOU}; floor {INT8_MIN_AGREEMENT:.0%})')
    if not compared:
      raise VerificationError(
          summary + ': nothing to compare (an untrained model, or images '
          'unlike its training set?)')
    if share < INT8_MIN_AGREEMENT:
      raise VerificationError(summary)
    return summary
  min_iou, score_atol = tolerances
  figures = compare_detections(outputs, expected, min_iou, score_atol)
  summary = (f'{fmt}: {figures["matched"]}/{figures["compared"]} detections '
             f'above {VERIFY_SCORE} agree with JAX on {len(images)} images '
             f'(label equal, IoU >= {min_iou}, score within {score_atol})')
  if figures['matched'] < min_agreement * figures['compared']:
    raise VerificationError(summary)
  return summary


def sample_images(config, count=2, seed=0):
  """Random uint8 [count, S, S, 3] images for the self-check."""
  size = int(config.input.image_size)
  return np.random.default_rng(seed).integers(
      0, 256, (count, size, size, 3), dtype=np.uint8)


def _converter_failure(fmt, error):
  """A one-line ExportError naming the format and, where found, the op."""
  text = str(error)
  match = (re.search(r"'([\w.]+)' op", text) or
           re.search(r"primitive[ '\"]+([\w.]+)", text) or
           re.search(r"op[ '\"]+([\w.]+)", text))
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  first = lines[0][:200] if lines else type(error).__name__
  op = f' op {match.group(1)}' if match else ''
  return ExportError(f'{fmt}: the converter cannot handle the model{op} '
                     f'({type(error).__name__}: {first})')


def export(model, config, fmt, output, batch_size=None, *, quantize='none',
           raw=False, verify_images=None, calibration_dir=None,
           calibration=None):
  """Writes `model` in format `fmt` (one of FORMATS) to `output`, verified.

  Args:
    model, config: the NNX SSD and its config.
    fmt: one of FORMATS.
    output: file (onnx, tflite, stablehlo) or directory (saved_model).
    batch_size: fixed batch size (None: symbolic; TFLite: 1).
    quantize: tflite only, one of QUANTIZATIONS.
    raw: the graph without NMS (module docstring).
    verify_images: uint8 [B, S, S, 3] images for the self-check (default
      `sample_images`; int8: the first INT8_VERIFY_IMAGES calibration
      images); False skips it.
    calibration_dir: int8: the folder of calibration images (None: the
      config's first training set; `calibration_images`).
    calibration: int8: uint8 [N, S, S, 3] calibration images, instead of
      reading `calibration_dir`.

  Returns:
    The verification summary (None when skipped).

  Raises:
    ExportError: the converter failed (one-line message); CalibrationError
      (a subclass): the calibration images cannot be read.
    VerificationError: the artifact disagrees with the JAX model.
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown export format {fmt!r}; choose one of '
                     f'{", ".join(FORMATS)}')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'--batch_size must be >= 1, got {batch_size}')
  if quantize not in QUANTIZATIONS:
    raise ValueError(f'unknown quantization {quantize!r}; choose one of '
                     f'{", ".join(QUANTIZATIONS)}')
  if quantize != 'none' and fmt != 'tflite':
    raise ValueError(f'--quantize={quantize} is for --format=tflite only')
  if quantize == 'int8' and raw:
    raise ValueError('--quantize=int8 exports the graph with NMS only, not '
                     '--raw_outputs')
  if quantize == 'int8' and calibration is None:
    calibration = calibration_images(config, calibration_dir)
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  try:
    if fmt == 'stablehlo':
      blob = to_stablehlo(model, config, batch_size, raw=raw).serialize()
    elif fmt == 'tflite':
      blob = to_tflite(model, config, batch_size, quantize, raw, calibration)
    elif fmt == 'onnx':
      blob = to_onnx(model, config, batch_size, raw=raw).SerializeToString()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _converter_failure(fmt, e) from e
  # Written to a temporary name, verified, then moved into place.
  staging = output + '.unverified'
  if fmt == 'saved_model':
    try:
      to_saved_model(model, config, staging, batch_size, raw=raw)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _converter_failure(fmt, e) from e
  else:
    with open(staging, 'wb') as f:
      f.write(blob)
  summary = None
  try:
    if verify_images is not False:
      if quantize == 'int8':  # real images: random ones say nothing here
        images = (calibration[:INT8_VERIFY_IMAGES] if verify_images is None
                  else np.asarray(verify_images))
      else:
        images = (sample_images(config, batch_size or 2)
                  if verify_images is None else np.asarray(verify_images))
        if batch_size is not None or fmt == 'tflite':
          images = images[:batch_size or 1]
      if raw:
        images = images.astype(np.float32)
      tolerances = (FLOAT16_TOLERANCES if quantize == 'float16' else
                    (VERIFY_IOU, VERIFY_SCORE_ATOL))
      summary = verify(fmt, load_runner(fmt, staging), model, config, images,
                       raw, tolerances,
                       FLOAT16_MIN_AGREEMENT if quantize == 'float16' else 1.0,
                       batch_size=(batch_size or 1) if fmt == 'tflite' else
                       batch_size, quantize=quantize)
  except Exception:
    _remove(staging)
    raise
  _remove(output)
  os.replace(staging, output)
  return summary


def _remove(path):
  import shutil  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
