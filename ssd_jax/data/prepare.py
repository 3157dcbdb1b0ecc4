"""Datasets that the config generates (the shapes demo), made before use."""

import jax


def prepare_data(config, logger):
  """Generates the synthetic shapes dataset where the config asks for it.

  Process 0 writes it (once: an existing dataset is kept); with several
  processes, all wait until it is there.
  """
  shapes_args = config.data.get('synthetic_shapes')
  if not shapes_args:
    return
  from ssd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    logger.info('Shapes dataset in %s (generated on first use)',
                config.data.voc_root)
    shapes.ensure_dataset(config.data.voc_root, **shapes_args.to_dict())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('shapes dataset ready')
