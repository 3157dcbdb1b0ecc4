"""Data parallelism: a 1-D mesh over all devices, batches sharded along it.

The batch is sharded along its first axis over the mesh axis 'data'; model
variables and optimizer state are replicated.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(devices=None):
  """1-D data-parallel mesh over `devices` (default: all, every host)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA_AXIS,))


def mesh_platform(mesh):
  """The platform ('cpu', 'gpu', 'tpu') of `mesh`'s devices (one kind)."""
  platforms = {device.platform for device in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f'a mesh mixes device platforms {sorted(platforms)}; '
                     'build it from devices of one kind')
  return platforms.pop()


def batch_sharding(mesh):
  """Arrays split along their first (batch) axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh):
  """Arrays held whole on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch, mesh):
  """Host-local numpy batch -> global jax arrays sharded along axis 0.

  Each host passes its own slice (batch_size / process_count images); on one
  host this is a plain device_put with the batch sharding.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def replicate(tree, mesh):
  """Places host (or device) arrays replicated on `mesh`, through the host.

  Going through the host makes every process hold the same values, which
  placing arrays on a mesh that spans several processes needs.
  """
  return jax.device_put(jax.device_get(tree), replicated_sharding(mesh))
