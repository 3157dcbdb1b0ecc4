"""The workdir layout: Orbax checkpoints and the resolved config.

    W/config.json             the resolved config (written by train.py / torch_import)
    W/checkpoints/<step>/     Orbax: 'model' (all model variables), 'opt_state'
                              (optional), 'meta' (JSON: step, data position, ...)

Orbax writes each step to a temporary folder and renames it when complete, so a
run killed while saving never leaves a half-written checkpoint behind as the
latest one.
"""

import json
import os

import jax
import ml_collections
from flax import nnx
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def save_config(workdir, config):
  """Writes the resolved config to W/config.json."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(path + '.tmp', path)


def load_config(workdir):
  """Reads W/config.json back into a ConfigDict (JSON lists become tuples)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: is {workdir!r} a workdir written by train.py or '
        'ssd_jax.torch_import?')
  with open(path) as f:
    return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


class Checkpointer:
  """Saves and restores training state under W/checkpoints with Orbax."""

  def __init__(self, workdir, max_to_keep=3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step, model, opt_state=None, meta=None):
    """Saves pytrees of arrays `model` (and `opt_state`) and a JSON `meta`."""
    items = {'model': ocp.args.StandardSave(model),
             'meta': ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step, model, opt_state=None):
    """Restores a checkpoint into the structure of the given targets.

    Args:
      step: the step to restore (None = the latest).
      model: a pytree of arrays or jax.ShapeDtypeStruct (with shardings) that
        the saved model state is restored into.
      opt_state: the same for the optimizer state; None skips it.

    Returns:
      dict with 'model', 'meta' and, if asked, 'opt_state'.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {self.directory} '
          f'(have {sorted(self._manager.all_steps())})')
    items = {'model': ocp.args.StandardRestore(_abstract(model)),
             'meta': ocp.args.JsonRestore()}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(_abstract(opt_state))
    return dict(self._manager.restore(step, args=ocp.args.Composite(**items)))

  def wait(self):
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def restore_model(checkpointer, model, step=None):
  """Loads the model variables of a checkpoint into the NNX `model` in place.

  `model` may be abstract (from nnx.eval_shape). Returns the restored step.
  """
  if step is None:
    step = checkpointer.latest_step()
  state = nnx.state(model)
  restored = checkpointer.restore(step, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restored['model'])
  nnx.update(model, state)
  return step


def _abstract(tree):
  def to_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=getattr(x, 'sharding', None))
  return jax.tree.map(to_struct, tree)
