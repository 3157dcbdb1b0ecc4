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
_MAX_LISTED = 6  # differing arrays named in a CheckpointMismatchError


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not have the shapes the config's model needs."""


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
        'ssd_jax.interop.torch_import?')
  with open(path) as f:
    return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _matches(key, patterns):
  return any(key == p or key.startswith(p + '.') for p in patterns)


def config_changes(saved, config, fields, ignore=()):
  """The differences between two configs in `fields`, one line each.

  Args:
    saved, config: ConfigDicts (e.g. `load_config(W)` and the new run's).
    fields: dotted names compared, a name covering everything under it
      (e.g. 'solver', 'data.train').
    ignore: dotted names under `fields` left out (e.g. 'solver.max_iter').

  Returns:
    ['solver.batch_size: 4 -> 8', ...] ('<absent>' for a missing field),
    sorted; values compared as JSON (tuples and lists alike).
  """
  old = _flatten(json.loads(saved.to_json()))
  new = _flatten(json.loads(config.to_json()))
  changes = []
  for key in sorted(set(old) | set(new)):
    if not _matches(key, fields) or _matches(key, ignore):
      continue
    before, after = old.get(key, '<absent>'), new.get(key, '<absent>')
    if before != after:
      changes.append(f'{key}: {before} -> {after}')
  return changes


class Checkpointer:
  """Saves and restores training state under W/checkpoints with Orbax."""

  def __init__(self, workdir, max_to_keep=3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    # Handlers named up front so that item_metadata() can tell which items a
    # step holds (an imported checkpoint has no 'opt_state').
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_handlers={'model': ocp.StandardCheckpointHandler(),
                       'opt_state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

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

  def has_opt_state(self, step):
    """Whether checkpoint `step` holds an optimizer state.

    Those written by ssd_jax.interop.torch_import hold the model only.
    """
    self._check_step(step)
    return self._manager.item_metadata(step).get('opt_state') is not None

  def restore(self, step, model, opt_state=None):
    """Restores a checkpoint into the structure of the given targets.

    Args:
      step: the step to restore (None = the latest).
      model: a pytree of arrays or jax.ShapeDtypeStruct (with shardings) that
        the saved model state is restored into.
      opt_state: the same for the optimizer state; None skips it. Asking for
        it from a checkpoint without one (see has_opt_state) is an error.

    Returns:
      dict with 'model', 'meta' and, if asked, 'opt_state'.

    Raises:
      FileNotFoundError: no such checkpoint, or it has no optimizer state.
      CheckpointMismatchError: the saved arrays do not fit the targets (a
        checkpoint of another model: num_classes, backbone, widths, ...).
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    self._check_step(step)
    saved = self._manager.item_metadata(step)
    targets = {'model': model}
    if opt_state is not None:
      if saved.get('opt_state') is None:
        raise FileNotFoundError(
            f'{self.directory}/{step} has no optimizer state (a model-only '
            'checkpoint, e.g. from ssd_jax.interop.torch_import)')
      targets['opt_state'] = opt_state
    for name, target in targets.items():
      self._check_fits(step, name, saved[name].tree, target)
    items = {name: ocp.args.StandardRestore(_abstract(target))
             for name, target in targets.items()}
    items['meta'] = ocp.args.JsonRestore()
    return dict(self._manager.restore(step, args=ocp.args.Composite(**items)))

  def _check_step(self, step):
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {self.directory} '
          f'(have {sorted(self._manager.all_steps())})')

  def _check_fits(self, step, name, saved_tree, target):
    """Raises CheckpointMismatchError naming the arrays that differ."""
    saved, wanted = _shapes(saved_tree), _shapes(target)
    if saved == wanted:
      return
    problems = [f'{path}: checkpoint {saved[path]}, config {wanted[path]}'
                for path in sorted(set(saved) & set(wanted))
                if saved[path] != wanted[path]]
    problems += [f'{path}: checkpoint {saved[path]}, not in the config'
                 for path in sorted(set(saved) - set(wanted))]
    problems += [f'{path}: not in the checkpoint, config {wanted[path]}'
                 for path in sorted(set(wanted) - set(saved))]
    listed = '\n  '.join(problems[:_MAX_LISTED])
    more = (f'\n  ... and {len(problems) - _MAX_LISTED} more'
            if len(problems) > _MAX_LISTED else '')
    config_file = os.path.join(os.path.dirname(self.directory), CONFIG_FILE)
    raise CheckpointMismatchError(
        f'{self.directory}/{step} does not fit the '
        f'{"optimizer state" if name == "opt_state" else name} of this config '
        f'({len(problems)} arrays differ):\n  {listed}{more}\n'
        'The checkpoint was written for another model (num_classes, '
        'backbone, widths, optimizer): use its config '
        f'({config_file} if it is still the one it was trained with), or a '
        'new --workdir.')

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


def _shapes(tree):
  """{'a/b/0/c': shape} of the arrays (or array metadata) of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          tuple(getattr(leaf, 'shape', ())) for path, leaf in leaves}


def _abstract(tree):
  """Restore targets; leaves without a sharding go to the first local device.

  (Orbax would otherwise reuse the saved sharding, which fails when the
  checkpoint was written by another number of devices or hosts.)
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def to_struct(x):
    sharding = getattr(x, 'sharding', None) or default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(to_struct, tree)
