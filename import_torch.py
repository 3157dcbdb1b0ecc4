"""Imports a reference PyTorch checkpoint into a workdir eval.py evaluates.

  python import_torch.py --checkpoint=model_final.pth \
      --config=configs/ssd300_voc.py --workdir=W
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Reference .pth checkpoint.')
flags.DEFINE_string('workdir', None, 'Output workdir for eval.py.')
config_flags.DEFINE_config_file('config', None, 'Model config file.',
                                lock_config=True)
flags.mark_flags_as_required(['checkpoint', 'workdir', 'config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssd_jax.interop import torch_import  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  step = torch_import.import_to_workdir(FLAGS.checkpoint, FLAGS.config,
                                        FLAGS.workdir)
  print(f'Wrote {os.path.join(FLAGS.workdir, checkpointing.CHECKPOINT_DIR, str(step))} and '
        f'{os.path.join(FLAGS.workdir, checkpointing.CONFIG_FILE)} from '
        f'{FLAGS.checkpoint}')


if __name__ == '__main__':
  app.run(main)
