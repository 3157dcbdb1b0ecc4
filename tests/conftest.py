"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope='session')
def ssd300_config():
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  config = ssd300_voc.get_config()
  config.model.backbone.pretrained = ''
  return config


@pytest.fixture(scope='session')
def ssd512_config():
  from configs import ssd512_voc  # pylint: disable=g-import-not-at-top
  config = ssd512_voc.get_config()
  config.model.backbone.pretrained = ''
  return config
