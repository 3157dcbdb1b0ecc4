import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssd_jax.training import optim
from tests.reference_data import load_fixture


def test_learning_rate_matches_reference_log_and_updates(ssd300_config):
  ref = load_fixture('lr.json')
  for i, logged, logged_str, update in zip(ref['iterations'], ref['logged_lr'],
                                           ref['logged_lr_str'],
                                           ref['update_lr']):
    # The log line of iteration i prints f(i); update i uses f(i - 1).
    assert optim.learning_rate_at(ssd300_config, i) == pytest.approx(logged,
                                                                  abs=1e-15)
    assert f'{optim.learning_rate_at(ssd300_config, i):.5f}' == logged_str
    assert optim.learning_rate_at(ssd300_config, i - 1) == pytest.approx(
        update, abs=1e-15)
  assert optim.learning_rate_at(ssd300_config, 0) == pytest.approx(
      ref['lr_at_construction'], abs=1e-15)


def test_optax_schedule_matches_reference_updates(ssd300_config):
  ref = load_fixture('lr.json')
  schedule = jax.jit(optim.learning_rate_schedule(ssd300_config))
  for i, update in zip(ref['iterations'], ref['update_lr']):
    # optax passes the 0-based update count: update i uses schedule(i - 1).
    np.testing.assert_allclose(float(schedule(i - 1)), update, rtol=1e-6)


def test_sgd_equals_torch_sgd_with_weight_decay(ssd300_config):
  torch = pytest.importorskip('torch')
  rng = np.random.RandomState(0)
  params = {'w': rng.randn(3, 4).astype(np.float32),
            'b': rng.randn(4).astype(np.float32)}
  grads = [{k: rng.randn(*v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(4)]
  tx = optim.create_optimizer(ssd300_config)
  state = tx.init(params)
  ours = {k: jnp.asarray(v) for k, v in params.items()}
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)

  theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  opt = torch.optim.SGD(list(theirs.values()), lr=1e-3 / 3, momentum=0.9,
                        weight_decay=5e-4)
  for step, g in enumerate(grads):
    for group in opt.param_groups:
      group['lr'] = optim.learning_rate_at(ssd300_config, step)
    for k, p in theirs.items():
      p.grad = torch.tensor(g[k])
    opt.step()
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), theirs[k].detach().numpy(),
                               rtol=1e-6, atol=1e-7)


def test_adam_option_and_bad_optimizer_name(ssd300_config):
  config = ssd300_config.copy_and_resolve_references()
  config.solver.optimizer = 'adam'
  tx = optim.create_optimizer(config)
  state = tx.init({'w': jnp.ones(2)})
  updates, _ = tx.update({'w': jnp.ones(2)}, state, {'w': jnp.ones(2)})
  assert np.all(np.asarray(updates['w']) < 0)
  config.solver.optimizer = 'rmsprop'
  with pytest.raises(ValueError, match='sgd.*adam'):
    optim.create_optimizer(config)


@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_fresh_state_moved_to_a_step_continues_the_schedule(ssd300_config,
                                                            name):
  config = ssd300_config.copy_and_resolve_references()
  config.solver.optimizer = name
  config.solver.weight_decay = 0.0
  config.solver.warmup_iters = 1000
  step = 700  # in the warm-up: f(700) is far from f(0)
  tx = optim.create_optimizer(config)
  params = {'w': jnp.ones(3)}
  grads = {'w': jnp.asarray([0.5, -1.0, 2.0])}
  state = optim.with_schedule_at(tx.init(params), step)
  updates, _ = tx.update(grads, state, params)
  # A fresh optimizer's first update (zero momentum; Adam's first step is
  # g / |g|) at the learning rate of update step + 1, i.e. f(step).
  direction = grads['w'] if name == 'sgd' else jnp.sign(grads['w'])
  np.testing.assert_allclose(
      np.asarray(updates['w']),
      -optim.learning_rate_at(config, step) * np.asarray(direction), rtol=1e-5)
  fresh, _ = tx.update(grads, tx.init(params), params)
  assert not np.allclose(np.asarray(fresh['w']), np.asarray(updates['w']))
