"""Workdirs for tests of what reads them (inference, demo.py, export)."""

from flax import nnx

from ssd_jax.training import checkpointing


def save_workdir(workdir, config, model, step=0):
  """Writes `model` and `config` as a workdir (what eval.py and demo.py read).

  Returns the workdir as a string.
  """
  checkpointing.save_config(str(workdir), config)
  checkpointer = checkpointing.Checkpointer(str(workdir))
  checkpointer.save(step, nnx.to_pure_dict(nnx.state(model)))
  checkpointer.close()
  return str(workdir)
