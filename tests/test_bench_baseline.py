"""The PyTorch baseline of bench/ computes what the reference computes."""

import numpy as np
import pytest

from tests.recipe import recipe_state_dict
from tests.reference_data import load_fixture

torch = pytest.importorskip('torch')
from bench import torch_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_baseline_loss_equals_reference():
  ref = load_fixture('loss.npz')
  reg, cls = torch_step.multibox_loss(
      torch.from_numpy(ref['confidence']),
      torch.from_numpy(ref['predicted_locations']),
      torch.from_numpy(ref['labels']), torch.from_numpy(ref['gt_locations']))
  np.testing.assert_allclose(float(reg), ref['reg_loss'], rtol=1e-5)
  np.testing.assert_allclose(float(cls), ref['cls_loss'], rtol=1e-5)


def test_baseline_network_equals_reference_forward():
  model = torch_step.SSD300().eval()
  ours = recipe_state_dict()
  # The baseline's module names differ from the reference's only by prefix.
  renamed = {}
  for key, value in ours.items():
    key = key.replace('backbone.', '').replace('box_head.predictor.', '')
    renamed[key] = torch.from_numpy(value)
  model.load_state_dict(renamed, strict=True)
  ref = load_fixture('model_ref.npz')
  with torch.no_grad():
    cls, reg = model(torch.from_numpy(ref['input'][:1]))
  np.testing.assert_allclose(cls.numpy(), ref['cls_logits'][:1], atol=1e-3)
  np.testing.assert_allclose(reg.numpy(), ref['bbox_pred'][:1], atol=1e-3)
