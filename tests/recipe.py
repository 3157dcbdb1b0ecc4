"""The reference fixtures' deterministic SSD300 weights ("weight recipe").

Rebuilds, with numpy only, the PyTorch state dict that produced
fixtures/model_ref.npz, postprocess.npz and voc_tiny_dets.npz (see
fixtures/README.md): keys sorted by string order, key k drawn from
RandomState(5000 + k); conv weights N(0, sqrt(2 / fan_in)) (the first conv
scaled by 0.02), biases N(0, 0.01), the L2Norm scale 20.
"""

import json
import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def recipe_state_dict():
  """{key: float32 array in PyTorch layout (OIHW)} of the SSD300 recipe."""
  with open(os.path.join(FIXTURES, 'state_dict_shapes.json')) as f:
    shapes = json.load(f)
  state_dict = {}
  for k, key in enumerate(sorted(shapes)):
    shape = tuple(shapes[key])
    rs = np.random.RandomState(5000 + k)
    if key == 'backbone.l2_norm.weight':
      value = np.full(shape, 20.0)
    elif key.endswith('.weight'):
      fan_in = shape[1] * shape[2] * shape[3]
      std = np.sqrt(2.0 / fan_in)
      if key == 'backbone.vgg.0.weight':
        std *= 0.02
      value = rs.normal(0.0, std, size=shape)
    else:
      value = rs.normal(0.0, 0.01, size=shape)
    state_dict[key] = value.astype(np.float32)
  # Keep the reference's module order (the JSON's insertion order).
  return {key: state_dict[key] for key in shapes}
