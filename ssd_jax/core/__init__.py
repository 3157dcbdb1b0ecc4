"""The detector's maths: box ops, prior boxes, matching and the MultiBox loss.

Pure numpy / jax.numpy; imports nothing else of ssd_jax.
"""
