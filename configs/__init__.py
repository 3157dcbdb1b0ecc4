"""Experiment configs (ml_collections). Each module defines `get_config()`."""
