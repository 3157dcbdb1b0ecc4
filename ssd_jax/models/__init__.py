"""Flax NNX SSD models."""

from ssd_jax.models.ssd import SSD, create_model, feature_map_sizes, validate_config

__all__ = ['SSD', 'create_model', 'feature_map_sizes', 'validate_config']
