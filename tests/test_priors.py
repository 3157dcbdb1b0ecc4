import numpy as np

from ssd_jax.core import priors as priors_lib
from tests.reference_data import load_fixture


def test_ssd300_priors_equal_reference_exactly(ssd300_config):
  priors = priors_lib.generate_priors(ssd300_config)
  reference = load_fixture('priors_ssd300.npy')
  assert priors.shape == (8732, 4) and priors.dtype == np.float32
  np.testing.assert_array_equal(priors, reference)
  assert priors_lib.num_priors(ssd300_config) == 8732


def test_ssd512_priors_equal_reference_exactly(ssd512_config):
  priors = priors_lib.generate_priors(ssd512_config)
  np.testing.assert_array_equal(priors, load_fixture('priors_ssd512.npy'))
  assert priors_lib.num_priors(ssd512_config) == 24564


def test_prior_order_level_row_col_anchor(ssd300_config):
  priors = priors_lib.generate_priors(ssd300_config)
  # Level 0, row 0, col 1, first anchor: cx = 1.5 / 37.5 (image_size/stride).
  np.testing.assert_allclose(priors[4], [1.5 / 37.5, 0.5 / 37.5, 0.1, 0.1],
                             rtol=1e-6)
  # Level 0, row 1, col 0: cy advances after a full row of 38 cells.
  np.testing.assert_allclose(priors[38 * 4, :2], [0.5 / 37.5, 1.5 / 37.5],
                             rtol=1e-6)
  # Anchor order at a location: min, sqrt(min*max), 2:1 wide, 1:2 tall.
  w_h = priors[:4, 2:]
  np.testing.assert_allclose(w_h[1], [np.sqrt(30 * 60) / 300] * 2, rtol=1e-6)
  assert w_h[2, 0] > w_h[2, 1] and w_h[3, 0] < w_h[3, 1]
  # The clip acts on center form: last level's wide prior has w == 1.
  assert priors[-2, 2] == 1.0
  assert priors.min() >= 0 and priors.max() <= 1
