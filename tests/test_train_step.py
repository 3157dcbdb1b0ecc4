import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.runtime import kernels
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import sharding
from ssd_jax.training import optim
from ssd_jax.training import synthetic
from ssd_jax.training import train_step as train_step_lib
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(config, batch_size, seed=0):
  return synthetic.synthetic_batch(config, batch_size, seed, max_objects=3)


def _setup(config, mesh=None):
  mesh = mesh or sharding.create_mesh()
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  model_def, state = train_step_lib.create_train_state(model, tx, mesh)
  step = train_step_lib.make_train_step(config, model_def, tx, mesh)
  return mesh, model_def, tx, state, step


@pytest.fixture(scope='module')
def tiny_setup():
  config = tiny_config()
  return (config,) + _setup(config)


@pytest.fixture
def tiny(tiny_setup):
  """The module's tiny setup with a fresh copy of the (donatable) state."""
  config, mesh, model_def, tx, state, step = tiny_setup
  return config, mesh, model_def, tx, jax.tree.map(jnp.copy, state), step


def test_train_step_equals_manual_update(tiny):
  config, mesh, model_def, tx, state, train_step = tiny
  batch = synthetic_batch(config, 4)
  params_before = jax.tree.map(np.asarray, state.params)

  priors = jnp.asarray(priors_lib.generate_priors(config))

  def loss_fn(params):
    m = nnx.merge(model_def.train, params, state.model_state)
    return train_step_lib.loss_and_targets(m, batch, priors, config)[0]

  @jax.jit
  def manual_step(params):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, optax.apply_updates(params, updates)

  expected_loss, expected_params = manual_step(state.params)
  expected_params = jax.tree.map(np.asarray, expected_params)

  new_state, metrics = train_step(state, sharding.global_batch(batch, mesh))
  assert int(new_state.step) == 1
  np.testing.assert_allclose(float(metrics['total_loss']), float(expected_loss),
                             rtol=1e-5)
  np.testing.assert_allclose(
      float(metrics['total_loss']),
      float(metrics['reg_loss']) + float(metrics['cls_loss']), rtol=1e-6)
  assert int(metrics['num_positives']) > 0
  for got, want, before in zip(jax.tree.leaves(new_state.params),
                               jax.tree.leaves(expected_params),
                               jax.tree.leaves(params_before)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(
      jax.tree.leaves(new_state.params), jax.tree.leaves(params_before)))


def test_repeated_steps_fit_a_fixed_batch():
  config = tiny_config()
  config.solver.optimizer = 'adam'
  config.solver.warmup_iters = 0
  mesh, _, _, state, train_step = _setup(config)
  batch = sharding.global_batch(synthetic_batch(config, 4, seed=1), mesh)
  first = None
  for _ in range(30):
    state, metrics = train_step(state, batch)
    first = first if first is not None else float(metrics['total_loss'])
  assert np.isfinite(float(metrics['total_loss']))
  assert float(metrics['total_loss']) < 0.5 * first


def test_batch_without_boxes_gives_zero_loss_and_no_nan(tiny):
  config, mesh, _, _, state, train_step = tiny
  batch = synthetic_batch(config, 4)
  batch['mask'][:] = False
  new_state, metrics = train_step(state, sharding.global_batch(batch, mesh))
  assert float(metrics['total_loss']) == 0.0
  assert all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(new_state.params))


