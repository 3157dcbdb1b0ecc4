"""ssd_jax: SSD object detection in JAX/Flax, faithful to lufficc/SSD."""
