"""Flax NNX SSD models."""

from ssd_jax.models.backbones import BACKBONES
from ssd_jax.models.ssd import PREDICTORS, SSD, create_model, feature_map_shapes, feature_map_sizes, validate_config

__all__ = ['BACKBONES', 'PREDICTORS', 'SSD', 'create_model',
           'feature_map_shapes', 'feature_map_sizes', 'validate_config']
