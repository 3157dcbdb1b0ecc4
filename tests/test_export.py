"""ssd_jax.deploy.export: every format, NMS inside or raw, equals the JAX model."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ssd300_voc
from ssd_jax import models
from ssd_jax.core import box_ops
from ssd_jax.core import priors as priors_lib
from ssd_jax.deploy import export
from ssd_jax.deploy import inference
from ssd_jax.evaluation import postprocess
from ssd_jax.interop import torch_import
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib
from tests import detection_checks
from tests import recipe
from tests import tiny
from tests import workdir_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
JPEGS = os.path.join(FIXTURES, 'voc_tiny', 'VOC2007', 'JPEGImages')
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def tiny_model():
  config = tiny.tiny_config()
  config.model.backbone.batch_norm = True  # BatchNorm statistics exported too
  # Random weights give near-equal scores; with room for every kept box no
  # detection is lost to rounding at the top-N cut, so all are compared.
  config.test.max_per_image = 600
  model = models.create_model(config, nnx.Rngs(5))
  # Non-trivial running statistics (means and variances), so that eval mode
  # matters.
  rng = np.random.default_rng(1)
  stats = nnx.state(model, nnx.BatchStat)
  values = jax.tree.map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
      stats.to_pure_dict())
  assert len(jax.tree.leaves(values)) >= 20
  nnx.replace_by_pure_dict(stats, values)
  nnx.update(model, stats)
  return model, config


@pytest.fixture(scope='module')
def expected(tiny_model):
  """Images and the eval path's softmax + decode of the JAX model's outputs."""
  model, config = tiny_model
  images = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(
      np.float32)
  model_def, params, model_state = variables_lib.split_model(model)
  state = variables_lib.ModelVariables(params=params, model_state=model_state)
  # The predict step takes pixel values and subtracts the mean itself.
  cls_logits, bbox_pred = predict_lib.make_predict_step(config, model_def)(
      state, images)
  priors = priors_lib.generate_priors(config)
  boxes = box_ops.center_to_corner(box_ops.decode(
      np.asarray(bbox_pred), priors, config.model.center_variance,
      config.model.size_variance))
  return images, boxes, postprocess.softmax(cls_logits)


def _check(outputs, expected, batch):
  images, boxes, scores = expected
  assert len(outputs) == 2
  ours_boxes, ours_scores = (np.asarray(x) for x in outputs)
  assert ours_boxes.dtype == np.float32 and ours_scores.dtype == np.float32
  np.testing.assert_allclose(ours_boxes, boxes[:batch], rtol=0,
                             atol=TOLERANCE)
  np.testing.assert_allclose(ours_scores, scores[:batch], rtol=0,
                             atol=TOLERANCE)
  assert images.shape[0] >= batch


def test_raw_stablehlo(tiny_model, expected):
  model, config = tiny_model
  blob = export.to_stablehlo(model, config, raw=True).serialize()
  exported = jax.export.deserialize(blob)
  assert set(exported.platforms) == {'cpu', 'cuda', 'tpu'}
  for batch in (3, 1):  # symbolic batch
    _check(exported.call(expected[0][:batch]), expected, batch)


def test_raw_saved_model(tiny_model, expected, tmp_path):
  tf = pytest.importorskip('tensorflow')
  model, config = tiny_model
  export.to_saved_model(model, config, str(tmp_path / 'sm'), raw=True)
  serve = tf.saved_model.load(str(tmp_path / 'sm')).signatures[
      'serving_default']
  assert serve.structured_input_signature[1]['images'].shape.as_list() == [
      None, 64, 64, 3]
  for batch in (3, 1):
    outputs = serve(images=tf.constant(expected[0][:batch]))
    assert set(outputs) == {'boxes', 'scores'}
    _check((outputs['boxes'].numpy(), outputs['scores'].numpy()), expected,
           batch)


def test_raw_onnx(tiny_model, expected, tmp_path):
  ort = pytest.importorskip('onnxruntime')
  onnx = pytest.importorskip('onnx')
  model, config = tiny_model
  path = tmp_path / 'ssd.onnx'
  export.export(model, config, 'onnx', str(path), raw=True)
  proto = onnx.load(str(path))
  assert [i.name for i in proto.graph.input] == ['images']
  assert [o.name for o in proto.graph.output] == ['boxes', 'scores']
  assert proto.opset_import[0].version == export.ONNX_OPSET
  # Every max pool is 2-D (onnxruntime runs no other).
  pools = [n for n in proto.graph.node if n.op_type == 'MaxPool']
  assert len(pools) == 5
  for node in pools:
    kernel = [a.ints for a in node.attribute if a.name == 'kernel_shape'][0]
    assert len(kernel) == 2
  session = ort.InferenceSession(str(path))
  assert session.get_inputs()[0].shape == ['batch', 64, 64, 3]
  for batch in (3, 1):
    _check(session.run(['boxes', 'scores'], {'images': expected[0][:batch]}),
           expected, batch)


def test_graph_has_no_cpu_kernels():
  """Winograd convolutions, which the model uses on CPU, are not exported."""
  config = tiny.tiny_config()
  config.model.backbone.width_divisor = 2  # wide enough for Winograd
  config.model.backbone.out_channels = (256, 512, 32, 32)
  model = nnx.eval_shape(lambda: models.create_model(config))
  convs = sum(isinstance(m, nnx.Conv) for _, m in nnx.iter_graph(model))
  assert convs > 20
  model_def, params, model_state = variables_lib.split_model(model)
  state = variables_lib.ModelVariables(params=params, model_state=model_state)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  on_cpu = jax.jit(lambda s, x: predict_lib.predict(model_def, s, x)).lower(
      state, images).as_text()
  fn, variables = export.serving_function(model, config)
  exported = jax.jit(fn).lower(variables, images).as_text()
  # One XLA convolution per Conv module, except that each feature map's class
  # and box heads run as one convolution.
  plain = convs - len(config.model.priors.feature_maps)
  assert exported.count('stablehlo.convolution') == plain
  if jax.default_backend() == 'cpu':
    assert on_cpu.count('stablehlo.convolution') < plain  # Winograd: matmuls


def test_cli(tiny_model, expected, tmp_path):
  model, config = tiny_model
  workdir = workdir_testing.save_workdir(tmp_path / 'w', config, model,
                                         step=3)
  output = tmp_path / 'out' / 'ssd.stablehlo'
  result = subprocess.run(
      [sys.executable, 'export.py', f'--workdir={workdir}',
       '--format=stablehlo', f'--output={output}', '--batch_size=2'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'checkpoint step 3' in result.stdout
  assert 'Verified: stablehlo:' in result.stdout
  exported = jax.export.deserialize(output.read_bytes())
  assert exported.in_avals[0].shape == (2, 64, 64, 3)
  assert exported.in_avals[0].dtype == np.uint8
  images = expected[0][:2].astype(np.uint8)
  figures = export.compare_detections(
      exported.call(images), export.reference_outputs(model, config, images))
  assert figures['matched'] == figures['compared'] > 0


def test_unknown_format(tiny_model, tmp_path):
  model, config = tiny_model
  with pytest.raises(ValueError, match='unknown export format'):
    export.export(model, config, 'tfjs', str(tmp_path / 'x'))
  with pytest.raises(ValueError, match='unknown quantization'):
    export.export(model, config, 'tflite', str(tmp_path / 'x'),
                  quantize='int4')
  with pytest.raises(ValueError, match='NMS only'):
    export.export(model, config, 'tflite', str(tmp_path / 'x'),
                  quantize='int8', raw=True)


def test_converter_failure_is_one_line(tiny_model, tmp_path, monkeypatch):
  model, config = tiny_model

  def broken(*args, **kwargs):
    raise RuntimeError("loc(x): 'tf.XlaCallModule' op is neither a custom op "
                       'nor a flex op\n  many more lines')
  monkeypatch.setattr(export, 'to_tflite', broken)
  with pytest.raises(export.ExportError) as error:
    export.export(model, config, 'tflite', str(tmp_path / 'x.tflite'))
  assert '\n' not in str(error.value)
  assert str(error.value).startswith('tflite: ')
  assert 'op tf.XlaCallModule' in str(error.value)
  assert not os.listdir(tmp_path)


def test_verification_failure_writes_nothing(tiny_model, tmp_path,
                                             monkeypatch):
  model, config = tiny_model
  real = export.load_runner

  def shifted(fmt, path, num_threads=None):
    run = real(fmt, path, num_threads)
    return lambda images: (run(images)[0] * 0.9,) + run(images)[1:]
  monkeypatch.setattr(export, 'load_runner', shifted)
  with pytest.raises(export.VerificationError, match='stablehlo: 0/'):
    export.export(model, config, 'stablehlo', str(tmp_path / 'x.shlo'))
  assert not os.listdir(tmp_path)


# Detections with NMS inside: every format on the tiny model.
NMS_FORMATS = (('stablehlo', 'none', 'ssd.stablehlo'),
               ('onnx', 'none', 'ssd.onnx'),
               ('saved_model', 'none', 'ssd_savedmodel'),
               ('tflite', 'none', 'ssd.tflite'),
               ('tflite', 'float16', 'ssd_fp16.tflite'))


@pytest.mark.parametrize('fmt,quantize,name', NMS_FORMATS)
def test_nms_export_equals_jax_detections(tiny_model, tmp_path, fmt,
                                          quantize, name):
  model, config = tiny_model
  path = str(tmp_path / name)
  summary = export.export(model, config, fmt, path, quantize=quantize)
  print(summary)
  assert 'agree' in summary
  run = export.load_runner(fmt, path)
  images = export.sample_images(config, 3, seed=7)
  for batch in ((1,) if fmt == 'tflite' else (3, 1)):
    outputs = run(images[:batch])
    assert [o.dtype for o in outputs] == [np.float32] * 4
    assert outputs[0].shape == (batch, config.test.max_per_image, 4)
    expected = export.reference_outputs(model, config, images[:batch])
    tolerances = (export.FLOAT16_TOLERANCES if quantize == 'float16' else
                  (export.VERIFY_IOU, export.VERIFY_SCORE_ATOL))
    figures = export.compare_detections(outputs, expected, *tolerances)
    assert figures['compared'] > 20, figures
    if quantize == 'float16':
      assert figures['matched'] >= 0.5 * figures['compared'], figures
    else:
      assert figures['matched'] == figures['compared'], figures


def _tflite_ops(path):
  tf = pytest.importorskip('tensorflow')
  interpreter = tf.lite.Interpreter(model_path=path)
  return {op['op_name'] for op in interpreter._get_ops_details()}  # pylint: disable=protected-access


def test_tflite_nms_is_the_detection_op(tiny_model, tmp_path):
  """Batch 2: two TFLite_Detection_PostProcess ops, no loop, zero padding."""
  model, config = tiny_model
  path = str(tmp_path / 'ssd_b2.tflite')
  images = export.sample_images(config, 2, seed=3)
  summary = export.export(model, config, 'tflite', path, batch_size=2,
                          verify_images=images)
  assert 'agree with JAX on 2 images' in summary
  ops = _tflite_ops(path)
  assert 'TFLite_Detection_PostProcess' in ops
  assert 'WHILE' not in ops  # no NMS loop left
  boxes, scores, classes, counts = export.load_runner('tflite', path)(images)
  assert boxes.shape == (2, config.test.max_per_image, 4)
  assert counts.shape == (2,)
  for i, n in enumerate(counts.astype(int)):
    assert 0 < n < config.test.max_per_image
    assert classes[i, :n].min() >= 1
    assert classes[i, :n].max() <= config.model.num_classes - 1
    assert not boxes[i, n:].any() and not scores[i, n:].any()
    assert not classes[i, n:].any()
    assert (np.diff(scores[i, :n]) <= 0).all()


def test_onnx_nms_is_non_max_suppression(tiny_model, tmp_path):
  """ONNX NonMaxSuppression, no Loop; any batch; zero padding."""
  onnx = pytest.importorskip('onnx')
  model, config = tiny_model
  path = str(tmp_path / 'ssd.onnx')
  # Verified in test_nms_export_equals_jax_detections.
  export.export(model, config, 'onnx', path, verify_images=False)
  ops = {node.op_type for node in onnx.load(path).graph.node}
  assert {'NonMaxSuppression', 'TopK', 'ScatterND'} <= ops
  assert 'Loop' not in ops
  run = export.load_runner('onnx', path)
  images = export.sample_images(config, 2, seed=3)
  boxes, scores, classes, counts = run(images)
  assert boxes.shape == (2, config.test.max_per_image, 4)
  for i, n in enumerate(counts.astype(int)):
    assert 0 < n < config.test.max_per_image
    assert 1 <= classes[i, :n].min()
    assert classes[i, :n].max() <= config.model.num_classes - 1
    assert not boxes[i, n:].any() and not scores[i, n:].any()
    assert not classes[i, n:].any()
    assert (np.diff(scores[i, :n]) <= 0).all()
  single = run(images[1:])
  for ours, batched in zip(single, (boxes, scores, classes, counts)):
    np.testing.assert_allclose(ours[0], batched[1], atol=1e-5)


def _voc_tiny_inputs():
  ref = np.load(os.path.join(FIXTURES, 'voc_tiny_dets.npz'))
  images = np.stack([inference.resize_for_model(inference.load_image(
      os.path.join(JPEGS, f'{i}.jpg')), 300) for i in ref['image_ids']])
  return images, ref


def _assert_reproduces_reference(outputs, ref, batch_index, image_index):
  boxes, scores, classes, counts = outputs
  n = int(counts[batch_index])
  height, width = ref['orig_hw'][image_index]
  ymin, xmin, ymax, xmax = np.moveaxis(boxes[batch_index, :n], -1, 0)
  det = {'boxes': np.stack([xmin, ymin, xmax, ymax], -1) * np.array(
             [width, height, width, height], np.float32),
         'scores': scores[batch_index, :n],
         'labels': classes[batch_index, :n].astype(np.int64)}
  m = ref['num_dets'][image_index]
  detection_checks.assert_similar_top_detections(
      det, ref['boxes'][image_index, :m], ref['labels'][image_index, :m],
      ref['scores'][image_index, :m], top=20)


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ('onnx', 'tflite'))
def test_ssd300_export_reproduces_reference(tmp_path, fmt):
  """The reference's weights, voc_tiny's JPEGs: its top-20 detections."""
  config = ssd300_voc.get_config()
  model = nnx.eval_shape(lambda: models.create_model(config))
  torch_import.load_detector_state_dict(model, recipe.recipe_state_dict())
  images, ref = _voc_tiny_inputs()
  path = str(tmp_path / f'ssd300.{fmt}')
  summary = export.export(model, config, fmt, path,
                          verify_images=images[:2])
  print(summary)
  run = export.load_runner(fmt, path)
  if fmt == 'tflite':
    for i in range(len(images)):
      _assert_reproduces_reference(run(images[i:i + 1]), ref, 0, i)
  else:
    outputs = run(images)
    for i in range(len(images)):
      _assert_reproduces_reference(outputs, ref, i, i)


# int8 TFLite: the network quantized, calibrated on voc_tiny's JPEGs (real
# images), the NMS float. A random tiny model's figure only checks the
# mechanics; trained models' figures are in docs/deployment.md.


@pytest.fixture(scope='module')
def int8_export(tmp_path_factory):
  pytest.importorskip('ai_edge_quantizer')
  config = tiny.tiny_config()
  model = models.create_model(config, nnx.Rngs(5))
  path = str(tmp_path_factory.mktemp('int8') / 'ssd_int8.tflite')
  summary = export.export(model, config, 'tflite', path, quantize='int8',
                          calibration_dir=JPEGS)
  return model, config, path, summary


def test_int8_tflite_finds_the_jax_detections(int8_export):
  model, config, path, summary = int8_export
  print(summary)
  assert 'tflite int8:' in summary and '10 calibration images' in summary
  images = export.calibration_images(config, JPEGS)
  assert images.shape == (10, 64, 64, 3) and images.dtype == np.uint8
  run = export.load_runner('tflite', path)
  outputs = [run(images[i:i + 1]) for i in range(len(images))]
  outputs = tuple(np.concatenate(o) for o in zip(*outputs))
  assert [o.dtype for o in outputs] == [np.float32] * 4
  matched, compared = export.int8_agreement(
      outputs, export.reference_outputs(model, config, images))
  assert compared > 100
  assert matched >= export.INT8_MIN_AGREEMENT * compared


def test_int8_tflite_has_int8_convolutions(int8_export):
  tf = pytest.importorskip('tensorflow')
  _, _, path, _ = int8_export
  interpreter = tf.lite.Interpreter(model_path=path)
  assert list(interpreter.get_signature_list()['serving_default'][
      'inputs']) == ['images']
  tensors = interpreter.get_tensor_details()
  # Conv kernels [O, H, W, I] in int8, one scale per output channel.
  kernels = [t for t in tensors if len(t['shape']) == 4 and
             t['dtype'] == np.int8 and
             len(t['quantization_parameters']['scales']) == t['shape'][0] > 1]
  convs = sum(isinstance(m, nnx.Conv) for _, m in nnx.iter_graph(
      models.create_model(tiny.tiny_config(), nnx.Rngs(0))))
  # Each feature map's class and box heads are one convolution.
  assert len(kernels) == convs - 4
  assert not [t for t in tensors if len(t['shape']) == 4 and
              t['dtype'] == np.float32 and t['shape'][1:3].tolist() == [3, 3]
              and t['shape'][0] > 3]  # no float 3x3 kernel left
  [image_input] = interpreter.get_input_details()
  assert image_input['dtype'] == np.uint8
  assert [o['dtype'] for o in interpreter.get_output_details()] == [
      np.float32] * 4


def test_int8_bad_calibration_dir(tiny_model, tmp_path):
  model, config = tiny_model
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('no images here')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'a.jpg').write_bytes(b'not a jpeg')
  for folder, message in ((tmp_path / 'missing', 'is not a folder'),
                          (empty, 'holds no image'),
                          (broken, 'a.jpg cannot be read')):
    with pytest.raises(export.CalibrationError, match=message) as error:
      export.export(model, config, 'tflite', str(tmp_path / 'x.tflite'),
                    quantize='int8', calibration_dir=str(folder))
    assert '\n' not in str(error.value)
    assert isinstance(error.value, export.ExportError)
  assert not (tmp_path / 'x.tflite').exists()


def test_int8_default_calibration_is_the_training_set():
  config = tiny.tiny_config()
  config.data.voc_root = os.path.join(FIXTURES, 'voc_tiny')
  config.data.train = ('voc_2007_trainval',)
  images = export.calibration_images(config, count=3)
  assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
  config.data.voc_root = os.path.join(FIXTURES, 'missing')
  with pytest.raises(export.CalibrationError, match='--calibration_dir'):
    export.calibration_images(config)
