"""The workdir layout: Orbax checkpoints and the resolved config.

    W/config.json             the resolved config (written by train.py / torch_import)
    W/checkpoints/<step>/     Orbax: 'model' (all model variables), 'opt_state'
                              (optional), 'meta' (JSON: step, data position, ...)
                              and MANIFEST_FILE (ours: size and SHA-256 of
                              every file, written once Orbax has committed it)
    W/checkpoints/<step>.damaged-<n>/   a damaged checkpoint moved aside

Orbax writes each step to a temporary folder and renames it when complete, so a
run killed while saving never leaves a half-written checkpoint behind as the
latest one. What can still go wrong on disk afterwards (a truncated or
overwritten file) is found by `latest_intact_step`: the manifest's hashes
where there is one, else a full read of the checkpoint.
"""

import errno
import hashlib
import json
import os
import shutil

import jax
import ml_collections
from flax import nnx
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MANIFEST_FILE = 'ssd_jax_manifest.json'
DAMAGED_SUFFIX = '.damaged-'  # not a step name for Orbax (digits only)
_MAX_LISTED = 6  # differing arrays named in a CheckpointMismatchError
_HASH_CHUNK = 1 << 20


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not have the shapes the config's model needs."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint that is needed cannot be read back intact."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (no space, no permission, folder gone)."""


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
    self._pending = None  # the step being written in the background
    self._failed = False  # a save failed (and was reported)

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def step_path(self, step):
    return os.path.join(self.directory, str(step))

  def save(self, step, model, opt_state=None, meta=None):
    """Saves pytrees of arrays `model` (and `opt_state`) and a JSON `meta`.

    Orbax writes in the background; the next save, `wait` or `close` waits
    for it, writes its manifest and reports its failure.

    Raises:
      CheckpointSaveError: this save, or the one before it, failed.
    """
    self.wait()
    items = {'model': ocp.args.StandardSave(model),
             'meta': ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    self._pending = int(step)
    try:
      self._manager.save(int(step), args=ocp.args.Composite(**items),
                         force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      self._failed = True
      raise save_error(self.step_path(step), e) from e

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
    """Blocks until the save in flight is committed; writes its manifest.

    Raises:
      CheckpointSaveError: that save failed (the checkpoints before it are as
        they were: Orbax writes each one to a temporary folder).
    """
    step, self._pending = self._pending, None
    if step is None:
      if not self._failed:  # Orbax would raise a reported failure again
        self._manager.wait_until_finished()
      return
    path = self.step_path(step)
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      raise save_error(path, e) from e
    self._manager.reload()
    if step not in self._manager.all_steps():
      raise save_error(path, None)
    if jax.process_index() == 0:
      try:
        write_manifest(path)
      except OSError as e:
        raise save_error(os.path.join(path, MANIFEST_FILE), e) from e

  def close(self):
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:  # else: the failure CheckpointSaveError named
          raise

  def damage(self, step):
    """Why checkpoint `step` is damaged (one line), or None if it is intact.

    Checks the sizes and hashes of its manifest, or, for a checkpoint without
    one (a run killed between commit and manifest, an older version), reads
    every item back.
    """
    path = self.step_path(step)
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
      return manifest_problem(path)
    try:
      self._read_back(step)
    except Exception as e:  # pylint: disable=broad-except
      return _one_line(e)
    return None

  def _read_back(self, step):
    """Restores every item of checkpoint `step` onto the first local device."""
    saved = self._manager.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    items = {'meta': ocp.args.JsonRestore()}
    for name in ('model', 'opt_state'):
      if saved.get(name) is not None:
        items[name] = ocp.args.StandardRestore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            saved[name].tree))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    jax.block_until_ready(dict(restored))

  def latest_intact_step(self, logger, move_damaged=False):
    """The newest checkpoint that is intact (None when there are none).

    Each damaged newer one is named in a warning and, with `move_damaged`,
    renamed to <step>.damaged-<n> (never deleted), so that a resumed run
    writes that step again. With several processes, process 0 checks and
    moves, and tells the others.

    Raises:
      CheckpointDamagedError: there are checkpoints, but none is intact.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    chosen = -1
    if jax.process_index() == 0:
      for step in steps:
        problem = self.damage(step)
        if problem is None:
          chosen = step
          break
        if move_damaged:
          moved = _move_aside(self.step_path(step))
          logger.warning('Checkpoint %s is damaged (%s): moved to %s',
                         self.step_path(step), problem, moved)
        else:
          logger.warning('Checkpoint %s is damaged (%s): skipped',
                         self.step_path(step), problem)
    if jax.process_count() > 1:
      chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
    if move_damaged:
      self._manager.reload()
    if chosen < 0:
      where = (f'moved aside as <step>{DAMAGED_SUFFIX}<n>' if move_damaged
               else 'left in place')
      raise CheckpointDamagedError(
          f'no intact checkpoint in {os.path.dirname(self.directory)}: all of '
          f'steps {sorted(steps)} in {self.directory} are damaged ({where}, '
          'nothing deleted). Put back an intact copy, or start afresh with '
          'another --workdir.')
    return chosen

  def check_intact(self, step):
    """Raises CheckpointDamagedError if checkpoint `step` is damaged."""
    self._check_step(step)
    problem = self.damage(step)
    if problem is not None:
      raise CheckpointDamagedError(
          f'checkpoint {self.step_path(step)} is damaged: {problem}')


def write_manifest(path):
  """Writes the size and SHA-256 of every file under `path` to its manifest."""
  files = {}
  for name in _files(path):
    files[name] = [os.path.getsize(os.path.join(path, name)),
                   _sha256(os.path.join(path, name))]
  target = os.path.join(path, MANIFEST_FILE)
  with open(target + '.tmp', 'w') as f:
    json.dump({'files': files}, f, indent=1, sort_keys=True)
  os.replace(target + '.tmp', target)


def manifest_problem(path):
  """How the files under `path` differ from its manifest, or None."""
  try:
    with open(os.path.join(path, MANIFEST_FILE)) as f:
      files = json.load(f)['files']
    expected = {name: (int(size), str(digest))
                for name, (size, digest) in files.items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'unreadable {MANIFEST_FILE}: {_one_line(e)}'
  for name, (size, digest) in sorted(expected.items()):
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
      return f'{name} is missing'
    if os.path.getsize(file_path) != size:
      return f'{name} has {os.path.getsize(file_path)} bytes, not {size}'
    if _sha256(file_path) != digest:
      return f'{name} does not match its SHA-256'
  return None


def _files(path):
  """Every file under `path` but the manifest, as sorted relative paths."""
  names = []
  for root, _, files in os.walk(path):
    for name in files:
      relative = os.path.relpath(os.path.join(root, name), path)
      if not relative.startswith(MANIFEST_FILE):
        names.append(relative)
  return sorted(names)


def _sha256(file_path):
  digest = hashlib.sha256()
  with open(file_path, 'rb') as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _move_aside(path):
  """Renames `path` to the first free `path`.damaged-<n>; returns that."""
  n = 1
  while os.path.exists(f'{path}{DAMAGED_SUFFIX}{n}'):
    n += 1
  target = f'{path}{DAMAGED_SUFFIX}{n}'
  os.rename(path, target)
  return target


def _one_line(error):
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  text = text if len(text) <= 300 else text[:300] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _causes(error):
  """`error` and the exceptions it was raised from or during."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def save_error(path, error):
  """The CheckpointSaveError for a failed save of `path`.

  Names the cause (the innermost OSError where there is one) and, when the
  disk is full, the free space left.
  """
  causes = _causes(error)
  os_errors = [e for e in causes if isinstance(e, OSError) and e.errno]
  if os_errors:
    cause = os_errors[-1]
    reason = os.strerror(cause.errno)
    if cause.filename:
      reason += f': {cause.filename}'
  elif error is not None:
    reason = _one_line(causes[-1])
  else:
    reason = 'Orbax did not commit it (see its log above)'
  message = f'cannot save checkpoint {path}: {reason}'
  if any(getattr(e, 'errno', None) == errno.ENOSPC or
         'No space left on device' in str(e) for e in causes):
    message += f' ({_free_space(path)} free)'
  return CheckpointSaveError(
      message + '. The checkpoints before it are intact; the run stops.')


def _free_space(path):
  """Free space on the filesystem holding `path`, e.g. '1.2 GiB'."""
  folder = path
  while folder and not os.path.isdir(folder):
    parent = os.path.dirname(folder)
    if parent == folder:
      break
    folder = parent
  try:
    free = shutil.disk_usage(folder or '.').free
  except OSError:
    return 'unknown space'
  return f'{free / 2**30:.2f} GiB'


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