def test_predict_step_outputs(tiny):
  config, mesh, model_def, _, state, _ = tiny
  predict = predict_lib.make_predict_step(config, model_def)
  pixels = synthetic_batch(config, 4)['image']
  assert pixels.dtype == np.uint8
  cls_logits, bbox_pred = predict(state, sharding.global_batch(pixels, mesh))
  p = priors_lib.num_priors(config)
  assert cls_logits.shape == (4, p, 4) and bbox_pred.shape == (4, p, 4)
  assert cls_logits.dtype == jnp.float32
  # The input contract: uint8 pixel values; the step subtracts the mean.
  model = nnx.merge(model_def.eval, state.params, state.model_state)
  normalized = pixels.astype(np.float32) - np.float32(config.input.pixel_mean)
  expected = nnx.jit(lambda m, x: m(x))(model, normalized)
  np.testing.assert_allclose(np.asarray(cls_logits), np.asarray(expected[0]),
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_update_in_training_only():
  config = tiny_config()
  config.model.backbone.batch_norm = True
  mesh, model_def, _, state, train_step = _setup(config)
  batch = sharding.global_batch(synthetic_batch(config, 4), mesh)
  predict = predict_lib.make_predict_step(config, model_def)
  before = jax.tree.map(np.asarray, state.model_state)
  out_a = np.asarray(predict(state, batch['image'])[0])
  out_b = np.asarray(predict(state, batch['image'])[0])
  np.testing.assert_array_equal(out_a, out_b)
  new_state, _ = train_step(state, batch)
  changed = [not np.allclose(np.asarray(a), b) for a, b in zip(
      jax.tree.leaves(new_state.model_state), jax.tree.leaves(before))]
  assert any(changed)


def test_checkpoint_layout_round_trip(tiny):
  config, mesh, model_def, tx, state, _ = tiny
  model_tree, opt_state = train_step_lib.state_to_checkpoint(state)
  # The layout is the model's full variable dict, as torch_import writes it.
  model = nnx.merge(model_def.train, state.params, state.model_state)
  assert jax.tree.structure(model_tree) == jax.tree.structure(
      nnx.to_pure_dict(nnx.state(model)))
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored = train_step_lib.state_from_checkpoint(zeros, model_tree, opt_state,
                                             step=7)
  assert int(restored.step) == 7
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    if a.shape:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  del config, mesh, tx


MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from ssd_jax.runtime import sharding
    from tests.test_train_step import _setup, synthetic_batch
    from tests.tiny import tiny_config
    config = tiny_config()
    config.solver.batch_size = 8
    batch = synthetic_batch(config, 8)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.create_mesh(devices)
      _, _, _, state, step = _setup(config, mesh)
      global_batch = sharding.global_batch(batch, mesh)
      assert len(global_batch['image'].sharding.device_set) == len(devices)
      for _ in range(2):
        state, metrics = step(state, global_batch)
      results.append((float(metrics['total_loss']),
                      [np.asarray(x) for x in jax.tree.leaves(state.params)]))
    (loss1, params1), (loss8, params8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(params8, params1):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print('OK', loss1, loss8)
''')


def test_eight_devices_equal_one_device():
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT], cwd=ROOT,
                          env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('OK')


def test_bfloat16_train_step_is_finite_and_close_to_float32():
  config = tiny_config()
  batch = synthetic_batch(config, 4, seed=3)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    mesh, _, _, state, train_step = _setup(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    values = []
    for _ in range(3):
      state, metrics = train_step(state, sharding.global_batch(batch, mesh))
      values.append(float(metrics['total_loss']))
    assert all(np.isfinite(values))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[dtype] = values
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.05)


def test_cpu_steps_compile_without_ynnpack(tiny):
  # YNNPACK's convolution gradients are the slow path on CPU (BENCHMARKS.md);
  # the compiled steps must keep XLA's own kernels.
  config, mesh, model_def, _, state, train_step = tiny
  assert kernels.compiler_options() == {
      'xla_cpu_experimental_ynn_fusion_type': ''}
  batch = sharding.global_batch(synthetic_batch(config, 2), mesh)
  train_hlo = train_step.lower(state, batch).compile().as_text()
  predict_step = predict_lib.make_predict_step(config, model_def)
  predict_hlo = predict_step.lower(state, batch['image']).compile().as_text()
  default_hlo = jax.jit(train_step.__wrapped__).lower(state, batch).compile(
      ).as_text()
  assert '__ynn_fusion' in default_hlo  # what the option turns off
  assert '__ynn_fusion' not in train_hlo
  assert '__ynn_fusion' not in predict_hlo
