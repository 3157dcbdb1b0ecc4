"""The weight recipe rebuilds the reference's fixture weights exactly."""

import json
import os

import numpy as np

from tests import recipe


def test_recipe_matches_the_reference_checksums():
  with open(os.path.join(recipe.FIXTURES, 'params_checksums.json')) as f:
    checksums = json.load(f)
  state_dict = recipe.recipe_state_dict()
  assert sorted(state_dict) == sorted(checksums)
  for key, value in state_dict.items():
    expected = checksums[key]
    assert list(value.shape) == expected['shape'], key
    np.testing.assert_allclose(value.reshape(-1)[:4], expected['first4'],
                               rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(value.astype(np.float64).sum(),
                               expected['sum'], rtol=1e-5, atol=1e-6,
                               err_msg=key)
