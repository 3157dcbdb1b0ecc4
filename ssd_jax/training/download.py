"""The pretrained backbone file: a local path, or a URL downloaded once.

The cache (`$SSD_JAX_CACHE`, default ~/.cache/ssd_jax) may be shared by
several processes and hosts: each downloads into its own temporary file and
renames it into place when complete.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.request

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'ssd_jax')


class PretrainedFileError(ValueError):
  """A pretrained-weights file is empty, truncated or has the wrong hash."""


def sha256_of(path):
  """Hex sha256 of the file at `path`."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _check_file(path, sha256, expected_size=None):
  """Raises PretrainedFileError if `path` is empty or not the expected file."""
  size = os.path.getsize(path)
  if size == 0 or (expected_size is not None and size != expected_size):
    raise PretrainedFileError(
        f'{path} has {size} bytes'
        + (f', the server announced {expected_size}' if expected_size else '')
        + ': the file is incomplete.')
  if sha256:
    actual = sha256_of(path)
    if actual != sha256.lower():
      raise PretrainedFileError(
          f'{path} has sha256 {actual}, but '
          f'model.backbone.pretrained_sha256 is {sha256}: another file, or a '
          'damaged one.')


def _download(url, directory, path, sha256):
  """Downloads `url` to `path` through a temporary file in `directory`."""
  fd, temporary = tempfile.mkstemp(dir=directory,
                                   prefix=os.path.basename(path) + '.',
                                   suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      try:
        with urllib.request.urlopen(url, timeout=60) as response:
          length = response.headers.get('Content-Length')
          shutil.copyfileobj(response, f, 1 << 20)
      except OSError as e:
        raise FileNotFoundError(
            f'Could not download the pretrained backbone {url} ({e}). '
            f'Download it where you have internet and put it at {path} (or '
            'set $SSD_JAX_CACHE), pass --config.model.backbone.pretrained='
            "/path/to/the_file.pth, or use --config.model.backbone."
            "pretrained='' for random initialisation.") from e
    try:
      _check_file(temporary, sha256, int(length) if length else None)
    except PretrainedFileError as e:
      raise PretrainedFileError(
          f'Downloading {url}: {e} Try again, or download it by hand '
          f'to {path}.') from e
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def pretrained_path(pretrained, cache_dir=None, sha256=''):
  """A local path for `model.backbone.pretrained` (downloads a URL once).

  A cached or downloaded file must be non-empty, have the size the server
  announced and, when `sha256` (hex) is given, that hash; a cached file that
  fails the check is downloaded again.
  """
  if '://' not in pretrained:
    if not os.path.exists(pretrained):
      raise FileNotFoundError(
          f'model.backbone.pretrained: {pretrained} does not exist. Point '
          "it at the backbone's ImageNet weights (vgg16_reducedfc.pth for "
          'VGG), or set --config.model.backbone.'
          "pretrained='' to start from random weights.")
    _check_file(pretrained, sha256)
    return pretrained
  cache_dir = cache_dir or os.environ.get('SSD_JAX_CACHE', DEFAULT_CACHE)
  path = os.path.join(cache_dir, os.path.basename(pretrained))
  if os.path.exists(path):
    try:
      _check_file(path, sha256)
      return path
    except PretrainedFileError:
      pass  # downloaded again below
  os.makedirs(cache_dir, exist_ok=True)
  _download(pretrained, cache_dir, path, sha256)
  return path
