"""Where the CPU-only speed-ups apply: decided once per compiled step.

Two things make XLA:CPU faster for SSD and must never reach a GPU graph:
the models' custom-VJP kernels (`models.layers.cpu_kernels`: Winograd
convolutions, fast bias / max-pool / depthwise / BatchNorm gradients) and
turning off XLA:CPU's YNNPACK path for convolutions and dots. Every step
factory (train step, predict step, the Detector's forward, export) asks
`step_kernels` once and traces under `StepKernels.scope()`.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ssd_jax.models import layers

# XLA:CPU hands convolutions and dots to YNNPACK by default. For SSD's
# convolutions, forward + backward takes 1.15-3.2x as long per layer there as
# with XLA's Eigen kernels (1.6x in sum) on the 2-core machines we measured
# (bench/conv_layers.py, BENCHMARKS.md), so compiled steps turn it off on CPU.
_CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def compiler_options(platform=None):
  """XLA options for the compiled steps on `platform` (None = defaults).

  `platform` defaults to JAX's default backend. On 'cpu': YNNPACK off, if
  this jaxlib knows the option (checked once by compiling a trivial
  function; an unknown option is left out). Other platforms ('gpu', 'tpu',
  ...) compile with XLA's defaults.
  """
  if (platform or jax.default_backend()) != 'cpu':
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(
        jax.device_put(jnp.zeros(()), jax.devices('cpu')[0])).compile()
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  return dict(_CPU_COMPILER_OPTIONS)


@dataclasses.dataclass(frozen=True)
class StepKernels:
  """The kernel choice of one compiled step.

  platform: where the step runs ('cpu', 'gpu', 'tpu').
  cpu_kernels: whether the model is traced with the CPU-only kernels.
  compiler_options: XLA options for jax.jit (None: XLA's defaults).
  """
  platform: str
  cpu_kernels: bool
  compiler_options: Any

  def scope(self):
    """Context manager to trace the model in: sets `layers.cpu_kernels`."""
    return layers.cpu_kernels(self.cpu_kernels)

  def jit(self, fn, **kwargs):
    """`jax.jit(fn, **kwargs)` traced in `scope()` with the step's options."""
    def traced(*args):
      with self.scope():
        return fn(*args)
    return jax.jit(traced, compiler_options=self.compiler_options, **kwargs)


def step_kernels(platform=None, cpu_kernels=None):
  """The StepKernels of a step that runs on `platform`.

  platform: default JAX's default backend. cpu_kernels: None turns the CPU
  kernels and compiler options on exactly when the step runs on CPU (so a
  GPU/TPU step is plain XLA); True / False forces the model kernels (tests,
  benchmarks, export), the compiler options still follow the platform.
  """
  platform = platform or jax.default_backend()
  use = platform == 'cpu' if cpu_kernels is None else bool(cpu_kernels)
  return StepKernels(platform=platform, cpu_kernels=use,
                     compiler_options=compiler_options(platform))

