# Makes the repository root importable (configs/, ssd_jax/) in pytest runs.
