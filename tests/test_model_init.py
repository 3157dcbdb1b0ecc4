"""create_model: one compiled initialisation with the reference's
initialisation distributions (and the values an eager build draws)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax import monitoring

from ssd_jax import models
from ssd_jax.interop import torch_import
from ssd_jax.models import ssd

_COMPILE_EVENT = 'backend_compile'  # /jax/core/compile/backend_compile_duration
_COMPILES = []


def _count_compiles(event, duration, **kwargs):
  del duration, kwargs
  if _COMPILE_EVENT in event:
    _COMPILES.append(event)


monitoring.register_event_duration_secs_listener(_count_compiles)


@pytest.fixture(scope='module')
def ssd300(ssd300_config):
  """(config, reference-layout state dict) of a fresh SSD300."""
  model = models.create_model(ssd300_config)
  return ssd300_config, torch_import.reference_state_dict(model)


def test_ssd300_is_built_in_at_most_two_compilations(ssd300_config):
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)  # no cache hits
  try:
    jax.numpy.zeros(()).block_until_ready()
    _COMPILES.clear()
    model = models.create_model(ssd300_config)
    jax.block_until_ready(nnx.state(model))
    count = len(_COMPILES)
  finally:
    jax.config.update('jax_enable_compilation_cache', previous)
  assert 1 <= count <= 2, count


def test_values_are_the_eager_builds(tiny_config_small):
  config = tiny_config_small
  rngs = nnx.Rngs(3)
  built = models.create_model(config, rngs)
  with jax.threefry_partitionable(False):
    eager_rngs = nnx.Rngs(3)
    eager = ssd.SSD(config, rngs=eager_rngs)
  for a, b in zip(jax.tree.leaves(nnx.state(built)),
                  jax.tree.leaves(nnx.state(eager))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-7)
  # The rngs advanced as the eager build advances them.
  np.testing.assert_array_equal(jax.random.key_data(rngs.params()),
                                jax.random.key_data(eager_rngs.params()))


@pytest.fixture(scope='module')
def tiny_config_small():
  from tests import tiny  # pylint: disable=g-import-not-at-top
  return tiny.tiny_config()


def _fans(weight):
  """PyTorch's fans of an OIHW weight."""
  receptive = int(np.prod(weight.shape[2:]))
  return weight.shape[1] * receptive, weight.shape[0] * receptive


def _assert_uniform(values, bound, name):
  values = np.asarray(values, np.float64).ravel()
  assert np.abs(values).max() <= bound * (1 + 1e-6), name
  if values.size >= 20000:  # the variance of U(-b, b) is b^2 / 3
    assert values.var() == pytest.approx(bound**2 / 3, rel=0.05), name
    assert abs(values.mean()) < 0.02 * bound, name


def test_reference_initialisation_distributions(ssd300):
  _, state = ssd300
  vgg = [k for k in state if k.startswith('backbone.vgg.')]
  extras = [k for k in state if k.startswith('backbone.extras.')]
  heads = [k for k in state if k.startswith('box_head.predictor.')]
  assert len(vgg) == 30 and len(extras) == 16 and len(heads) == 24
  # VGG (without a pretrained file): PyTorch's Conv2d default,
  # U(+-1/sqrt(fan_in)) for weight and bias.
  for key in vgg:
    layer = key.rsplit('.', 1)[0]
    fan_in, _ = _fans(state[f'{layer}.weight'])
    _assert_uniform(state[key], 1 / np.sqrt(fan_in), key)
  # Extras and heads: xavier_uniform_ weights, zero biases (reference's
  # _xavier_init over every Conv2d it builds there).
  for key in extras + heads:
    if key.endswith('.bias'):
      assert not np.asarray(state[key]).any(), key
    else:
      fan_in, fan_out = _fans(state[key])
      _assert_uniform(state[key], np.sqrt(6 / (fan_in + fan_out)), key)
  np.testing.assert_array_equal(state['backbone.l2_norm.weight'], 20.0)
