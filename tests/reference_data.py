"""Access to tests/fixtures (reference numbers; see fixtures/README.md)."""

import json
import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def fixture_path(name):
  return os.path.join(FIXTURES, name)


def load_fixture(name):
  """A fixture file: .npz/.npy through numpy, .json parsed."""
  path = fixture_path(name)
  if name.endswith(('.npz', '.npy')):
    return np.load(path)
  if name.endswith('.json'):
    with open(path) as f:
      return json.load(f)
  raise ValueError(f'unknown fixture type: {name}')
