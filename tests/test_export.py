"""ssd_jax.deploy.export: ONNX, SavedModel and StableHLO equal the JAX model."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.core import box_ops
from ssd_jax.core import priors as priors_lib
from ssd_jax.deploy import export
from ssd_jax.evaluation import postprocess
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib
from tests import tiny
from tests import workdir_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def tiny_model():
  config = tiny.tiny_config()
  config.model.backbone.batch_norm = True  # BatchNorm statistics exported too
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


def test_stablehlo(tiny_model, expected):
  model, config = tiny_model
  blob = export.to_stablehlo(model, config).serialize()
  exported = jax.export.deserialize(blob)
  assert set(exported.platforms) == {'cpu', 'cuda', 'tpu'}
  for batch in (3, 1):  # symbolic batch
    _check(exported.call(expected[0][:batch]), expected, batch)


def test_saved_model(tiny_model, expected, tmp_path):
  tf = pytest.importorskip('tensorflow')
  model, config = tiny_model
  export.to_saved_model(model, config, str(tmp_path / 'sm'))
  serve = tf.saved_model.load(str(tmp_path / 'sm')).signatures[
      'serving_default']
  assert serve.structured_input_signature[1]['images'].shape.as_list() == [
      None, 64, 64, 3]
  for batch in (3, 1):
    outputs = serve(images=tf.constant(expected[0][:batch]))
    assert set(outputs) == {'boxes', 'scores'}
    _check((outputs['boxes'].numpy(), outputs['scores'].numpy()), expected,
           batch)


def test_onnx(tiny_model, expected, tmp_path):
  ort = pytest.importorskip('onnxruntime')
  onnx = pytest.importorskip('onnx')
  model, config = tiny_model
  path = tmp_path / 'ssd.onnx'
  export.export(model, config, 'onnx', str(path))
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
  exported = jax.export.deserialize(output.read_bytes())
  assert exported.in_avals[0].shape == (2, 64, 64, 3)
  _check(exported.call(expected[0][:2]), expected, 2)


def test_unknown_format(tiny_model, tmp_path):
  model, config = tiny_model
  with pytest.raises(ValueError, match='unknown export format'):
    export.export(model, config, 'tflite', str(tmp_path / 'x'))
