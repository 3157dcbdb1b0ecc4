# Makes the repository root importable (configs/, ssd_jax/) in pytest runs.

import jax

# Parity tests compare float32 results with the reference's. On GPUs XLA may
# run float32 matmuls and convolutions in TF32 or bf16 passes by default; the
# tests ask for full float32 everywhere (a no-op on CPU).
jax.config.update('jax_default_matmul_precision', 'highest')
